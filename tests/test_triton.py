"""The fused Triton implementation (`attn_res_implementation="triton"`) against the naive one: its operators alone and
whole models, values and gradients, in fp32 and half precision, Block and Full AttnRes, hidden sizes that are and are
not powers of two, 1 to 9 completed sources, a left-padded batch, one-token decoding, activation checkpointing and
`torch.compile`; and the model without triton, or on a CPU outside the interpreter.

Without a GPU the kernels run under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 before attnres is
imported), on tiny shapes so that the whole file takes about a minute there."""

import copy
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from attnres import AttnResForCausalLM
from attnres.model_sources import REMOTE_CODE_FILES
from attnres.modeling_attnres import (
    AttnResRMSNorm,
    DepthQueries,
    NaiveDepthAttention,
    TritonDepthAttention,
    TwoPhaseDepthAttention,
    depth_attention,
    inverse_rms,
)
from tests.conftest import launches_kernels, requires_fullgraph_compile
from tests.tiny_models import randomize_, tiny_config


pytestmark = pytest.mark.skipif(TritonDepthAttention is None, reason="triton is not installed (pip install triton)")


# The bar for fp32: logits within 1e-4 of the naive implementation, gradients within 1e-3 relative (the
# Frobenius norm of the difference over that of the naive gradient, per tensor). Observed: logits about 1e-6,
# gradients about 1e-6 relative. A wrong term in a backward gives O(1e-1) or more.
FP32_ATOL, FP32_GRAD_RELATIVE = 1e-4, 1e-3
# Half precision, the operators fed the same bf16/fp16 inputs as the naive implementation: both compute in fp32, but
# the two-phase path rounds phase 1's output to the input dtype before the merge (as `two_phase` does), the naive one
# only the merged input, so an output can differ by a few roundings of the input dtype: observed up to 3 bf16 units in
# the last place (2.2e-2 relative, on one of 1200 normalised inputs of magnitude 2). bf16 (8 significant bits): rtol
# 2.5e-2, atol 1e-2; fp16 (11 bits): rtol 5e-3, atol 5e-3; gradients (rounded to the input dtype) within 2e-2 (bf16)
# and 5e-3 (fp16) relative. A wrong term moves them by far more than that.
HALF_TOLERANCES = {
    torch.bfloat16: dict(rtol=2.5e-2, atol=1e-2, grad_relative=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3, grad_relative=5e-3),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


# --- the operators against the naive implementation ------------------------------------------------------------------


def depth_queries(queries: torch.Tensor, key_weights: torch.Tensor) -> DepthQueries:
    """`(Q, D)` pseudo-queries and key-norm scales as the model hands them to an implementation: one tensor each."""
    return DepthQueries(list(queries.split(1)), list(key_weights.unbind()))


def aggregate(implementation, sources, queries, key_weights, partial_sum, norm_weight, fused: bool) -> list:
    """Every aggregation of one block through `implementation`: each query's input, depth weights and normalised
    input (by the fused `merge_norm`, or by `merge` and then `AttnResRMSNorm` as a module)."""
    eps, norm_eps = 1e-6, 1e-5 / 9  # the key eps, and a PreNorm eps divided by n², as the model's are
    reads = implementation.read(sources, inverse_rms(sources, eps), depth_queries(queries, key_weights))
    results = []
    for read in reads:
        if fused:
            results += implementation.merge_norm(read, partial_sum, eps, True, norm_weight, norm_eps)
        else:
            hidden, weights = implementation.merge(read, partial_sum, eps, True)
            norm = AttnResRMSNorm(hidden.shape[-1], norm_eps)
            results += [hidden, weights, torch.func.functional_call(norm, {"weight": norm_weight}, (hidden,))]
    return results


def outputs_and_gradients(implementation, inputs: dict, with_partial: bool, fused: bool):
    """The outputs of `aggregate` and the gradients of a fixed random projection of all of them with respect to every
    input: sources, pseudo-queries, key-norm scales, the partial sum and the norm's weight."""
    leaves = {name: tensor.detach().clone().requires_grad_() for name, tensor in inputs.items()}
    partial_sum = leaves["partial_sum"] if with_partial else None
    outputs = aggregate(
        implementation, leaves["sources"], leaves["queries"], leaves["key_weights"], partial_sum, leaves["norm"], fused
    )
    generator = torch.Generator().manual_seed(1)
    loss = sum((output.float() * torch.randn(output.shape, generator=generator)).sum() for output in outputs)
    loss.backward()
    gradients = {name: leaf.grad for name, leaf in leaves.items() if leaf.grad is not None}
    return [output.detach() for output in outputs], gradients


def random_inputs(num_sources: int, hidden: int, dtype: torch.dtype, tokens=(3, 2), num_queries: int = 4) -> dict:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=generator) * scale

    return {
        "sources": randn(num_sources, *tokens, hidden).to(dtype),
        "queries": randn(num_queries, hidden, scale=0.3),  # large enough that the weights are far from uniform
        "key_weights": 1 + randn(num_queries, hidden, scale=0.3),
        "partial_sum": randn(*tokens, hidden).to(dtype),
        "norm": (1 + randn(hidden, scale=0.3)).to(dtype),
    }


