"""Shared fixtures, tiny model factories and the tolerance table of the test suite."""

import contextlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from packaging.version import Version


# The fused Triton kernels (attn_res_implementation="triton") run on CPU tensors under Triton's interpreter, which
# triton reads when it decorates kernels, its own included: set here, before anything imports triton (transformers
# does, so this module imports transformers only inside functions). On a machine with a GPU the kernels compile for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `torch.compile(fullgraph=True)` of a transformers model traces transformers' own forward decorators, which torch
# 2.6's dynamo cannot (`merge_with_config_defaults` reads `func.__code__`); tested from torch 2.13 on.
requires_fullgraph_compile = pytest.mark.skipif(
    Version(torch.__version__).release < (2, 13), reason="fullgraph compile of transformers models needs torch >= 2.13"
)
# FSDP2 on CPU (gloo): torch 2.6's CPU stream has no `record_event`, which `fully_shard`'s hooks call; tested on 2.13.
requires_fsdp2_on_cpu = pytest.mark.skipif(
    Version(torch.__version__).release < (2, 13), reason="FSDP2 on CPU needs torch >= 2.13 (2.6: no record_event)"
)

# PEFT (0.21) reads `model.is_gradient_checkpointing`, deprecated since transformers 5.23: a FutureWarning from PEFT's
# code, not this project's, for tests that call `get_peft_model` themselves (`attnres train` silences it itself).
PEFT_READS_THE_DEPRECATED_FLAG = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)


def triton_runs_kernels_here() -> bool:
    """Whether triton is installed and runs the fused kernels here: on a GPU any release does; on a CPU its interpreter
    must run loops to runtime bounds, which that of triton 3.2 (torch 2.6's pin, the lowest CI environment) cannot.
    Tested: 3.9. Read from the package metadata: importing triton here would come before TRITON_INTERPRET is read."""
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return False
    return torch.cuda.is_available() or Version(version).release >= (3, 9)


launches_kernels = pytest.mark.skipif(
    not triton_runs_kernels_here(),
    reason="needs triton; on a CPU its interpreter from 3.9 on (3.2's cannot run loops to runtime bounds)",
)

