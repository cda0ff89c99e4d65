"""Diagnostics (`attnres.diagnostics`, `attnres inspect --text`) against independent references: a zero-query graft
and the transformers Llama it came from are the same function, so its measurements follow from Llama's exactly."""

import json

import pytest
import torch
from PIL import Image

from attnres.cli import main
from attnres.diagnostics import collect
from tests.conftest import TOLERANCES, recorded_model_loads
from tests.eval_fixtures import write_model_pair
from tests.tiny_models import family_pair, randomize_


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


@pytest.mark.parametrize(
    "text, extra, message",
    [
        ("", [], "has 0 token(s); the measurement needs at least two"),
        ("import json", ["--max-tokens", "0"], "--max-tokens must be a positive number of tokens, got 0"),
        ("import json", ["--max-tokens", "-1"], "--max-tokens must be a positive number of tokens, got -1"),
        (None, [], "is not a file"),
        ("import json", ["--output", "{tmp}/taken"], "exists and is not empty"),
    ],
    ids=["empty text", "max tokens 0", "max tokens -1", "missing text", "output taken"],
)
def test_inspect_text_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, text, extra, message):
    baseline, attnres = write_model_pair(tmp_path)
    if text is not None:
        (tmp_path / "text.txt").write_text(text)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    arguments = ["inspect", str(attnres), "--text", str(tmp_path / "text.txt"), "--output", str(tmp_path / "diag")]
    capsys.readouterr()
    assert main(arguments + [item.format(tmp=tmp_path) for item in extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("attnres: error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