@launches_kernels
@pytest.mark.parametrize("num_sources", [1, 4, 9])
@pytest.mark.parametrize("hidden", [64, 200, 256])
def test_operators_equal_naive_in_fp32(hidden, num_sources):
    """Phase 1 for a block of four queries, then each query's merge with and without a partial sum, fused with its
    RMSNorm, with the depth weights: outputs and every input's gradient against `naive` + `AttnResRMSNorm`."""
    inputs = random_inputs(num_sources, hidden, torch.float32)
    for with_partial in (True, False):
        expected, expected_grads = outputs_and_gradients(NaiveDepthAttention, inputs, with_partial, fused=False)
        actual, grads = outputs_and_gradients(TritonDepthAttention, inputs, with_partial, fused=True)
        for index, (ours, theirs) in enumerate(zip(actual, expected)):
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, index
            torch.testing.assert_close(ours, theirs, rtol=0, atol=FP32_ATOL, msg=f"output {index}")
        assert grads.keys() == expected_grads.keys() == ({*inputs} if with_partial else {*inputs} - {"partial_sum"})
        errors = {name: relative_error(grads[name], grad) for name, grad in expected_grads.items()}
        print(f"[relative-error] hidden {hidden}, {num_sources} sources, partial {with_partial}: {errors}")
        assert max(errors.values()) < FP32_GRAD_RELATIVE, errors


@launches_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_operators_equal_naive_in_half_precision(dtype):
    """bf16/fp16 inputs, fp32 statistics: within one rounding of the input dtype of the naive implementation fed the
    same inputs (see HALF_TOLERANCES), with every output in the dtype the naive one gives."""
    inputs = random_inputs(5, 200, dtype)
    tolerance = HALF_TOLERANCES[dtype]
    for with_partial in (True, False):
        expected, expected_grads = outputs_and_gradients(NaiveDepthAttention, inputs, with_partial, fused=False)
        actual, grads = outputs_and_gradients(TritonDepthAttention, inputs, with_partial, fused=True)
        for index, (ours, theirs) in enumerate(zip(actual, expected)):
            assert ours.dtype == theirs.dtype, (index, ours.dtype, theirs.dtype)
            torch.testing.assert_close(ours, theirs, rtol=tolerance["rtol"], atol=tolerance["atol"])
        errors = {name: relative_error(grads[name], grad) for name, grad in expected_grads.items()}
        print(f"[relative-error] {dtype} partial {with_partial}: {errors}")
        assert max(errors.values()) < tolerance["grad_relative"], errors


@launches_kernels
def test_merge_without_norm_is_two_phase_merge():
    """`merge` (the path for a norm that must be called as a module) gives what `TwoPhaseDepthAttention.merge` gives,
    for the same phase-1 inputs."""
    inputs = random_inputs(3, 64, torch.float32)
    queries = depth_queries(inputs["queries"], inputs["key_weights"])
    args = (inputs["sources"], inverse_rms(inputs["sources"], 1e-6), queries)
    for ours, theirs in zip(TritonDepthAttention.read(*args), TwoPhaseDepthAttention.read(*args)):
        for partial_sum in (inputs["partial_sum"], None):
            for actual, expected in zip(
                TritonDepthAttention.merge(ours, partial_sum, 1e-6, True),
                TwoPhaseDepthAttention.merge(theirs, partial_sum, 1e-6, True),
            ):
                torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


