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
    assert [len(sources) for _, sources in report["depth_sources"]] == list(range(1, 12))


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
