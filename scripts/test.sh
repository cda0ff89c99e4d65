#!/usr/bin/env bash
# The test command: set up .venv (scripts/setup.sh) and run the whole suite offline. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
HF_HOME="$(mktemp -d)"
export HF_HOME
trap 'rm -rf "$HF_HOME"' EXIT
.venv/bin/python -m pytest "$@"
