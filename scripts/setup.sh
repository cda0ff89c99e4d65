#!/usr/bin/env bash
# Create a virtual environment (if missing) and install attnres into it, editable, with the extras given as $1.
#   scripts/setup.sh dev             .venv: the newest releases the pins in pyproject.toml allow
#   scripts/setup.sh --lowest dev    .venv-lowest: the lowest releases they allow (scripts/lowest-versions.txt)
# torch is installed first and pinned (ATTNRES_TORCH, default the CPU build torch==2.13.0; --lowest: torch==2.6.0):
# left to the resolver, pip would pull a multi-GB CUDA build. On a GPU machine, set ATTNRES_TORCH to the torch you want.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
torch="${ATTNRES_TORCH:-torch==2.13.0}"
constraints=()
if [ "${1:-}" = "--lowest" ]; then
    shift
    venv=.venv-lowest
    constraints=(--constraint scripts/lowest-versions.txt)
    torch="${ATTNRES_TORCH:-$(grep '^torch==' scripts/lowest-versions.txt)}"
fi
extras="${1:-}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "$torch"
"${pip[@]}" ${constraints[@]+"${constraints[@]}"} -e ".${extras:+[$extras]}"
