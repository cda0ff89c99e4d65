"""Training AttnRes models: Trainer (loss, activation checkpointing, resume, remote code in checkpoints), PEFT
(default targets, AttnRes parameters, adapter round trip), `attnres train` (what each --train mode changes,
bad input) and 2-process DDP on CPU."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainingArguments, default_data_collator

from attnres import AttnResForCausalLM
from attnres.cli import main
from attnres.errors import AttnResError
from attnres.peft_support import attnres_lora_config, is_attn_res_parameter
from attnres.training import HAS_ACTIVATION_CHECKPOINTING_FLAGS, AttnResTrainer, parse_arguments, train
from tests.conftest import PEFT_READS_THE_DEPRECATED_FLAG, assert_close, recorded_model_loads
from tests.eval_fixtures import write_model_pair
from tests.tiny_models import randomize_, tiny_config


REPO = Path(__file__).resolve().parents[1]


def token_blocks(count=32, length=16, seed=0):
    """Learnable sequences: each is a repeated random 4-token motif."""
    generator = torch.Generator().manual_seed(seed)
    motifs = torch.randint(3, 99, (count, 4), generator=generator)
    ids = motifs.repeat(1, length // 4)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def trainer_for(model, output_dir, **overrides):
    settings = dict(
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        max_steps=30,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    args = TrainingArguments(output_dir=str(output_dir), **{**settings, **overrides})
    return AttnResTrainer(
        model=model,
        args=args,
        train_dataset=token_blocks(),
        data_collator=default_data_collator,
        attn_res_learning_rate=1e-2,
    )


def held_out_loss(model):
    model.eval()
    batch = default_data_collator(token_blocks(8, seed=0))
    with torch.no_grad():
        return model(**batch).loss.item()


def checkpointing_arguments(options: dict | None) -> dict:
    """TrainingArguments for activation checkpointing with `options`, under the names of the installed release:
    `activation_checkpointing[_kwargs]` from transformers 5.23 on, `gradient_checkpointing[_kwargs]` before."""
    name = "activation_checkpointing" if HAS_ACTIVATION_CHECKPOINTING_FLAGS else "gradient_checkpointing"
    return {name: options is not None, f"{name}_kwargs": options}


@pytest.mark.parametrize(
    "checkpointing",
    [
        None,
        {},
        pytest.param(
            {"every_n_layers": 2, "offload": True},
            marks=pytest.mark.skipif(not HAS_ACTIVATION_CHECKPOINTING_FLAGS, reason="transformers 5.23's options"),
        ),
    ],
    ids=["no checkpointing", "checkpointing", "every 2nd layer, offload"],
)
def test_trainer_lowers_the_loss(tmp_path, checkpointing):
    model = randomize_(AttnResForCausalLM(tiny_config("block")), query_std=0.0)
    before = held_out_loss(model)
    trainer = trainer_for(model, tmp_path, **checkpointing_arguments(checkpointing))
    trainer.train()
    stride = (checkpointing or {}).get("every_n_layers", 1)
    expected = [checkpointing is not None and index % stride == 0 for index in range(5)]
    assert [layer.gradient_checkpointing for layer in model.model.layers] == expected
    assert model.model.offloads_checkpointed_inputs is bool((checkpointing or {}).get("offload"))
    after = held_out_loss(model)
    assert after < before - 0.5, (before, after)
    # the AttnRes parameters learned (their queries start at zero), with their own learning rate
    assert any(p.abs().sum() > 0 for n, p in model.attn_res_parameters().items() if n.endswith("_proj.weight"))
    assert {group["initial_lr"] for group in trainer.optimizer.param_groups} == {1e-2, 3e-3}


def test_resume_from_checkpoint_continues_the_same_run(tmp_path):
    """10 steps in one go == 5 steps, stop, resume from checkpoint-5 for the other 5 (same data order, same state)."""
    straight = randomize_(AttnResForCausalLM(tiny_config("block")), query_std=0.0)
    trainer_for(straight, tmp_path / "straight", max_steps=10).train()

    first = randomize_(AttnResForCausalLM(tiny_config("block")), query_std=0.0)
    trainer_for(first, tmp_path / "run", max_steps=10, save_strategy="steps", save_steps=5).train()
    checkpoint = tmp_path / "run" / "checkpoint-5"
    assert {"configuration_attnres.py", "modeling_attnres.py"} <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]

    resumed_model = randomize_(AttnResForCausalLM(tiny_config("block")), query_std=0.0)
    resumed = trainer_for(resumed_model, tmp_path / "run", max_steps=10)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 10
    for (name, expected), actual in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        assert_close(actual, expected, "fp32", name)


@PEFT_READS_THE_DEPRECATED_FLAG
def test_lora_defaults_match_llama_and_leave_attnres_frozen():
    model = AttnResForCausalLM(tiny_config("block"))
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))
    # the union over the graftable families (Phi-3's fused qkv_proj too); on Llama's modules, Llama's default
    assert set(peft_model.peft_config["default"].target_modules) == {"q_proj", "v_proj", "qkv_proj"}
    wrapped = {name.split(".")[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == {"q_proj", "v_proj"}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@PEFT_READS_THE_DEPRECATED_FLAG
def test_attnres_lora_config_trains_attnres_parameters_fully():
    model = AttnResForCausalLM(tiny_config("block"))
    peft_model = get_peft_model(model, attnres_lora_config(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    attn_res = {n for n in trainable if is_attn_res_parameter(n)}
    # every sublayer's query and key norm (5 layers x 2 sublayers x 2) and the output's (2)
    assert len(attn_res) == 22 and trainable - attn_res == {n for n in trainable if "lora_" in n}


@PEFT_READS_THE_DEPRECATED_FLAG
def test_adapter_save_load_and_merge_give_the_same_logits(tmp_path):
    base = randomize_(AttnResForCausalLM(tiny_config("block")), query_std=0.0)
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, attnres_lora_config(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainer_for(peft_model, tmp_path / "run", max_steps=10).train()
    peft_model.eval()
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    fresh = AttnResForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        assert (fresh(ids).logits - expected).abs().max() > 1e-3  # training changed the function
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert_close(loaded(ids).logits, expected, "exact", "adapter reloaded")
        merged = loaded.merge_and_unload()
        assert_close(merged(ids).logits, expected, "fp32", "merged")


# ------------------------------------------------------------------------------------------------------ attnres train


@pytest.fixture(scope="module")
def graft_and_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    baseline, attnres = write_model_pair(root)
    import inspect
    import json as json_module
    import textwrap

    rows = [{"text": inspect.getsource(module)} for module in (json_module, textwrap, inspect)]
    (root / "text.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root, baseline, attnres


def train_arguments(graft_and_text, output, *extra) -> list[str]:
    root, _, attnres = graft_and_text
    return [
        "--model", str(attnres), "--dataset", str(root / "text.jsonl"), "--block_size", "64",
        "--output_dir", str(output), "--max_steps", "6", "--per_device_train_batch_size", "4", "--learning_rate",
        "1e-2", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def run_train(graft_and_text, output, *extra):
    return main(["train", *train_arguments(graft_and_text, output, *extra)])


@pytest.mark.parametrize(
    "options", [None, '{"every_n_layers": 2, "offload": true}'], ids=["all layers", "5.23 options"]
)
def test_train_cli_takes_the_documented_checkpointing_flag_on_every_release(graft_and_text, tmp_path, options):
    """`--activation_checkpointing` (transformers 5.23's name) works on every supported release, passed on as
    `--gradient_checkpointing` where that is the only name; no FutureWarning; the model loads without Hub kernels.
    `every_n_layers` / `offload` need 5.23: refused in one line before it."""
    extra = ["--activation_checkpointing"] + (["--activation_checkpointing_kwargs", options] if options else [])
    argv = train_arguments(graft_and_text, tmp_path / "out", *extra)
    if options and not HAS_ACTIVATION_CHECKPOINTING_FLAGS:
        with pytest.raises(AttnResError, match=r"every_n_layers and offload need transformers >= 5.23"):
            parse_arguments(argv)
        return
    with warnings.catch_warnings(), recorded_model_loads() as loads:
        warnings.simplefilter("error", FutureWarning)
        trainer, _ = train(*parse_arguments(argv))
    stride = 2 if options else 1
    assert [layer.gradient_checkpointing for layer in trainer.model.model.layers] == [
        i % stride == 0 for i in range(5)
    ]
    assert trainer.model.model.offloads_checkpointed_inputs is bool(options)
    assert loads == [{"use_kernels": False, "kernelized": False}]


def test_train_cli_use_kernels_loads_with_hub_kernels(graft_and_text, tmp_path, capsys):
    argv = train_arguments(graft_and_text, tmp_path / "out", "--use-kernels")
    if importlib.util.find_spec("kernels") is None:  # transformers < 5.25 does not depend on it
        assert main(["train", *argv]) == 1
        assert "--use-kernels needs the kernels package" in capsys.readouterr().err
        return
    with recorded_model_loads() as loads:
        train(*parse_arguments(argv))
    assert loads == [{"use_kernels": True, "kernelized": True}]


def changed_tensors(before: Path, after: Path) -> set[str]:
    old = {k: v for shard in before.glob("*.safetensors") for k, v in load_file(shard).items()}
    new = {k: v for shard in after.glob("*.safetensors") for k, v in load_file(shard).items()}
    assert old.keys() == new.keys()
    return {name for name in old if not torch.equal(old[name], new[name])}


@pytest.mark.parametrize("mode", ["attnres", "lora", "all"])
def test_train_cli_changes_only_the_chosen_parameters(graft_and_text, tmp_path, capsys, mode):
    attnres = graft_and_text[2]
    assert run_train(graft_and_text, tmp_path / "out", "--train", mode) == 0
    assert "validation loss" in capsys.readouterr().out
    changed = changed_tensors(attnres, tmp_path / "out")
    attn_res = {name for name in changed if is_attn_res_parameter(name)}
    # every query that has a choice to make learned (layer 0's attention reads only the embedding: softmax over one
    # source is constant, so its query gets no gradient)
    queries = {f"model.layers.{i}.{kind}_res_proj.weight" for i in range(5) for kind in ("self_attention", "mlp")}
    queries = queries - {"model.layers.0.self_attention_res_proj.weight"} | {"model.output_attn_res_proj.weight"}
    assert queries <= attn_res
    others = changed - attn_res
    if mode == "attnres":
        assert others == set()
    elif mode == "lora":  # merged LoRA deltas land exactly in the targeted projections
        assert others and all(
            name.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
            for name in others
        )
        assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    else:
        assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= others
    assert {"configuration_attnres.py", "modeling_attnres.py"} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_pretrain_from_scratch(graft_and_text, tmp_path):
    """From a config and a tokenizer directory (tokenizer files only, as `tokenizer.save_pretrained` writes them)."""
    root, _, attnres = graft_and_text
    config = json.loads((attnres / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "auto_map"}))
    AutoTokenizer.from_pretrained(attnres).save_pretrained(tmp_path / "tok")
    assert not (tmp_path / "tok" / "config.json").exists()
    rc = main(
        ["train", "--init_config", str(tmp_path / "config.json"), "--tokenizer", str(tmp_path / "tok"),
         "--train", "all",
         "--dataset", str(root / "text.jsonl"), "--block_size", "64", "--output_dir", str(tmp_path / "out"),
         "--max_steps", "3", "--report_to", "none", "--save_strategy", "no", "--use_cpu"]
    )  # fmt: skip
    assert rc == 0 and (tmp_path / "out" / "model.safetensors").is_file()


def _data(tmp_path, name: str, content: bytes) -> str:
    (tmp_path / name).write_bytes(content)
    return str(tmp_path / name)


def _rows(tmp_path, rows: list) -> str:
    return _data(tmp_path, "rows.jsonl", "".join(json.dumps(row) + "\n" for row in rows).encode())


def _without_tokenizer(tmp_path, model: Path) -> str:
    return str(shutil.copytree(model, tmp_path / "no-tokenizer", ignore=shutil.ignore_patterns("tokenizer*")))


def _checkpoints(tmp_path, *names: str) -> str:
    """An --output_dir holding (empty) checkpoint directories: the directory, not one of its checkpoints."""
    for name in names:
        (tmp_path / "run" / name).mkdir(parents=True)
    return str(tmp_path / "run")


BAD_TRAINING_INPUT = {
    "missing dataset": (lambda tmp, root: ["--dataset", "/no/such/corpus.jsonl"], "does not exist"),
    "relative path taken for a Hub id": (lambda tmp, root: ["--dataset", "data/nope.jsonl"], "does not exist"),
    "empty file": (lambda tmp, root: ["--dataset", _data(tmp, "empty.jsonl", b"")], "empty (0 bytes)"),
    "binary file": (lambda tmp, root: ["--dataset", _data(tmp, "bin.jsonl", bytes(range(256)) * 8)], "cannot be read"),
    "null texts": (lambda tmp, root: ["--dataset", _rows(tmp, [{"text": "a b"}, {"text": None}])], "have no 'text'"),
    "numbers for text": (lambda tmp, root: ["--dataset", _rows(tmp, [{"text": 1}, {"text": 2}])], "not text"),
    "no such column": (lambda tmp, root: ["--text_column", "content"], "has no column 'content' (columns: text)"),
    "not an AttnRes model": (lambda tmp, root: ["--model", str(root[1])], "is a 'llama' model, not AttnRes"),
    "block size 0": (lambda tmp, root: ["--block_size", "0"], "--block_size must be at least 2 tokens, got 0"),
    "max blocks 0": (lambda tmp, root: ["--max_blocks", "0"], "--max_blocks must be a positive number"),
    "validation fraction 1.5": (lambda tmp, root: ["--validation_fraction", "1.5"], "must lie in [0, 1), got 1.5"),
    "negative validation fraction": (lambda tmp, root: ["--validation_fraction", "-0.1"], "got -0.1"),
    "output dir is a file": (
        lambda tmp, root: ["--output_dir", _data(tmp, "a-file", b"mine")],
        "exists and is not a directory",
    ),
    "output dir is the model": (
        lambda tmp, root: ["--output_dir", str(root[2])],
        "is --model: training would overwrite",
    ),
    # Each of these was a traceback from transformers or Trainer (some after the model and the data had loaded):
    "model not on the Hub (offline)": (
        lambda tmp, root: ["--model", "some-org/not-there"],
        "--model 'some-org/not-there' is not a local path and could not be downloaded from the Hub",
    ),
    "model without tokenizer": (
        lambda tmp, root: ["--model", _without_tokenizer(tmp, root[2])],
        "has no tokenizer files (tokenizer_config.json, tokenizer.json or vocabulary files); pass --tokenizer",
    ),
    "tokenizer directory without tokenizer": (
        lambda tmp, root: ["--tokenizer", str(tmp)],
        "--tokenizer '{tmp}' has no tokenizer files",
    ),
    "resume from a missing checkpoint": (
        lambda tmp, root: ["--resume_from_checkpoint", str(tmp / "checkpoint-5")],
        "checkpoint-5 does not exist; expected a checkpoint-N directory that Trainer saved (with trainer_state.json)",
    ),
    "resume from a model, not a checkpoint": (
        lambda tmp, root: ["--resume_from_checkpoint", str(root[2])],
        "is not a Trainer checkpoint: expected a checkpoint-N directory that Trainer saved (with trainer_state.json)",
    ),
    "resume from the directory of the checkpoints": (
        lambda tmp, root: ["--resume_from_checkpoint", _checkpoints(tmp, "checkpoint-2", "checkpoint-10")],
        "is not a Trainer checkpoint: expected a checkpoint-N directory that Trainer saved (with trainer_state.json); "
        "did you mean {tmp}/run/checkpoint-10?",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TRAINING_INPUT))
def test_train_bad_input_is_one_line_and_leaves_nothing(graft_and_text, tmp_path, capsys, case):
    make_arguments, message = BAD_TRAINING_INPUT[case]
    (tmp_path / "in").mkdir()
    before = sorted(graft_and_text[2].iterdir())
    assert run_train(graft_and_text, tmp_path / "out", *make_arguments(tmp_path / "in", graft_and_text)) == 1
    err = capsys.readouterr().err
    message = message.format(tmp=tmp_path / "in")
    assert err.strip().splitlines()[-1].startswith("attnres train: error:") and message in err, err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and sorted(graft_and_text[2].iterdir()) == before


def test_ddp_two_processes_on_cpu_keep_replicas_identical(graft_and_text, tmp_path):
    root, _, attnres = graft_and_text
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
        str(REPO / "tests" / "ddp_train.py"), str(tmp_path),
        "--model", str(attnres), "--train", "all", "--dataset", str(root / "text.jsonl"), "--block_size", "64",
        "--output_dir", str(tmp_path / "out"), "--max_steps", "4", "--per_device_train_batch_size", "2",
        "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--ddp_backend", "gloo", "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [(tmp_path / f"rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert reports[0][0] == reports[1][0] == "2"  # a real 2-process world
    assert reports[0][1] == reports[1][1]
