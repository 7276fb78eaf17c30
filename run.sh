#!/usr/bin/env bash
# mmia's two entry points on a fresh machine (Python ≥ 3.10 with pip and venv):
#   bash run.sh pilot   – set up, then run the default study (`mmia pilot`)
#   bash run.sh test    – set up, then run the test suite
# Set-up makes a virtual environment in .venv (MMIA_VENV overrides) and installs mmia into it.
set -euo pipefail
cd "$(dirname "$0")"
venv=${MMIA_VENV:-.venv}
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/mmia" ] || [ pyproject.toml -nt "$venv/.mmia-installed" ]; then
  echo "setting up $venv (first run: downloads torch, a few minutes) …" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e '.[test]'
  touch "$venv/.mmia-installed"
fi
command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  pilot) exec "$venv/bin/mmia" pilot "$@" ;;
  test)
    "$venv/bin/ruff" check .
    exec "$venv/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh pilot|test [args]" >&2; exit 2 ;;
esac
