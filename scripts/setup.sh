#!/usr/bin/env bash
# Create .venv (if missing) and install attnres into it, editable, with the extras given as $1 (e.g. "dev").
# torch is installed first and pinned (ATTNRES_TORCH, default the CPU build torch==2.13.0): left to the resolver,
# pip would pull a multi-GB CUDA build. On a GPU machine, set ATTNRES_TORCH to the torch you want.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "${ATTNRES_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras:+[$extras]}"
