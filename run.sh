#!/usr/bin/env bash
# mmia's two entry points on a fresh machine (Python ≥ 3.10 with pip and venv):
#   bash run.sh pilot   – set up, then run the default study (`mmia pilot`)
#   bash run.sh test    – set up, then run the test suite
# Set-up makes a virtual environment in .venv (MMIA_VENV overrides) and installs mmia into it.
# `test` also installs img2dataset into its own environment, .venv/img2dataset (it pins
# webdataset < 0.3, mmia needs 1.x; `mmia data download` runs it as a child process).
set -euo pipefail
cd "$(dirname "$0")"
venv=${MMIA_VENV:-.venv}
python=${PYTHON:-python3}
img2dataset_pin="img2dataset==1.47.0"
if [ ! -x "$venv/bin/mmia" ] || [ pyproject.toml -nt "$venv/.mmia-installed" ]; then
  echo "setting up $venv (first run: downloads torch, a few minutes) …" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e '.[test]'
  touch "$venv/.mmia-installed"
fi
command=${1:-}
[ $# -gt 0 ] && shift
setup_img2dataset() {
  local env="$venv/img2dataset"
  if [ ! -f "$env/.installed-$img2dataset_pin" ]; then
    echo "setting up $env ($img2dataset_pin in its own environment, about a minute) …" >&2
    "$python" -m venv "$env"
    "$env/bin/python" -m pip install -q --upgrade pip
    "$env/bin/python" -m pip install -q "$img2dataset_pin"
    touch "$env/.installed-$img2dataset_pin"
  fi
  case "$env" in /*) ;; *) env="$PWD/$env" ;; esac
  export MMIA_IMG2DATASET=${MMIA_IMG2DATASET:-$env/bin/img2dataset}
}
case "$command" in
  pilot) exec "$venv/bin/mmia" pilot "$@" ;;
  test)
    setup_img2dataset
    "$venv/bin/ruff" check .
    exec "$venv/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh pilot|test [args]" >&2; exit 2 ;;
esac
