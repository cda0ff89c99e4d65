#!/usr/bin/env bash
# The test command: set up the environment (scripts/setup.sh) and run the whole suite offline. Extra arguments go to
# pytest. `scripts/test.sh --lowest` does the same in .venv-lowest, on the lowest releases the pins allow.
set -euo pipefail
cd "$(dirname "$0")/.."
lowest=()
venv=.venv
if [ "${1:-}" = "--lowest" ]; then
    shift
    lowest=(--lowest)
    venv=.venv-lowest
fi
scripts/setup.sh ${lowest[@]+"${lowest[@]}"} dev
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
HF_HOME="$(mktemp -d)"
export HF_HOME
trap 'rm -rf "$HF_HOME"' EXIT
"$venv/bin/python" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'
"$venv/bin/python" -m pytest "$@"
