"""`attnres convert`: grafting Block/Full AttnRes onto Llama, Mistral, Qwen2 and Qwen3 checkpoints."""

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from attnres import AttnResForCausalLM, paths
from attnres.cli import main
from attnres.convert import graft, verify_graft
from attnres.errors import AttnResError
from attnres.paths import STAGING_MARKER, current_umask, process_identity, staged_directory
from tests.conftest import assert_close, recorded_model_loads, run_cli_on_a_tmpfs
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


def _nest_in_config(depth: int):
    """A field of `depth` nested lists in config.json: past Python's recursion limit for json (100,000), or within it
    but past what transformers' config code recurses through (900)."""

    def nest(src):
        text = (src / "config.json").read_text().rstrip().removesuffix("}")
        (src / "config.json").write_text(f'{text}, "nested": {"[" * depth}{"]" * depth}}}')

    return nest


def _nest_in_index(src):
    _shard_with_index(lambda names: dict.fromkeys(names, "model-00001-of-00001.safetensors"))(src)
    (src / "model.safetensors.index.json").write_text('{"metadata": ' + "[" * 100_000 + "]" * 100_000 + "}")


def _link_carried_file(name: str, target: str):
    """SRC's `name` replaced by a symbolic link to `target` (relative to SRC; a secret file is put there)."""

    def link(src):
        secret = (src / target).resolve()
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text("SECRET: not to be published\n")
        (src / name).unlink(missing_ok=True)
        (src / name).symlink_to(src / target if target.startswith("/") else target)

    return link


def _rename_not_utf8(src):
    renamed = src.with_name(os.fsdecode(b"src-\xff"))
    src.rename(renamed)
    return renamed


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
    "config nested too deeply for JSON": (
        _nest_in_config(100_000),
        [],
        "nests too deeply to be a transformers config",
    ),
    "config nested too deeply for transformers": (_nest_in_config(900), [], "is not a valid llama config"),
    "index nested too deeply": (_nest_in_index, [], "is not a valid safetensors index"),
    "LICENSE links outside SRC": (
        _link_carried_file("LICENSE", "../elsewhere/id_rsa"),
        [],
        "SRC file LICENSE is a symbolic link to",
    ),
    "tokenizer links outside SRC": (
        _link_carried_file("tokenizer.json", "../../secret.json"),
        [],
        "SRC file tokenizer.json is a symbolic link to",
    ),
    "SRC not UTF-8": (_rename_not_utf8, [], "is not a UTF-8 path, and safetensors opens no other"),
}


@pytest.fixture
def default_recursion_limit():
    """Python's default recursion limit, which the nesting cases are sized for: Inductor raises the limit for the rest
    of the process once anything is compiled, and a test that ran `torch.compile` earlier would let transformers read
    a config nested 900 deep."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(limit)


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_input_gives_one_line_error_and_leaves_nothing(tmp_path, capsys, case, default_recursion_limit):
    damage, extra, message = BAD_SOURCES[case]
    make_source(tmp_path / "src")
    source = (damage(tmp_path / "src") if damage else None) or tmp_path / "src"  # some damage renames SRC
    destination = tmp_path / "out" / "dst"
    capsys.readouterr()  # only what the conversion prints
    assert main(["convert", str(source), str(destination), *extra]) == 1
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


def _parent_is_a_file(tmp):
    (tmp / "notes.txt").write_text("mine")
    return tmp / "notes.txt" / "dst"


def _looping_link(tmp):
    (tmp / "loop-a").symlink_to(tmp / "loop-b")
    (tmp / "loop-b").symlink_to(tmp / "loop-a")
    return tmp / "loop-a"


BAD_DESTINATIONS = {
    "parent is a file": (_parent_is_a_file, "notes.txt is a file, not a directory; choose another path"),
    "name of 300 characters": (lambda tmp: tmp / ("d" * 300), "is 300 bytes long, more than the"),
    "parent of 300 characters": (lambda tmp: tmp / ("p" * 300) / "dst", "is 300 bytes long, more than the"),
    "link that loops": (_looping_link, "Too many levels of symbolic links"),
    "parent link that loops": (lambda tmp: _looping_link(tmp) / "dst", "Too many levels of symbolic links"),
    "not UTF-8": (lambda tmp: tmp / os.fsdecode(b"dst-\xff"), "is not a UTF-8 path"),
}


@pytest.mark.parametrize("case", list(BAD_DESTINATIONS))
def test_bad_destination_gives_one_line_error_and_leaves_nothing(tmp_path, capsys, case):
    make_input, message = BAD_DESTINATIONS[case]
    make_source(tmp_path / "src")
    destination = make_input(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "src"), str(destination)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("attnres: error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_destination_name_near_the_length_limit_is_written(tmp_path):
    """A name of 240 bytes is valid; the staging directory next to it, named after it, must be too."""
    make_source(tmp_path / "src")
    destination = tmp_path / ("d" * 240)
    assert main(["convert", str(tmp_path / "src"), str(destination), "--no-progress"]) == 0
    assert (destination / "config.json").is_file() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "options, message",
    [("size=64k", "No space left on device"), ("ro", "Read-only file system")],
    ids=["full disk", "read-only filesystem"],
)
@pytest.mark.parametrize("nested", [False, True], ids=["DST", "DST in missing parents"])
def test_a_full_or_read_only_filesystem_is_one_line_and_leaves_nothing(tmp_path, options, message, nested):
    make_source(tmp_path / "src")
    mount = tmp_path / "mount"
    destination = mount / "a" / "b" / "dst" if nested else mount / "dst"
    result = run_cli_on_a_tmpfs(mount, options, ["convert", str(tmp_path / "src"), str(destination), "--no-progress"])
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.startswith("attnres: error: cannot write DST ") and result.stderr.count("\n") == 1
    assert message in result.stderr and "choose another path" in result.stderr, result.stderr
    assert result.stdout.splitlines()[-1] == "left: "  # no staging directory, no parent it created


def write_safetensors(path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file written by hand from `name: (dtype, shape, raw bytes)`, for dtypes this torch may lack."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(data for _, _, data in tensors.values()))


def read_safetensors(path) -> dict[str, tuple[str, list[int], bytes]]:
    """The tensors of a safetensors file as `name: (dtype, shape, raw bytes)`, read by hand."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__", None)
    start = 8 + length
    return {
        name: (
            entry["dtype"],
            entry["shape"],
            data[start + entry["data_offsets"][0] : start + entry["data_offsets"][1]],
        )
        for name, entry in header.items()
    }


