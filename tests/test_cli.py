import json
import subprocess
import sys

import pytest

from attnres.cli import main
from attnres.paths import is_missing_local_path
from tests.tiny_models import tiny_config


def test_inspect_prints_layout_and_parameter_counts(tmp_path, capsys):
    tiny_config(attn_res_block_size=2).save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "blocks: 3 of 2 layer(s) (5 layers, 10 sublayers)" in out
    assert "block 3: layers 4-4" in out
    assert "layers.2.mlp     3  emb b1 b2*" in out
    assert "output           4  emb b1 b2 b3" in out


def test_inspect_json_counts_match_the_model(tmp_path, capsys):
    from attnres import AttnResForCausalLM

    config = tiny_config("full")
    config.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path / "config.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model = AttnResForCausalLM(config)
    assert report["total_parameters"] == sum(p.numel() for p in model.parameters())
    # one pseudo-query and one key-norm weight of size hidden per sublayer, plus the output's
    assert report["attnres_parameters"] == (2 * 5 + 1) * 2 * 32
    assert [count for _, count, _ in report["aggregations"]] == list(range(1, 12))
    assert report["sources"] == ["embedding"] + [f"layer {i // 2} {('attn', 'mlp')[i % 2]}" for i in range(10)]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attn_res_block_size": 2},
        {"residual_mode": "full", "tie_word_embeddings": True},
        {"qk_norm": True, "qkv_bias": True, "num_key_value_heads": 2},
        {"attention_bias": True, "mlp_bias": True, "attn_res_num_blocks": 5},
        {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]},
    ],
    ids=["block", "full, tied", "qk norm, qkv bias, GQA", "biases", "mixed attention types"],
)
def test_layout_counts_the_parameters_of_the_model_it_describes(kwargs):
    """`describe` counts from models of one and two layers (every layer has the same parameters): the counts are
    those of the whole model."""
    from attnres import AttnResForCausalLM
    from attnres.layout import describe

    config = tiny_config(**kwargs)
    model = AttnResForCausalLM(config)
    layout = describe(config)
    assert layout.total_parameters == sum(p.numel() for p in model.parameters())
    assert layout.attnres_parameters == sum(p.numel() for p in model.attn_res_parameters().values())


def test_inspect_shows_the_first_and_last_sources_of_long_lists(tmp_path, capsys):
    tiny_config("full", num_hidden_layers=10).save_pretrained(tmp_path / "full")
    tiny_config(num_hidden_layers=20, attn_res_block_size=1).save_pretrained(tmp_path / "block")
    assert main(["inspect", str(tmp_path / "full")]) == 0
    out = capsys.readouterr().out
    assert (
        "  layers.9.mlp    20  emb 0.attn 0.mlp 1.attn 1.mlp 2.attn ... 6.mlp 7.attn 7.mlp 8.attn 8.mlp 9.attn\n"
        in out
    )
    assert main(["inspect", str(tmp_path / "block")]) == 0
    out = capsys.readouterr().out
    assert "  layers.18.mlp    20  emb b1 b2 b3 b4 b5 ... b14 b15 b16 b17 b18 b19*\n" in out
    assert "  layers.19.attn   20  emb b1 b2 b3 b4 b5 ... b14 b15 b16 b17 b18 b19\n" in out
    assert "  output           21  emb b1 b2 b3 b4 b5 ... b15 b16 b17 b18 b19 b20" in out


@pytest.mark.parametrize("mode, output", [("full", "text"), ("block", "json")])
def test_inspect_takes_time_linear_in_depth(tmp_path, mode, output):
    """100,000 layers (200,000 sublayers; in Full AttnRes 2·10^10 source names if every list were spelled out) in
    seconds: no layer is built, and each aggregation shows at most 12 names."""
    tiny_config(mode, num_hidden_layers=100_000, attn_res_num_blocks=8).save_pretrained(tmp_path)
    arguments = ["--json"] if output == "json" else []
    result = subprocess.run([sys.executable, "-m", "attnres", "inspect", str(tmp_path), *arguments],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    if output == "json":
        assert json.loads(result.stdout)["aggregations"][-1] == ["output", 9, False]
    else:
        assert result.stdout.endswith("99998.attn 99998.mlp 99999.attn 99999.mlp\n")
        assert "  output             200001  emb 0.attn 0.mlp 1.attn 1.mlp 2.attn ... 99997.attn" in result.stdout


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda tmp: str(tmp / "missing"), "does not exist"),
        (lambda tmp: str(tmp), "has no config.json"),  # an empty directory
        (
            lambda tmp: _write(tmp / "llama" / "config.json", {"model_type": "llama"}),
            "is a 'llama' model, not an AttnRes",
        ),
        (
            lambda tmp: _write(
                tmp / "bad" / "config.json",
                {"model_type": "attnres", "num_hidden_layers": 4, "attn_res_block_size": 0},
            ),
            "attn_res_block_size",
        ),
    ],
)
def test_inspect_bad_input_is_one_line_and_exit_code_1(tmp_path, capsys, make_input, message):
    assert main(["inspect", make_input(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("attnres: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "name, missing",
    [
        ("org/model", False),  # a Hub id
        ("gpt2", False),  # a legacy one-part Hub id, which the Hub redirects
        ("{tmp}", False),  # exists
        ("{tmp}/nothing", True),  # absolute
        ("./nothing", True),
        ("~/no-such-dir-for-attnres", True),
        ("data/train/part.jsonl", True),  # more than one '/'
    ],
)
def test_missing_local_paths_are_told_from_hub_ids(tmp_path, name, missing):
    assert is_missing_local_path(name.format(tmp=tmp_path)) is missing


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "attnres", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "inspect" in result.stdout


def _write(path, payload) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return str(path.parent)
