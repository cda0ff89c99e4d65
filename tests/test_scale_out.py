"""Scaling out on the engines users run, with 2 CPU processes (torchrun, gloo): FSDP2 sharded per decoder layer trains
as one process does and saves a checkpoint that plain `from_pretrained` loads; `attnres train --fsdp` refuses to fall
back to DDP; `attnres eval` splits lm-eval's requests across processes and writes the one-process report."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TOLERANCES, assert_close, requires_fsdp2_on_cpu
from tests.distributed_setup import PROBE, make_model, run_steps
from tests.test_remote_code import load_as_remote_code


REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), *arguments]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@requires_fsdp2_on_cpu
@pytest.mark.parametrize(
    "mode, checkpointing",
    [("block", True), ("block", False), ("full", True), ("phi3", True), ("qwen3_moe", False)],
)
def test_fsdp2_sharded_per_decoder_layer_trains_like_one_process(tmp_path, mode, checkpointing):
    """`fully_shard` on each decoder layer and the root: a layer's parameters exist only inside its own forward, so
    every layer reads its own phase 1 there (the model batches a block's phase 1 only where it holds the parameters).
    Same initial weights, same global batches, 4 AdamW steps: the losses and final parameters of the 2-process
    FSDP run equal those of one process, and its gathered checkpoint loads as remote code with the same logits. Also
    for grafts built from a family's own modules (Phi-3's fused projections, Qwen3-MoE's experts)."""
    torchrun(str(REPO / "tests" / "fsdp_train.py"), str(tmp_path), mode, str(int(checkpointing)), cwd=tmp_path)
    fsdp_losses = json.loads((tmp_path / "losses.json").read_text())
    fsdp = torch.load(tmp_path / "result.pt")

    model = make_model(mode, checkpointing)
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    losses = run_steps(model, lambda batch: batch, lambda loss: loss.item())
    print(f"[losses] {mode} checkpointing={checkpointing}: one process {losses}, FSDP {fsdp_losses}")
    if mode in ("block", "full"):
        assert losses[-1] < losses[0] - 0.2  # it trains
    else:  # the randomised family models are not tuned to learn in 4 steps: that the steps moved them must do
        moved = sum((tensor - initial[name]).norm() ** 2 for name, tensor in model.state_dict().items()) ** 0.5
        assert moved > 1e-3 * sum(tensor.norm() ** 2 for tensor in initial.values()) ** 0.5
    assert_close(torch.tensor(fsdp_losses), torch.tensor(losses), "fp32_reference", "FSDP vs one-process losses")
    # Per tensor, relative: sharded gradients are reduced in another order, and Adam's normalised steps carry that on.
    expected = model.state_dict()
    errors = {
        name: ((tensor - expected[name]).norm() / expected[name].norm()).item()
        for name, tensor in fsdp["state_dict"].items()
    }
    worst = max(errors, key=errors.get)
    print(f"[relative-error] FSDP vs one process, final parameters: {errors[worst]:.2g} ({worst})")
    assert expected.keys() == fsdp["state_dict"].keys() and errors[worst] < TOLERANCES["fp32_grad_relative"], worst

    [remote], _ = load_as_remote_code([tmp_path / "checkpoint"], PROBE, tmp_path)
    assert_close(remote["logits"], fsdp["probe_logits"], "fp32", "FSDP logits vs its checkpoint loaded as remote code")


@pytest.fixture(scope="module")
def eval_workspace(tmp_path_factory):
    from tests.eval_fixtures import write_benchmark_data, write_model_pair

    root = tmp_path_factory.mktemp("dp-eval")
    baseline, attnres = write_model_pair(root)
    return root, baseline, attnres, write_benchmark_data(root / "data")


def eval_command(workspace, output: str) -> list[str]:
    root, baseline, attnres, data = workspace
    return [
        *("-m", "attnres", "eval", "--model", str(attnres), "--baseline", str(baseline), "--data-dir", str(data)),
        *("--tasks", "mmlu,humaneval,minerva_math", "--allow-code-execution", "--output", str(root / output)),
        *("--dtype", "float32", "--batch-size", "4", "--max-gen-toks", "12", "--no-cache", "--device", "cpu"),
    ]


def test_data_parallel_eval_writes_the_one_process_report(eval_workspace):
    """`torchrun -m attnres eval`: each process answers its share of lm-eval's requests (HFLM's own split, which it
    turns on only for several GPUs; `split_requests_across_processes` turns it on for any device), and the first
    writes one report, equal to the one-process report."""
    root = eval_workspace[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_ALLOW_CODE_EVAL": "1"}
    one = subprocess.run([sys.executable, *eval_command(eval_workspace, "one")], capture_output=True, text=True,
                         timeout=900, env=env, cwd=root)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    parallel = torchrun(*eval_command(eval_workspace, "parallel"), cwd=root)
    # every process answered only part of the requests (24 loglikelihood requests in all, for each model)
    answered = [
        int(total) for total in re.findall(r"loglikelihood requests: 100%\|[^|]*\| \d+/(\d+)", parallel.stderr)
    ]
    assert answered and max(answered) < 24, answered

    reports = {name: json.loads((root / name / "results.json").read_text()) for name in ("one", "parallel")}
    assert reports["parallel"]["comparison"] == reports["one"]["comparison"]
    for model in ("baseline", "attnres"):
        records = {}
        for name in ("one", "parallel"):
            lines = (root / name / f"samples-{model}.jsonl").read_text().splitlines()
            records[name] = {(r["task"], r["doc_id"]): r for r in map(json.loads, lines)}
        assert records["parallel"].keys() == records["one"].keys()
        for key, expected in records["one"].items():
            actual = records["parallel"][key]
            assert actual["metrics"] == expected["metrics"], key
            if key[0].startswith("mmlu"):  # loglikelihoods: batched with other documents, rounded differently
                ours, theirs = ([r[0][0] for r in record["resps"]] for record in (actual, expected))
                assert_close(torch.tensor(ours), torch.tensor(theirs),
                             "fp32", f"{model} {key} loglikelihoods")  # fmt: skip
            else:
                assert actual["resps"] == expected["resps"], key  # generated text: identical


def test_train_refuses_fsdp_where_transformers_would_fall_back_to_ddp(eval_workspace, tmp_path):
    """On CPUs, transformers' Trainer trains `--fsdp` with DDP without a word (and refuses it in one process):
    `attnres train` says so and stops instead."""
    root, _, attnres, _ = eval_workspace
    (root / "text.jsonl").write_text(json.dumps({"text": json.__doc__ * 20}) + "\n")
    arguments = [
        *("train", "--model", str(attnres), "--dataset", str(root / "text.jsonl"), "--block_size", "64"),
        *("--max_steps", "2", "--report_to", "none", "--save_strategy", "no", "--use_cpu"),
        *("--fsdp", "full_shard", "--ddp_backend", "gloo"),
    ]
    one_process = subprocess.run([sys.executable, "-m", "attnres", *arguments, "--output_dir", str(tmp_path / "one")],
                                 capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one_process.returncode == 1 and "attnres train: error:" in one_process.stderr, one_process.stderr[-2000:]
    assert "Traceback" not in one_process.stderr
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    command = [*launcher, "-m", "attnres", *arguments, "--output_dir", str(tmp_path / "two")]
    two = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert two.returncode != 0
    assert "--fsdp was given, but Trainer would train on the CPU without it" in two.stderr, two.stderr[-3000:]
    assert not (tmp_path / "two").exists() or not any((tmp_path / "two").iterdir())