# safetensors dtypes torch has no element size for in every supported release (F8_E8M0: torch 2.7+), and U8
ODD_DTYPES = {"U8": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8, "F8_E8M0": 1}


@pytest.mark.parametrize("dtype", list(ODD_DTYPES))
@pytest.mark.parametrize("cast", [None, "bfloat16"], ids=["copied", "--dtype bfloat16"])
def test_tensors_of_any_dtype_are_carried_through_unchanged(tmp_path, capsys, dtype, cast):
    """A tensor stored as U16, U32, U64, C64 or F8_E8M0 (MXFP4 checkpoints hold U8 blocks and E8M0 scales) keeps its
    dtype and bytes, copied or in a rewritten shard, and counts its bytes in the index's total_size."""
    from safetensors.torch import load_file

    make_source(tmp_path / "src")
    source = tmp_path / "src" / "model.safetensors"
    odd_name = "model.layers.1.mlp.up_proj.weight"
    tensors = {name: ("F32", list(t.shape), t.numpy().tobytes()) for name, t in load_file(source).items()}
    shape = tensors[odd_name][1]
    odd = bytes(range(7, 251)) * (shape[0] * shape[1] * ODD_DTYPES[dtype] // 244 + 1)
    tensors[odd_name] = (dtype, shape, odd[: shape[0] * shape[1] * ODD_DTYPES[dtype]])
    write_safetensors(source, tensors)
    torch_can_read = dtype != "F8_E8M0" or hasattr(torch, "float8_e8m0fnu")
    arguments = ["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--no-progress"]
    capsys.readouterr()
    if cast and not torch_can_read:
        assert main([*arguments, "--dtype", cast]) == 1
        err = capsys.readouterr().err
        assert f"cannot read {odd_name} ({dtype}" in err and "upgrade torch" in err and err.count("\n") == 1, err
        assert not (tmp_path / "dst").exists()
        return
    assert main(arguments + (["--dtype", cast] if cast else [])) == 0
    written = {}
    for shard in (tmp_path / "dst").glob("*.safetensors"):
        written.update(read_safetensors(shard))
    assert written[odd_name] == tensors[odd_name]
    assert {entry[0] for name, entry in written.items() if name != odd_name} == {"BF16" if cast else "F32"}
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(len(data) for _, _, data in written.values())


@pytest.mark.parametrize(
    "file, content",
    [
        ("tokenizer.json", "{not json"),
        ("tokenizer.json", '{"version": "1.0", "model": {"type": "Nonsense"}}'),
        ("tokenizer_config.json", "{not json"),
    ],
    ids=["tokenizer.json not JSON", "tokenizer.json not a tokenizer", "tokenizer_config.json not JSON"],
)
def test_verify_with_bad_tokenizer_files_is_one_line(tmp_path, capsys, file, content):
    make_source(tmp_path / "src")
    (tmp_path / "src" / file).write_text(content)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--verify", "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.out == f"wrote {tmp_path / 'dst'}\n"  # the conversion itself succeeded
    err = captured.err
    assert err.startswith("attnres: error: --verify cannot load the tokenizer") and err.count("\n") == 1, err
    assert "fix SRC's tokenizer files" in err


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


@pytest.mark.parametrize("dtype", [None, "float16"], ids=["copied", "rewritten"])
def test_outputs_have_the_permissions_save_pretrained_gives(tmp_path, dtype):
    """The directory as save_pretrained makes it, and every file as `open` makes one (0644 under umask 022): what
    save_pretrained gave before safetensors 0.8, which writes through a 0600 temporary file."""
    make_source(tmp_path / "src")
    graft(tmp_path / "src", tmp_path / "dst", dtype=dtype, progress=False)
    reference = tmp_path / "reference"
    AttnResForCausalLM(tiny_config()).save_pretrained(reference)
    assert stat.S_IMODE((tmp_path / "dst").stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "dst").iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~current_umask()) and len(modes) > 10


