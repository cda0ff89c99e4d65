"""What the AttnRes path costs, counted rather than timed (`tests/launch_budget.py` defines the counts): operator
launches and bytes that Block AttnRes (N = 8, hidden 256, 16 layers, fp32) adds to transformers' Llama with the same
weights, per sublayer, for one eager decode step and one training step; bytes per token in d-vectors.

The bounds are today's `two_phase` counts, rounded up (decode +13.34 launches and +20.85·d, training step +44.44 and
+53.53·d: the issue's 'before'), so that nothing makes the path dearer unnoticed; issue 25's budget (decode 7 / 10·d,
training 28 / 30·d) is the next step. The fused Triton path is counted by the same tool (`python -m
tests.launch_budget --implementation triton`), too slow under Triton's interpreter to run here at this size."""

import pytest

from tests.launch_budget import BudgetSetting, measure


TODAY = {  # (launches, bytes in d-vectors per token), per sublayer, beyond Llama
    "decode": (13.5, 21.0),
    "train": (44.5, 53.6),
}


@pytest.fixture(scope="module")
def two_phase():
    return measure(BudgetSetting())


@pytest.mark.parametrize("step", list(TODAY))
def test_two_phase_costs_no_more_than_today(two_phase, step):
    extra = two_phase[step]
    launches, moved = TODAY[step]
    print(
        f"[budget] {step}: +{extra.launches:.2f} launches per sublayer ({extra.launch_ratio:.2f}x Llama's step), "
        f"+{extra.bytes_per_token:.2f} d per token per sublayer; largest: {extra.operators()[:6]}"
    )
    assert extra.launches > 1 and extra.bytes_per_token > 1, "the counts do not see the AttnRes path"
    assert extra.launches <= launches, extra.operators()
    assert extra.bytes_per_token <= moved, extra.operators()
