"""`attnres convert`: grafting Block/Full AttnRes onto Llama, Mistral, Qwen2 and Qwen3 checkpoints."""

import hashlib
import json
import signal
import stat
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from attnres import AttnResForCausalLM
from attnres.cli import main
from attnres.convert import graft, verify_graft
from attnres.paths import STAGING_MARKER, process_identity
from tests.conftest import assert_close, recorded_model_loads
from tests.test_remote_code import load_as_remote_code
from tests.tiny_models import FAMILIES, family_pair, tiny_config, tiny_tokenizer


CASES = [(family, tied) for family in FAMILIES if family != "llama3-rope-tied" for tied in (False, True)]
CASES.append(("llama3-rope-tied", True))  # Llama-3 rope scaling


def make_source(directory, family: str = "llama", tied: bool = False, **save_kwargs):
    """A random transformers model of `family` saved with a tokenizer, chat template, license file and model card."""
    reference, _ = family_pair(family)
    if tied != reference.config.tie_word_embeddings:
        reference.config.tie_word_embeddings = tied
        reference.tie_weights()  # transformers' own tying, so the source is a genuine tied checkpoint
    reference.save_pretrained(directory, **save_kwargs)
    tiny_tokenizer().save_pretrained(directory)
    (directory / "LICENSE").write_text("Test license: do what you want.\n")
    (directory / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return reference.eval()


def ids_for(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(seed))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def grafted(tmp_path_factory):
    """Every family (tied and untied) converted, then loaded in ONE clean process with trust_remote_code."""
    root = tmp_path_factory.mktemp("grafts")
    cases = {}
    for family, tied in CASES:
        name = f"{family}-{'tied' if tied else 'untied'}"
        reference = make_source(root / f"{name}-src", family, tied)
        graft(root / f"{name}-src", root / f"{name}-dst", num_blocks=2, progress=False)
        cases[name] = reference
    ids = ids_for()
    outputs, reports = load_as_remote_code([root / f"{name}-dst" for name in cases], ids, root)
    assert not any(report["attnres_imported"] for report in reports)
    remote = dict(zip(cases, outputs))
    return root, cases, remote, ids


@pytest.mark.parametrize("family, tied", CASES)
def test_grafted_checkpoint_computes_the_source_model(grafted, family, tied):
    root, cases, remote, ids = grafted
    name = f"{family}-{'tied' if tied else 'untied'}"
    reference = cases[name]
    with torch.no_grad():
        expected = reference(ids).logits
    # Loaded as remote code in a fresh process where `attnres` cannot be imported.
    assert_close(remote[name]["logits"], expected, "fp32", f"convert {name}: remote-code logits vs source")
    expected_tokens = reference.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(remote[name]["generated"], expected_tokens)


def test_graft_carries_tokenizer_chat_template_generation_config_and_license(grafted):
    root, *_ = grafted
    source, destination = root / "llama-untied-src", root / "llama-untied-dst"
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "LICENSE",
    ):
        assert (destination / name).read_bytes() == (source / name).read_bytes(), name
    tokenizer = AutoTokenizer.from_pretrained(destination, trust_remote_code=True)
    assert tokenizer("the cat is on the tree").input_ids == tiny_tokenizer()("the cat is on the tree").input_ids
    messages = [{"role": "user", "content": "hello"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "user: hello\n"
    config = json.loads((destination / "config.json").read_text())
    assert config["model_type"] == "attnres" and config["architectures"] == ["AttnResForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_attnres.AttnResForCausalLM"
    assert (destination / "modeling_attnres.py").is_file() and (destination / "configuration_attnres.py").is_file()


def test_model_card_has_hub_metadata_and_settings(grafted):
    root, *_ = grafted
    card = ModelCard.load(root / "qwen3-untied-dst" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"  # carried from the source's card
    assert {"attnres", "attention-residuals", "custom_code"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local source is not a Hub id
    assert "| blocks | 2 blocks of 3 decoder layer(s)" in card.text
    assert "<!-- attnres:results:start -->" in card.text and "trust_remote_code=True" in card.text


def test_sharded_source_is_copied_not_rewritten(tmp_path):
    reference = make_source(tmp_path / "src", "mistral", max_shard_size="40KB")
    index = json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())
    source_shards = sorted(set(index["weight_map"].values()))
    assert len(source_shards) > 2
    graft(tmp_path / "src", tmp_path / "dst", block_size=2, progress=False)

    new_index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    count = len(source_shards) + 1
    for i, name in enumerate(source_shards, start=1):  # byte-identical copies, renamed
        assert sha256(tmp_path / "src" / name) == sha256(
            tmp_path / "dst" / f"model-{i:05d}-of-{count:05d}.safetensors"
        )
    with safe_open(tmp_path / "dst" / f"model-{count:05d}-of-{count:05d}.safetensors", "pt") as reader:
        assert set(reader.keys()) == {
            key
            for key, file in new_index["weight_map"].items()
            if file.endswith(f"{count:05d}-of-{count:05d}.safetensors")
        }
        assert all("_res_" in key for key in reader.keys())  # noqa: SIM118 (safe_open readers are not dicts)
    assert new_index["metadata"]["total_size"] == index["metadata"]["total_size"] + (2 * 5 + 1) * 2 * 32 * 4

    report = verify_graft(tmp_path / "src", tmp_path / "dst")
    assert report["greedy_identical"] and report["max_abs_logit_diff"] < 1e-5
    del reference


def test_dtype_conversion_rewrites_weights(tmp_path):
    make_source(tmp_path / "src", "qwen2-sliding")
    graft(tmp_path / "src", tmp_path / "dst", dtype="bfloat16", progress=False)
    for shard in (tmp_path / "dst").glob("*.safetensors"):
        with safe_open(shard, "pt") as reader:
            assert {reader.get_slice(key).get_dtype() for key in reader.keys()} == {"BF16"}  # noqa: SIM118
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["dtype"] == "bfloat16"


def test_pickled_source_needs_allow_pickle(tmp_path, capsys):
    reference = make_source(tmp_path / "src", "llama")
    # transformers 5 only writes safetensors: make the legacy pickled layout (pytorch_model.bin) by hand.
    torch.save(reference.state_dict(), tmp_path / "src" / "pytorch_model.bin")
    (tmp_path / "src" / "model.safetensors").unlink()
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 1
    assert "--allow-pickle" in capsys.readouterr().err and not (tmp_path / "dst").exists()
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--allow-pickle", "--no-progress"]) == 0
    from attnres import AttnResForCausalLM

    model = AttnResForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert_close(model(ids_for()).logits, reference(ids_for()).logits, "fp32", "pickled llama graft")


def test_cli_convert_with_verify_and_force(tmp_path, capsys):
    make_source(tmp_path / "src", "qwen3")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 1
    assert "is not empty; choose another path or pass --force" in capsys.readouterr().err
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"

    argv = [
        "convert",
        str(tmp_path / "src"),
        str(tmp_path / "dst"),
        "--force",
        "--mode",
        "full",
        "--verify",
        "--no-progress",
    ]
    with recorded_model_loads() as loads:
        assert main(argv) == 0
    assert loads == [{"use_kernels": False, "kernelized": False}] * 2  # no Hub kernels (transformers 5.25's default)
    out = capsys.readouterr().out
    assert "greedy continuation identical" in out
    assert not (tmp_path / "dst" / "keep.txt").exists()
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["residual_mode"] == "full"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary or backup left


def _truncate_weights(src):
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def _garble_weights(src):
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")


def _drop_config(src):
    (src / "config.json").unlink()


def _remove_a_tensor(src):
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


def _wrong_config(src):
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 40
    (src / "config.json").write_text(json.dumps(config))


def _edit_config(**changes):
    def edit(src):
        config = json.loads((src / "config.json").read_text())
        config.update(changes)
        (src / "config.json").write_text(json.dumps(config))

    return edit


def _write_config(text: str):
    def write(src):
        (src / "config.json").write_text(text)

    return write


def _shard_with_index(weight_map):
    """The weights as a one-shard sharded checkpoint whose index maps the tensors with `weight_map(names)`."""

    def shard(src):
        from safetensors import safe_open

        (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
        with safe_open(src / "model-00001-of-00001.safetensors", "pt") as reader:
            names = list(reader.keys())
        index = {"metadata": {}, "weight_map": weight_map(names)}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))

    return shard


def _pickled_garbage(src):
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a torch file at all")


def _claim_many_layers(src):
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 100_000
    (src / "config.json").write_text(json.dumps(config))


BAD_SOURCES = {
    "missing config": (_drop_config, [], "has no config.json"),
    "config is a list": (_write_config("[]"), [], "must hold a JSON object (a transformers config), not list"),
    "config is null": (_write_config("null"), [], "must hold a JSON object (a transformers config), not NoneType"),
    "config not JSON": (_write_config("{model_type: llama"), [], "is not valid JSON"),
    "model_type a list": (_edit_config(model_type=["llama"]), [], """onto model_type "['llama']": its architecture"""),
    "hidden_size a string": (_edit_config(hidden_size="64"), [], "hidden_size must be a positive integer, got '64'"),
    "zero heads": (_edit_config(num_attention_heads=0), [], "num_attention_heads must be a positive integer, got 0"),
    "unknown rope_type": (_edit_config(rope_scaling={"rope_type": "spiral", "factor": 2.0}), [], "rope"),
    "unknown hidden_act": (_edit_config(hidden_act="wiggle"), [], "hidden_act 'wiggle' is not an activation"),
    "absurd depth": (_claim_many_layers, [], "declares num_hidden_layers=100000 but the weights hold layers 0-4"),
    "index is a list": (_shard_with_index(lambda names: [[n, "x"] for n in names]), [], "'weight_map' must map"),
    "index values not strings": (
        _shard_with_index(lambda names: dict.fromkeys(names, 1)),
        [],
        "'weight_map' must map",
    ),
    "index leaves SRC": (
        _shard_with_index(lambda names: dict.fromkeys(names, "../other/model.safetensors")),
        [],
        "outside SRC; an index may only name files beside it",
    ),
    "index absolute path": (
        _shard_with_index(lambda names: dict.fromkeys(names, "/etc/passwd")),
        [],
        "outside SRC",
    ),
    "garbage pickle": (_pickled_garbage, ["--allow-pickle"], "is not a readable PyTorch weights file"),
    "truncated safetensors": (_truncate_weights, [], "not a valid safetensors file (corrupt or truncated?)"),
    "corrupt safetensors": (_garble_weights, [], "not a valid safetensors file"),
    "tensor missing": (_remove_a_tensor, [], "lacks 1 tensor(s) the model needs"),
    "config disagrees with weights": (_wrong_config, [], "wrong shape for config.json"),
    "more blocks than layers": (
        None,
        ["--num-blocks", "9"],
        "--num-blocks must be between 1 and the source's number of layers (5)",
    ),
    "block size zero": (None, ["--block-size", "0"], "--block-size must be between 1"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_input_gives_one_line_error_and_leaves_nothing(tmp_path, capsys, case):
    damage, extra, message = BAD_SOURCES[case]
    make_source(tmp_path / "src")
    if damage:
        damage(tmp_path / "src")
    destination = tmp_path / "out" / "dst"
    capsys.readouterr()  # only what the conversion prints
    assert main(["convert", str(tmp_path / "src"), str(destination), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("attnres: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # not even the parent it would have created


def test_unsupported_architectures_are_refused_with_the_reason(tmp_path, capsys):
    OPTForCausalLM(
        OPTConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=37,
            num_attention_heads=4,
            max_position_embeddings=64,
            do_layer_norm_before=False,
        )
    ).save_pretrained(tmp_path / "opt")
    assert main(["convert", str(tmp_path / "opt"), str(tmp_path / "dst")]) == 1
    err = capsys.readouterr().err
    assert "cannot graft AttnRes onto model_type 'opt'" in err and "post-norm" in err
    assert "Supported: llama, mistral, qwen2, qwen3" in err and not (tmp_path / "dst").exists()


def test_destination_inside_source_and_missing_source(tmp_path, capsys):
    make_source(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "src" / "grafted")]) == 1
    assert "is inside SRC" in capsys.readouterr().err
    assert not (tmp_path / "src" / "grafted").exists()
    assert main(["convert", str(tmp_path / "nowhere" / "model"), str(tmp_path / "dst")]) == 1
    assert "does not exist (expected a checkpoint directory, a .gguf file or a Hub id)" in capsys.readouterr().err
    # A well-formed Hub id while offline (tests run with HF_HUB_OFFLINE=1): the Hub's reason, in one line.
    assert main(["convert", "some-org/some-model", str(tmp_path / "dst")]) == 1
    err = capsys.readouterr().err
    assert "is not a local path and could not be downloaded from the Hub" in err and err.count("\n") == 1
    assert not (tmp_path / "dst").exists()


def test_block_and_size_flags_are_exclusive(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "a", "b", "--num-blocks", "2", "--block-size", "2"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "body", [b"\0" * 64, b"\x03\x00\x00\x00" + b"\xff" * 60], ids=["zeros", "valid magic and version, bad body"]
)
def test_unreadable_gguf_is_a_clear_error(tmp_path, capsys, body):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF" + body)
    assert main(["convert", str(source), str(tmp_path / "missing" / "parent" / "dst")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("attnres: error: cannot read model.gguf") and error.count("\n") == 1, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # not even the parents it created


# --- where the output goes -------------------------------------------------------------------------------------------


def leftovers(directory) -> list[str]:
    """Staging, backup or dequantization directories left next to an output."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("force", [False, True])
def test_a_destination_that_is_a_symlink_is_followed(tmp_path, force):
    make_source(tmp_path / "src")
    target = tmp_path / "elsewhere" / "graft"
    target.mkdir(parents=True)
    if force:
        (target / "old.txt").write_text("replaced")
    (tmp_path / "link").symlink_to(target)
    arguments = ["convert", str(tmp_path / "src"), str(tmp_path / "link"), "--no-progress"]
    assert main(arguments + (["--force"] if force else [])) == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link").resolve() == target.resolve()
    assert (target / "config.json").is_file() and not (target / "old.txt").exists()
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "elsewhere") == []


def test_outputs_have_the_permissions_save_pretrained_gives(tmp_path):
    make_source(tmp_path / "src")
    graft(tmp_path / "src", tmp_path / "dst", progress=False)
    reference = tmp_path / "reference"
    AttnResForCausalLM(tiny_config()).save_pretrained(reference)
    assert stat.S_IMODE((tmp_path / "dst").stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


@pytest.mark.parametrize("destination", [".", ".."], ids=["working directory", "its parent"])
def test_the_working_directory_and_its_parents_are_refused(tmp_path, monkeypatch, capsys, destination):
    make_source(tmp_path / "src")
    work = tmp_path / "projects" / "work"
    work.mkdir(parents=True)
    (work / "mine.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert main(["convert", str(tmp_path / "src"), destination, "--force"]) == 1
    assert "is the working directory or one of its parents" in capsys.readouterr().err
    assert (work / "mine.txt").read_text() == "mine"


def test_staging_directories_of_dead_processes_are_removed(tmp_path):
    """SIGKILL leaves a staging directory behind; the next run for the same destination removes it, and only it: not
    one whose process still runs, nor a directory without the marker."""
    make_source(tmp_path / "src")
    identify = "import json; from attnres.paths import process_identity; print(json.dumps(process_identity()))"
    finished = subprocess.run([sys.executable, "-c", identify], capture_output=True, text=True)  # then it is gone
    stale, alive, unmarked = (tmp_path / f".dst.attnres-staging-{name}" for name in ("stale", "alive", "unmarked"))
    for directory, owner in ((stale, json.loads(finished.stdout)), (alive, process_identity())):
        directory.mkdir()
        (directory / STAGING_MARKER).write_text(json.dumps(owner))
    unmarked.mkdir()
    graft(tmp_path / "src", tmp_path / "dst", progress=False)
    assert not stale.exists() and alive.exists() and unmarked.exists()


TERMINATE_WHEN_STAGING = """
import os, signal, sys, threading, time
from pathlib import Path
from attnres.cli import main

source, destination = Path(sys.argv[1]), Path(sys.argv[2])

def terminate_once_staging():
    while not list(destination.parent.glob(f".{destination.name}.attnres-staging-*")):
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=terminate_once_staging, daemon=True).start()
sys.exit(main(["convert", str(source), str(destination), "--dtype", "float16", "--no-progress"]))
"""


def test_sigterm_mid_conversion_cleans_up_without_a_traceback(tmp_path):
    # big enough (random weights, vocabulary 32,000) that the conversion is still running when the signal arrives
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    (tmp_path / "out").mkdir()
    result = subprocess.run(
        [sys.executable, "-c", TERMINATE_WHEN_STAGING, str(tmp_path / "src"), str(tmp_path / "out" / "dst")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "attnres: terminated" and "Traceback" not in result.stderr
    assert list((tmp_path / "out").iterdir()) == []