def test_carried_links_that_stay_inside_src_are_copied(tmp_path):
    make_source(tmp_path / "src")
    (tmp_path / "src" / "legal").mkdir()
    (tmp_path / "src" / "LICENSE").rename(tmp_path / "src" / "legal" / "LICENSE.txt")
    (tmp_path / "src" / "LICENSE").symlink_to("legal/LICENSE.txt")
    graft(tmp_path / "src", tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst" / "LICENSE").is_symlink()
    assert (tmp_path / "dst" / "LICENSE").read_text() == "Test license: do what you want.\n"


def test_a_hugging_face_cache_snapshot_is_converted(tmp_path):
    """In huggingface_hub's cache every file of a snapshot is a link to `../../blobs/<hash>`: carried files may point
    there."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    make_source(snapshot)
    (repo / "blobs").mkdir()
    for path in list(snapshot.iterdir()):
        blob = repo / "blobs" / sha256(path)
        path.rename(blob)
        path.symlink_to(f"../../blobs/{blob.name}")
    graft(snapshot, tmp_path / "dst", progress=False)
    assert (tmp_path / "dst" / "LICENSE").read_text() == "Test license: do what you want.\n"
    assert (tmp_path / "dst" / "tokenizer.json").read_bytes() == (snapshot / "tokenizer.json").read_bytes()


def test_a_destination_that_appears_during_the_conversion_is_left_alone(tmp_path, capsys):
    """Without --force, a DST created while the conversion runs is the user's: it is neither replaced nor deleted, and
    the conversion is refused."""
    make_source(tmp_path / "src")
    destination = tmp_path / "dst"

    def create_destination_once_staging():
        while not list(tmp_path.glob(".dst.attnres-staging-*")):
            time.sleep(0.001)
        destination.mkdir()
        (destination / "mine.txt").write_text("mine")

    creator = threading.Thread(target=create_destination_once_staging, daemon=True)
    creator.start()
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "src"), str(destination), "--dtype", "float16", "--no-progress"]) == 1
    creator.join()
    err = capsys.readouterr().err
    assert "DST" in err and "appeared or was filled while this command ran" in err and err.count("\n") == 1, err
    assert [p.name for p in destination.iterdir()] == ["mine.txt"] and (destination / "mine.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


def _created_and_filled(destination):
    destination.mkdir()
    (destination / "mine.txt").write_text("mine")


def _filled(destination):
    (destination / "mine.txt").write_text("mine")


def _a_file(destination):
    destination.write_text("mine")


@pytest.mark.parametrize(
    "existed, appear",
    [(False, _created_and_filled), (True, _filled), (False, _a_file)],
    ids=["created and filled", "empty, then filled", "a file"],
)
def test_staged_output_never_replaces_what_appeared_meanwhile(tmp_path, existed, appear):
    destination = tmp_path / "dst"
    if existed:
        destination.mkdir()  # an empty directory may be replaced (check_replaceable allows it) while it stays empty
    refused = pytest.raises(AttnResError, match="appeared or was filled while this command ran")
    with refused, staged_directory(destination, flag="DST") as staging:
        (staging / "result.txt").write_text("new")
        appear(destination)
    assert (destination / "mine.txt" if destination.is_dir() else destination).read_text() == "mine"
    assert leftovers(tmp_path) == []


def test_an_empty_destination_that_stays_empty_is_replaced(tmp_path):
    (tmp_path / "dst").mkdir()
    with staged_directory(tmp_path / "dst", flag="DST") as staging:
        (staging / "result.txt").write_text("new")
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["result.txt"] and leftovers(tmp_path) == []


@pytest.mark.parametrize("atomic", [True, False], ids=["renameat2", "rename fallback"])
def test_rename_no_replace_refuses_what_is_there(tmp_path, monkeypatch, atomic):
    """renameat2(RENAME_NOREPLACE) refuses anything at the destination; the rename(2) fallback (systems without it)
    refuses files and non-empty directories, and replaces only an empty directory."""
    if atomic and paths.libc_renameat2() is None:
        pytest.skip("this C library has no renameat2")
    if not atomic:
        monkeypatch.setattr(paths, "libc_renameat2", lambda: None)
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "result.txt").write_text("new")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    (tmp_path / "empty").mkdir()
    for taken in ("full", "file") + (("empty",) if atomic else ()):
        with pytest.raises(FileExistsError):
            paths.rename_no_replace(tmp_path / "new", tmp_path / taken)
    assert (tmp_path / "full" / "mine.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    paths.rename_no_replace(tmp_path / "new", tmp_path / "moved")
    assert (tmp_path / "moved" / "result.txt").read_text() == "new" and not (tmp_path / "new").exists()


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