@launches_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hidden", [64, 200])
def test_queries_read_in_place_equal_the_folded_ones(hidden, dtype):
    """Without autograd the kernels read each pseudo-query and key norm where it lives (`phase_one_in_place`, `merge`
    with the key norm) instead of a folded `w ⊙ γ` matrix: the same reads and merges as from the folded queries, up
    to fp32 summation order. Parameters updated in place are read as they are now: the cached table holds their
    addresses, not their values."""
    inputs = random_inputs(6, hidden, dtype, num_queries=3)
    pseudo_queries = [row.to(dtype) for row in inputs["queries"].split(1)]
    key_weights = [row.to(dtype) for row in inputs["key_weights"].unbind()]
    sources, partial_sum, norm = inputs["sources"], inputs["partial_sum"], inputs["norm"]
    inv_rms = inverse_rms(sources, 1e-6)

    def aggregations() -> list:
        queries = DepthQueries(pseudo_queries, key_weights)
        in_place = TritonDepthAttention.read(sources, inv_rms, queries)
        with torch.enable_grad():  # autograd on: the folded queries
            folded = TritonDepthAttention.read(sources, inv_rms, queries)
        assert all(read[-1] is not None for read in in_place) and all(read[-1] is None for read in folded)
        return [
            [TritonDepthAttention.merge_norm(read, partial, 1e-6, True, norm, 1e-6) for partial in (partial_sum, None)]
            for reads in (in_place, folded)
            for read in reads
        ]

    with torch.no_grad():
        for _ in range(2):
            results = aggregations()
            in_place, folded = results[:3], results[3:]
            for ours, theirs in zip(tree_leaves(in_place), tree_leaves(folded)):
                torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
            for parameter in pseudo_queries + key_weights:
                parameter.mul_(-1.5)  # the next round must see the new values
        assert not torch.equal(tree_leaves(aggregations()[0])[0], tree_leaves(in_place)[0])


# --- whole models against the naive implementation -------------------------------------------------------------------


def model_pair(mode: str, hidden: int, **overrides) -> tuple[AttnResForCausalLM, AttnResForCausalLM]:
    """A randomly initialised fp32 model with random pseudo-queries on the naive implementation, and a copy on the
    Triton one."""
    config = tiny_config(mode, hidden_size=hidden, attn_res_implementation="naive", **overrides)
    naive = randomize_(AttnResForCausalLM(config), query_std=0.3).eval()
    fused = copy.deepcopy(naive)
    fused.config.attn_res_implementation = "triton"
    return naive, fused


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows, the last two left-padded, as `generate` batches prompts of different lengths."""
    ids = torch.randint(3, 99, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


def logits_and_gradients(model: AttnResForCausalLM, ids, mask) -> tuple[torch.Tensor, dict]:
    """The logits, and every parameter's gradient of a fixed random projection of the logits and depth weights."""
    model.zero_grad(set_to_none=True)
    output = model(ids, attention_mask=mask, output_depth_attentions=True)
    generator = torch.Generator().manual_seed(3)
    loss = (output.logits * torch.randn(output.logits.shape, generator=generator)).sum()
    loss = loss + sum((w * torch.randn(w.shape, generator=generator)).sum() for w in output.depth_attentions)
    loss.backward()
    parameters = getattr(model, "_orig_mod", model).named_parameters()  # a compiled model's are its original's
    return output.logits.detach(), {name: p.grad for name, p in parameters if p.grad is not None}


MODEL_CASES = [
    pytest.param("block", 64, {"attn_res_block_size": 2}, id="block-bs2-hidden64"),  # blocks of 2, the last shorter
    # blocks of one layer over 8 layers: the output reads 9 completed sources
    pytest.param("block", 200, {"attn_res_block_size": 1, "num_hidden_layers": 8}, id="block-bs1-hidden200"),
    pytest.param("full", 256, {"num_hidden_layers": 4}, id="full-hidden256"),  # 1 to 8 completed sources, + partial
]


@launches_kernels
@pytest.mark.parametrize("mode, hidden, overrides", MODEL_CASES)
def test_model_equals_naive(mode, hidden, overrides):
    naive, fused = model_pair(mode, hidden, **overrides)
    ids, mask = padded_batch()
    expected_logits, expected_grads = logits_and_gradients(naive, ids, mask)
    logits, grads = logits_and_gradients(fused, ids, mask)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=FP32_ATOL)
    assert grads.keys() == expected_grads.keys()
    errors = {name: relative_error(grads[name], grad) for name, grad in expected_grads.items()}
    worst = max(errors, key=errors.get)
    print(f"[max-abs-diff] triton {mode} hidden {hidden} logits: {(logits - expected_logits).abs().max():.3g}")
    print(f"[relative-error] triton {mode} hidden {hidden} gradients: {errors[worst]:.2g} ({worst})")
    assert errors[worst] < FP32_GRAD_RELATIVE, worst
    assert max(g.abs().max().item() for name, g in grads.items() if "res_proj" in name) > 1e-3  # live query grads


