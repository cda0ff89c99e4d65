#!/usr/bin/env bash
# Set up .venv and run the main job: lay out an AttnRes model (a Llama-3.2-1B-shaped Block AttnRes config) without
# loading weights. Pass a checkpoint directory, config.json or Hub id to inspect another model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/attnres inspect "${1:-examples/attnres-llama-1b}"