# Every numeric comparison in the suite uses one of these. Why each is what it is:
TOLERANCES = {
    # Same operations in the same order (save/load, remote code, activation checkpointing, offloading): bit-identical.
    "exact": dict(rtol=0.0, atol=0.0),
    # fp32, same math with sums grouped differently (zero-query AttnRes vs PreNorm: mean of sources vs running sum;
    # cached vs full attention; sdpa vs eager). Observed max 2e-6 on O(1) logits; 1e-5 leaves 5x headroom and still
    # fails if the PreNorm eps is not rescaled (that alone moves the logits by 4.5e-5 on the tiny models).
    "fp32": dict(rtol=1e-5, atol=1e-5),
    # fp32, one model with random pseudo-queries whose reductions are grouped differently: sdpa vs eager attention,
    # layers that compute their own phase 1 (offloaded by accelerate) vs a block's shared one, or Inductor's fused
    # kernels vs the eager operators. Each path is within about 7e-6 of the naive implementation; in opposite
    # directions they differ by up to 1.3e-5 (torch 2.6; compiled vs eager on 2.13) on O(3) logits. Still below the
    # 4.5e-5 that an unrescaled PreNorm eps alone causes.
    "fp32_regrouped": dict(rtol=1e-5, atol=3e-5),
    # fp32, a family graft vs its source (tests/test_families.py), as the largest difference relative to the largest
    # logit: the issue's definition of exact. Gemma 2's four (1 + w) norms per layer amplify the regrouped sums to
    # 1.6e-5 absolute on logits of 5 (3e-6 relative); without eps / n² the difference is above 1e-4.
    "fp32_graft_relative": 1e-5,
    # fp32, cached decoding (one token at a time) vs one full forward: attention kernels reduce over different shapes
    # at every one of the 10 sublayers, and the random pseudo-queries amplify it; observed up to 1.06e-5 on O(3) logits
    # on this project's CPU. A cache that is dropped or misread moves the logits by O(0.1-1).
    "fp32_cache": dict(rtol=1e-5, atol=5e-5),
    # fp32, model vs the naive loop of reference_attnres.py: block sums are re-added from scratch and the softmax is
    # a separate einsum, so rounding differs more (observed max 1.2e-5 on logits up to 4). A wrong source set or
    # wrong query moves logits by O(0.1-1); the depth weights themselves are compared at "fp32".
    "fp32_reference": dict(rtol=1e-5, atol=5e-5),
    # fp32 gradients with and without activation checkpointing: under checkpointing each layer recomputes its own
    # phase 1 (two queries) instead of sharing its block's (four), so BLAS groups the sums differently.
    "fp32_grad": dict(rtol=1e-3, atol=1e-4),
    # relative Frobenius error of a whole gradient tensor, for gradients too large for elementwise fp32 tolerances
    "fp32_grad_relative": 1e-4,
    # the same for a family graft with random pseudo-queries (tests/test_families.py): Gemma 3's embedding gradient
    # sums every position through (1 + w) norms and soft-capping; observed 1.6e-4 on transformers 5.4. A layer whose
    # recompute lost its gradient path would be off by O(1).
    "fp32_family_grad_relative": 1e-3,
    # bf16/fp16 model vs the same model in fp32, as the relative Frobenius error of the logits: bf16 keeps 8 mantissa
    # bits (0.4% rounding per op), which accumulates to about 3% over the 10 sublayers of the tiny models (fp16: 0.3%).
    "half_relative": 5e-2,
}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _offline_hf_home(tmp_path_factory):
    """Tests never touch the network nor the user's Hugging Face cache."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    yield


def assert_close(actual: torch.Tensor, expected: torch.Tensor, kind: str, what: str = "") -> float:
    """`torch.testing.assert_close` with a tolerance from TOLERANCES; returns the max abs difference so tests can
    report it (the issue notes quote these)."""
    actual, expected = actual.detach().float(), expected.detach().float()
    max_diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, **TOLERANCES[kind], msg=lambda m: f"{what}: max|diff|={max_diff:.3g}\n{m}"
    )
    print(f"[max-abs-diff] {what}: {max_diff:.3g}")
    return max_diff


@contextlib.contextmanager
def recorded_model_loads() -> Iterator[list[dict]]:
    """Every model `from_pretrained` made within the block, as `{"use_kernels": what the caller passed (or "absent"),
    "kernelized": the loaded model's use_kernels}`: transformers' own method runs, this only records around it."""
    from transformers import PreTrainedModel

    loads = []
    original = PreTrainedModel.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        loaded = original(cls, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        loads.append({"use_kernels": kwargs.get("use_kernels", "absent"), "kernelized": bool(model.use_kernels)})
        return loaded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PreTrainedModel, "from_pretrained", classmethod(recording))
        yield loads


# Run in a private mount namespace: mount a fresh tmpfs with the options $1 on $2, run the rest, list what is left.
ON_A_TMPFS = (
    'mount -t tmpfs -o "$1" attnres-test "$2" || exit 97; m=$2; shift 2; "$@"; rc=$?; echo "left: $(ls -A "$m")"; '
    "exit $rc"
)


def run_cli_on_a_tmpfs(mount_point: Path, options: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`attnres ARGV` in a child process that sees a fresh tmpfs, mounted with `options` (`size=64k`: a disk that is
    soon full; `ro`: a read-only filesystem), on `mount_point`; its stdout ends with `left: ` and the names left on
    that filesystem. The mount lives in a private mount namespace (unshare(1), as a user namespace's root when not
    root), so it vanishes with the child, needs no privileges and fails for root too (a read-only mode bit does not
    stop root). Skipped where unshare is missing or not allowed (user namespaces disabled)."""
    unshare = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    if shutil.which("unshare") is None or subprocess.run([*unshare, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare(1) and a private mount namespace to mount a full or read-only filesystem")
    mount_point.mkdir(parents=True, exist_ok=True)
    command = [*unshare, "sh", "-c", ON_A_TMPFS, "sh", options, str(mount_point), sys.executable, "-m", "attnres"]
    result = subprocess.run([*command, *argv], capture_output=True, text=True, timeout=600)
    assert result.returncode != 97, f"mounting a tmpfs failed: {result.stderr}"
    return result