@launches_kernels
@pytest.mark.parametrize("family", ["gemma3_text", "qwen2_moe"])
def test_family_graft_equals_naive(family):
    """Grafts built from a family's own modules take the fused kernels too: phase 1 per block and the merge, the
    family's norms called as modules (they are not `AttnResRMSNorm`); values and gradients equal naive's."""
    from tests.test_families import in_memory_graft

    _, naive = in_memory_graft(family, attn_res_implementation="naive")
    randomize_(naive, query_std=0.3)
    fused = copy.deepcopy(naive)
    fused.config.attn_res_implementation = "triton"
    ids, mask = padded_batch()
    expected_logits, expected_grads = logits_and_gradients(naive, ids, mask)
    logits, grads = logits_and_gradients(fused, ids, mask)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=FP32_ATOL)
    errors = {name: relative_error(grads[name], grad) for name, grad in expected_grads.items()}
    worst = max(errors, key=errors.get)
    print(f"[relative-error] triton {family} gradients: {errors[worst]:.2g} ({worst})")
    assert grads.keys() == expected_grads.keys() and errors[worst] < FP32_GRAD_RELATIVE, worst


@launches_kernels
@pytest.mark.parametrize("mode", ["block", "full"])
def test_one_token_decoding_equals_naive(mode):
    """Cached generation from a left-padded batch: each decoding step runs the kernels on one token per row."""
    naive, fused = model_pair(mode, 64)
    ids, mask = padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    kwargs.update(output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected, actual = naive.generate(ids, **kwargs), fused.generate(ids, **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    for step, (ours, theirs) in enumerate(zip(actual.logits, expected.logits)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=FP32_ATOL, msg=f"step {step}")


@launches_kernels
def test_activation_checkpointing_gradients_equal():
    """Recomputed layers read their own phase 1 (two queries) instead of their block's shared one."""
    _, fused = model_pair("block", 64)
    reference = copy.deepcopy(fused)
    fused.train().activation_checkpointing_enable()
    reference.train()
    ids, mask = padded_batch()
    expected_logits, expected_grads = logits_and_gradients(reference, ids, mask)
    logits, grads = logits_and_gradients(fused, ids, mask)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=FP32_ATOL)
    errors = {name: relative_error(grads[name], grad) for name, grad in expected_grads.items()}
    assert max(errors.values()) < FP32_GRAD_RELATIVE, max(errors, key=errors.get)


class OperatorCounter(TorchDispatchMode):
    """Counts the operators dispatched, by name (`attnres::merge`, `aten::mean`, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@launches_kernels
def test_one_phase_one_launch_per_block_and_one_merge_per_sublayer_with_its_norm():
    """Each block's phase 1 is one operator call, and each aggregation's merge, RMSNorm included, another: the
    PreNorm modules are never called as modules. A norm that must be called (here: hooked) is, with the same result."""
    _, fused = model_pair("block", 64, attn_res_block_size=2)  # 5 layers: blocks [0-1], [2-3], [4]
    ids, mask = padded_batch()
    norm_calls = []
    global_hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, *_: norm_calls.append(module) if isinstance(module, AttnResRMSNorm) else None
    )
    try:
        with torch.no_grad(), OperatorCounter() as counter:
            logits = fused(ids, attention_mask=mask).logits
        launches = {name.split("::")[1]: n for name, n in counter.counts.items() if not name.startswith("aten::")}
        # 3 blocks (the output's query joins the last block's phase 1), 10 sublayers + the output; without autograd
        # phase 1 reads the pseudo-queries and key norms in place
        assert launches == {"phase_one_in_place": 3, "merge": 2 * 5 + 1}, launches
        assert norm_calls == []
        hooked = fused.model.layers[1].input_layernorm
        hooked.register_forward_hook(lambda *_: None)
        with torch.no_grad():
            hooked_logits = fused(ids, attention_mask=mask).logits
        assert norm_calls == [hooked]
        torch.testing.assert_close(hooked_logits, logits, rtol=0, atol=1e-5)
    finally:
        global_hook.remove()


@launches_kernels
@requires_fullgraph_compile
def test_compiled_model_equals_eager():
    """`torch.compile(fullgraph=True)` traces the model through the custom operators (their fake implementations),
    forward and backward. The aot_eager backend traces exactly what Inductor would, without generating code."""
    _, fused = model_pair("block", 64)
    ids, mask = padded_batch()
    expected_logits, expected_grads = logits_and_gradients(fused, ids, mask)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    logits, grads = logits_and_gradients(compiled, ids, mask)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    errors = {name: relative_error(grads[name], grad) for name, grad in expected_grads.items()}
    assert max(errors.values()) < 1e-5, max(errors, key=errors.get)


# --- selection, and the model without triton -------------------------------------------------------------------------


def test_auto_is_triton_on_cuda_and_two_phase_elsewhere():
    config = tiny_config(attn_res_implementation="auto")
    assert depth_attention(config, torch.device("cuda", 0)) is TritonDepthAttention
    assert depth_attention(config, torch.device("cpu")) is TwoPhaseDepthAttention
    config.attn_res_implementation = "triton"
    assert depth_attention(config, torch.device("cpu")) is TritonDepthAttention


def run_python(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_asking_for_triton_on_a_cpu_outside_the_interpreter_says_to_use_two_phase(tmp_path):
    code = (
        "import torch\n"
        "from attnres import AttnResConfig, AttnResForCausalLM\n"
        "config = AttnResConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,\n"
        "                       num_attention_heads=4, attn_res_implementation='triton')\n"
        "AttnResForCausalLM(config)(torch.tensor([[5, 6, 7]]))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}  # no TRITON_INTERPRET
    result = run_python(code, tmp_path, env)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("RuntimeError: attn_res_implementation='triton' runs on a GPU"), last_line
    assert "attn_res_implementation='two_phase'" in last_line


WITHOUT_TRITON = r"""
import json, sys
sys.modules["triton"] = None  # importing triton raises ImportError, as where it is not installed
{block_attnres}
import torch
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import check_imports

checkpoint = sys.argv[1]
for name in {files!r}:  # what transformers checks before loading each file of a Hub checkpoint
    check_imports(f"{{checkpoint}}/{{name}}")
model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
modeling = sys.modules[type(model).__module__]
model.config.attn_res_implementation = "triton"
try:
    model(torch.load(sys.argv[2]))
except ImportError as error:
    message = str(error)
report = {{"module": type(model).__module__, "no_triton": modeling.TritonDepthAttention is None, "error": message}}
print(json.dumps(report))
"""


def test_checkpoints_load_and_run_two_phase_without_triton(tmp_path):
    """A checkpoint ships the Triton files as remote code beside the model's; in a process where neither attnres nor
    triton imports, it loads (transformers' import check passes on every file), "auto" runs two_phase, and asking
    for "triton" says how to get it or what to use instead."""
    model = randomize_(AttnResForCausalLM(tiny_config("block")), query_std=0.3).eval()
    model.save_pretrained(tmp_path / "checkpoint")
    assert {path.name for path in (tmp_path / "checkpoint").glob("*.py")} == set(REMOTE_CODE_FILES)
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    code = WITHOUT_TRITON.format(block_attnres='sys.modules["attnres"] = None', files=REMOTE_CODE_FILES)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "checkpoint"), "ids.pt", "logits.pt"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.") and report["no_triton"]
    assert "pip install triton" in report["error"] and "attn_res_implementation='two_phase'" in report["error"]
    with torch.no_grad():
        expected = model(ids).logits  # this process: two_phase too (auto on a CPU)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


@launches_kernels
def test_gpu_benchmark_dry_run(tmp_path, monkeypatch):
    """benchmarks/triton_benchmark.py, written for a GPU, runs every code path on a CPU with --dry-run (tiny shapes,
    the interpreter, aot_eager compilation) and writes its report, so that it is ready whenever a GPU is lent."""
    script = Path(__file__).parent.parent / "benchmarks" / "triton_benchmark.py"
    monkeypatch.syspath_prepend(str(script.parent))  # as `python benchmarks/triton_benchmark.py` has it
    main = runpy.run_path(str(script), run_name="benchmark")["main"]
    main(["--device", "cpu", "--dry-run", "--output", str(tmp_path)])
    report = json.loads((tmp_path / "overhead-cpu-triton-bfloat16.json").read_text())
    [results] = report["results"].values()
    assert set(results) == {
        "prefill 1x8",
        "decode 4+3",
        "decode 4+3 (compiled, static cache)",
        "train step 1x8",
        "operator",
    }
    assert all(set(value) == {"llama", "two_phase", "triton"} for key, value in results.items() if key != "operator")
    table = (tmp_path / "overhead-cpu-triton-bfloat16.md").read_text()
    assert "DRY RUN" in table and "| 96 | train step 1x8 |" in table
