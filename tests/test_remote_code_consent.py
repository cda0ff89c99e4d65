"""Nobody's code runs without consent: the Python a checkpoint ships (config.json `auto_map`) runs in `attnres
inspect`, `eval` and `train` only with `--trust-remote-code`. AttnRes checkpoints load through the installed classes;
a checkpoint whose shipped AttnRes files differ from them gets one line saying so."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from attnres.cli import main
from attnres.model_sources import REMOTE_CODE_FILES
from tests.eval_fixtures import write_model_pair


# Imported as remote code, this module leaves a file behind: the proof that the checkpoint's own code ran.
MARKER_CODE = """
from pathlib import Path

Path({marker!r}).write_text("ran")
"""
FOREIGN_MODELING = """
from transformers import LlamaConfig, LlamaForCausalLM


class ForeignConfig(LlamaConfig):
    model_type = {model_type!r}


class ForeignForCausalLM(LlamaForCausalLM):
    config_class = ForeignConfig
"""


def foreign_checkpoint(source: Path, destination: Path, marker: Path, model_type: str) -> Path:
    """A copy of the Llama checkpoint `source` whose config.json names code of its own (`auto_map`), as a Hub repo
    with custom code does; that code announces itself by writing `marker`."""
    shutil.copytree(source, destination)
    code = MARKER_CODE.format(marker=str(marker)) + FOREIGN_MODELING.format(model_type=model_type)
    (destination / "foreign_modeling.py").write_text(code)
    config = json.loads((destination / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "foreign_modeling.ForeignConfig",
        "AutoModelForCausalLM": "foreign_modeling.ForeignForCausalLM",
    }
    (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("consent")
    baseline, attnres = write_model_pair(root)
    (root / "text.txt").write_text(json.__doc__ * 2)
    return root, baseline, attnres


def inspect(root: Path, model: Path, baseline: Path, output: Path, *extra: str) -> int:
    return main(["inspect", str(model), "--baseline", str(baseline), "--text", str(root / "text.txt"),
                 "--output", str(output), "--max-tokens", "32", *extra])  # fmt: skip


def test_a_known_model_type_runs_transformers_classes_not_the_shipped_code(pair, tmp_path, caplog):
    root, baseline, attnres = pair
    marker = tmp_path / "ran"
    foreign = foreign_checkpoint(baseline, tmp_path / "foreign", marker, model_type="llama")
    with caplog.at_level(logging.WARNING, logger="attnres"):
        assert inspect(root, attnres, foreign, tmp_path / "without") == 0
    assert not marker.exists(), "the checkpoint's own code ran without --trust-remote-code"
    assert "names code of its own (auto_map), which runs only with --trust-remote-code" in caplog.text

    assert inspect(root, attnres, foreign, tmp_path / "with", "--trust-remote-code") == 0
    assert marker.read_text() == "ran"


def test_a_model_defined_only_by_its_own_code_is_refused_without_the_flag(pair, tmp_path, capsys):
    root, baseline, attnres = pair
    marker = tmp_path / "ran"
    foreign = foreign_checkpoint(baseline, tmp_path / "foreign", marker, model_type="foreign-llama")
    expected = "defined only by the Python code it ships (config.json auto_map), which attnres runs only with "
    for command in (
        ["inspect", str(attnres), "--baseline", str(foreign), "--text", str(root / "text.txt"), "--output",
         str(tmp_path / "out")],
        ["eval", "--model", str(attnres), "--baseline", str(foreign), "--tasks", "humaneval", "--output",
         str(tmp_path / "out"), "--allow-code-execution"],
    ):  # fmt: skip
        assert main(command) == 1
        err = capsys.readouterr().err
        assert expected in err and "--trust-remote-code" in err and "Traceback" not in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()

    assert inspect(root, attnres, foreign, tmp_path / "trusted", "--trust-remote-code") == 0
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("command", ["inspect", "train"])
def test_an_attnres_checkpoint_runs_the_installed_code_and_says_when_its_own_differs(pair, tmp_path, caplog, command):
    root, baseline, attnres = pair
    marker = tmp_path / "ran"
    edited = tmp_path / "edited"
    shutil.copytree(attnres, edited)
    modeling = edited / REMOTE_CODE_FILES[1]
    modeling.write_text(MARKER_CODE.format(marker=str(marker)) + modeling.read_text())
    with caplog.at_level(logging.WARNING, logger="attnres"):
        if command == "inspect":
            assert inspect(root, edited, baseline, tmp_path / "without") == 0
        else:
            (root / "text.jsonl").write_text(json.dumps({"text": json.__doc__ * 4}) + "\n")
            assert main(["train", "--model", str(edited), "--dataset", str(root / "text.jsonl"), "--block_size", "32",
                         "--output_dir", str(tmp_path / "trained"), "--max_steps", "1", "--report_to", "none",
                         "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "true"]) == 0  # fmt: skip
    assert not marker.exists(), "the checkpoint's own code ran without --trust-remote-code"
    assert f"ships {REMOTE_CODE_FILES[1]} that differ from those of the installed attnres" in caplog.text
    assert "the installed code runs" in caplog.text


def test_an_unchanged_attnres_checkpoint_loads_silently(pair, tmp_path, caplog):
    root, baseline, attnres = pair
    with caplog.at_level(logging.WARNING, logger="attnres"):
        assert inspect(root, attnres, baseline, tmp_path / "plain") == 0
    assert "differ from those of the installed attnres" not in caplog.text
