"""Diagnostics (`attnres.diagnostics`, `attnres inspect --text`) against independent references: a zero-query graft
and the transformers Llama it came from are the same function, so its measurements follow from Llama's exactly."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from attnres.cli import main
from attnres.diagnostics import collect
from tests.conftest import TOLERANCES, recorded_model_loads
from tests.eval_fixtures import write_model_pair
from tests.tiny_models import family_pair, randomize_, tiny_tokenizer


def test_zero_query_graft_measures_like_its_llama_source():
    llama, graft = family_pair("llama", "block")  # 5 layers, blocks of 2 layers, zero queries
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    reference, measured = collect(llama, ids, "llama"), collect(graft, ids, "graft")
    assert abs(measured.loss - reference.loss) < 1e-5
    # each layer reads the mean of its n sources: the PreNorm stream divided by n (n = 1, 2, 2, 3, 3 at the layers'
    # attention inputs; the final output averages the embedding and 3 blocks: n = 4)
    counts = [graft.config.num_depth_sources(sublayer) for sublayer in range(0, 11, 2)]
    assert counts == [1, 2, 2, 3, 3, 4]
    for layer, n in enumerate(counts):
        expected = reference.layer_input_rms[layer] / n
        assert abs(measured.layer_input_rms[layer] - expected) <= 1e-5 * expected, (layer, n)
    # same function, same weights: the same gradients on them
    for ours, theirs in zip(measured.layer_grad_norm, reference.layer_grad_norm):
        assert abs(ours - theirs) <= TOLERANCES["fp32_grad"]["rtol"] * theirs
    # depth attention: one row per sublayer and the output, uniform at zero init, each a distribution
    assert len(measured.depth_attention) == 11 and measured.source_names[0] == "embedding"
    for row in measured.depth_attention:
        seen = [w for w in row if w == w]
        assert abs(sum(seen) - 1) < 1e-6 and max(seen) - min(seen) < 1e-6
    assert reference.depth_attention is None


def test_trained_queries_show_in_the_depth_map():
    _, graft = family_pair("llama", "full")
    randomize_(graft, seed=1, query_std=1.0)
    measured = collect(graft, torch.randint(3, 99, (1, 12)), "full")
    rows = [[w for w in row if w == w] for row in measured.depth_attention]
    assert [len(row) for row in rows] == list(range(1, 11)) + [11]  # full mode: every earlier sublayer
    assert any(max(row) - min(row) > 0.05 for row in rows[2:])


def test_inspect_text_writes_plots_and_tables(tmp_path, capsys):
    baseline, attnres = write_model_pair(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(json.__doc__ * 3)
    with recorded_model_loads() as loads:
        assert main(["inspect", str(attnres), "--baseline", str(baseline), "--text", str(text), "--output",
                     str(tmp_path / "diag"), "--max-tokens", "64"]) == 0  # fmt: skip
    assert loads == [{"use_kernels": False, "kernelized": False}] * 2  # no Hub kernels (transformers 5.25's default)
    runs = json.loads((tmp_path / "diag" / "diagnostics.json").read_text())
    assert [run["label"].split(":")[0] for run in runs] == ["AttnRes", "baseline"]
    assert runs[0]["tokens"] == 64 and abs(runs[0]["loss"] - runs[1]["loss"]) < 1e-5
    depth = Image.open(tmp_path / "diag" / "depth_attention.png")
    assert json.loads(depth.info["Description"]) == json.loads(json.dumps(runs[0]["depth_attention"]))
    magnitudes = json.loads(Image.open(tmp_path / "diag" / "magnitudes.png").info["Description"])
    assert magnitudes[runs[1]["label"]]["rms"] == runs[1]["layer_input_rms"]
    assert "| layer |" in capsys.readouterr().out
    assert (
        main(["inspect", str(attnres), "--text", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "x")]) == 1
    )


def write_gpt2(directory: Path, tokenizer=None, vocab_size: int | None = None) -> Path:
    """A random 3-layer GPT-2 (transformers' own classes), saved with `tokenizer` if one is given."""
    vocab_size = vocab_size or len(tokenizer)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=3, n_head=4, n_positions=256, bos_token_id=0,
                        eos_token_id=0)  # fmt: skip
    randomize_(GPT2LMHeadModel(config)).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def test_inspect_text_measures_a_gpt2_baseline(tmp_path):
    """GPT-2 keeps its blocks in `transformer.h` (not `model.layers`) and its final norm in `transformer.ln_f`; it is
    measured like any other model. Reference: transformers' own hidden states (the input of each block), the input of
    `ln_f` and the gradients of each block's weights, for the same tokens."""
    _, attnres = write_model_pair(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(attnres)
    gpt2 = write_gpt2(tmp_path / "gpt2", tokenizer)
    text = tmp_path / "text.txt"
    text.write_text(json.__doc__ * 3)
    arguments = ["inspect", str(attnres), "--baseline", str(gpt2), "--text", str(text), "--max-tokens", "64"]
    assert main([*arguments, "--output", str(tmp_path / "d")]) == 0
    measured = json.loads((tmp_path / "d" / "diagnostics.json").read_text())[1]

    model = GPT2LMHeadModel.from_pretrained(gpt2).eval()
    ids = tokenizer(text.read_text(), return_tensors="pt").input_ids[:, :64]
    final_norm_input = []
    model.transformer.ln_f.register_forward_pre_hook(lambda _module, args: final_norm_input.append(args[0]))
    outputs = model(ids, labels=ids, output_hidden_states=True)
    outputs.loss.backward()
    states = [h.detach() for h in (*outputs.hidden_states[:3], final_norm_input[0])]
    assert measured["layer_input_rms"] == pytest.approx([float(h.pow(2).mean().sqrt()) for h in states], rel=1e-5)
    grads = [math.sqrt(sum(float(p.grad.pow(2).sum()) for p in block.parameters())) for block in model.transformer.h]
    assert measured["layer_grad_norm"] == pytest.approx(grads, rel=1e-4)
    table = (tmp_path / "d" / "diagnostics.md").read_text()
    assert "| 4 | " in table and table.split("| 4 | ")[1].split("\n")[0].endswith("| – | – |")  # 5 layers vs 3


def without_tokenizer(model: Path, directory: Path) -> Path:
    return Path(shutil.copytree(model, directory, ignore=shutil.ignore_patterns("tokenizer*")))


# (model, its --text, more arguments, message): "{attnres}" is the AttnRes model, "{tmp}" the test's directory.
BAD_INSPECT_TEXT_INPUT = {
    "empty text": ("{attnres}", "", [], "has 0 token(s); the measurement needs at least two"),
    "max tokens 0": ("{attnres}", "import json", ["--max-tokens", "0"], "--max-tokens must be a positive number of"),
    "max tokens -1": ("{attnres}", "import json", ["--max-tokens", "-1"], "of tokens, got -1"),
    "missing text": ("{attnres}", None, [], "is not a file"),
    # inspect has no --force: the message suggests only what exists
    "output taken": ("{attnres}", "x", ["--output", "{tmp}/taken"], "exists and is not empty; choose another path"),
    "model without tokenizer": (
        "{tmp}/no-tokenizer",
        "import json",
        [],
        "model '{tmp}/no-tokenizer' has no tokenizer files (tokenizer_config.json, tokenizer.json or vocabulary "
        "files); --text is tokenized with the model's tokenizer",
    ),
    "baseline with another tokenizer": (
        "{attnres}",
        "the cat and the dog",
        ["--baseline", "{tmp}/gpt2-words"],
        "--baseline '{tmp}/gpt2-words' tokenizes --text differently from the model",
    ),
    "baseline vocabulary too small": (
        "{attnres}",
        "import json",
        ["--baseline", "{tmp}/gpt2-small"],
        "--baseline '{tmp}/gpt2-small' embeds 40 tokens, but the model's tokenizer gives --text token ids up to",
    ),
    "baseline not on the Hub (offline)": (
        "{attnres}",
        "import json",
        ["--baseline", "some-org/not-there"],
        "--baseline 'some-org/not-there' is not a local path and could not be downloaded from the Hub",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INSPECT_TEXT_INPUT))
def test_inspect_text_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, case):
    model, text, extra, message = BAD_INSPECT_TEXT_INPUT[case]
    baseline, attnres = write_model_pair(tmp_path)
    without_tokenizer(attnres, tmp_path / "no-tokenizer")
    write_gpt2(tmp_path / "gpt2-words", tiny_tokenizer())  # a word-level tokenizer, not the model's byte-level BPE
    write_gpt2(tmp_path / "gpt2-small", vocab_size=40)  # no tokenizer of its own; the model's ids exceed its 40
    if text is not None:
        (tmp_path / "text.txt").write_text(text)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    arguments = ["inspect", model, "--text", str(tmp_path / "text.txt"), "--output", str(tmp_path / "diag"), *extra]
    capsys.readouterr()
    assert main([item.format(tmp=tmp_path, attnres=attnres) for item in arguments]) == 1
    err = capsys.readouterr().err
    assert err.startswith("attnres: error: ") and message.format(tmp=tmp_path) in err and err.count("\n") == 1, err
    assert "--force" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("family", ["gemma2", "qwen2_moe", "granite"])
def test_zero_query_family_graft_measures_like_its_source(family):
    """The same for grafts built from a family's own modules (Gemma 2's scaled embedding and sandwich norms, a
    sparse MoE with a shared expert, Granite's multipliers): the loss is the source's and each layer reads the
    source's residual stream divided by its number of sources."""
    from tests.test_families import in_memory_graft

    source, graft = in_memory_graft(family)
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    reference, measured = collect(source, ids, family), collect(graft, ids, "graft")
    assert abs(measured.loss - reference.loss) < 1e-5
    counts = [graft.config.num_depth_sources(sublayer) for sublayer in range(0, 11, 2)]
    for layer, n in enumerate(counts):
        expected = reference.layer_input_rms[layer] / n
        assert abs(measured.layer_input_rms[layer] - expected) <= 1e-5 * expected, (family, layer, n)
    assert len(measured.depth_attention) == 11
