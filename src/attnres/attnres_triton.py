# Copyright 2026 The attnres authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""`attn_res_implementation="triton"`: the two-phase computation as fused Triton kernels, behind the same interface
as `NaiveDepthAttention` and `TwoPhaseDepthAttention` in `modeling_attnres.py` (shipped with it as remote code: one
file, which modeling_attnres.py imports directly, because transformers 5.4 copies only a checkpoint's direct
relative imports).

The kernels' math is that of `phase_one` / `TwoPhaseDepthAttention` (the reference is `naive_depth_attention`):
every statistic (logits, log-sum-exp, 1/rms, softmax weights) in fp32 whatever the input dtype, and outputs rounded
to the input dtype exactly where the eager implementation rounds them, so that both compute the same function.

Each kernel launch is one PyTorch custom operator (`torch.library.custom_op` with a fake implementation and a
registered backward), so that `torch.compile(fullgraph=True)` traces a model through them and profilers and launch
counters see one operator per launch:

- `phase_one`: a whole block's queries against its completed sources, with the log-sum-exps and logits phase 2 needs
  (`phase_one_backward` and `query_grad` are its backward);
- `merge`: one sublayer's phase 2, the online-softmax merge with the running partial sum, fused with the PreNorm
  RMSNorm that reads the result and, when asked, the depth weights (`merge_backward` is its backward).

Why custom operators rather than `torch.library.triton_op`: a `triton_op` lets Inductor look inside the kernel, but
under TRITON_INTERPRET=1, how this project's CPU tests run the kernels, `wrap_triton` does not recognise the
interpreted kernels and tracing fails; an opaque custom operator traces the same way on a GPU and on the interpreter.
"""

import functools
import hashlib
import typing

import torch


# --- kernels ---------------------------------------------------------------------------------------------------------
# Shapes, with `T` the tokens (batch x sequence, flattened), `N` completed sources, `Q` queries, `D` the hidden
# size: sources `(N, T, D)`, their `1/rms` `(N, T)`, queries `(Q, D)` (the pseudo-query times the key norm's scale),
# phase 1's outputs `(Q, T, D)`, log-sum-exps `(Q, T)` and logits `(Q, N, T)`. Every size is a runtime argument except
# the power-of-two tiles, so one compiled kernel serves every sequence length and source count of a bucket.

try:  # transformers' remote-code import check skips imports inside `try`: a checkpoint must load without triton
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError(f"attn_res_implementation='triton' needs triton (pip install triton): {error}") from error


@triton.jit
def load_queries(
    queries,
    first_pseudo_query,
    first_key_weight,
    num_queries,
    hidden,
    features,
    feature_mask,
    IN_PLACE: tl.constexpr,
    QP: tl.constexpr,
):
    """The `(QP, BD)` chunk `features` of a block's queries `w ⊙ γ`, fp32: rows of the folded matrix, or (IN_PLACE)
    each aggregation's pseudo-query times its key-norm scale, read where the parameters live through `queries`, a
    table of their addresses (the `Q` pseudo-queries, then the `Q` scales; the first of each, passed as a pointer,
    gives their element types)."""
    query_ids = tl.arange(0, QP)
    query_mask = query_ids < num_queries
    mask = query_mask[:, None] & feature_mask[None, :]
    if IN_PLACE:
        pseudo_queries = tl.load(queries + query_ids, mask=query_mask, other=0)
        key_weights = tl.load(queries + num_queries + query_ids, mask=query_mask, other=0)
        pseudo_queries = pseudo_queries.to(tl.pointer_type(first_pseudo_query.dtype.element_ty))
        key_weights = key_weights.to(tl.pointer_type(first_key_weight.dtype.element_ty))
        pseudo_query = tl.load(pseudo_queries[:, None] + features[None, :], mask=mask, other=0.0).to(tl.float32)
        key_weight = tl.load(key_weights[:, None] + features[None, :], mask=mask, other=0.0).to(tl.float32)
        return pseudo_query * key_weight
    return tl.load(queries + query_ids[:, None] * hidden + features[None, :], mask=mask, other=0.0)


@triton.jit
def phase_one_forward_kernel(
    sources,
    inv_rms,
    queries,
    outputs,
    logsumexp,
    logits,
    first_pseudo_query,
    first_key_weight,
    num_sources,
    num_queries,
    num_tokens,
    hidden,
    source_stride,
    token_stride,
    IN_PLACE: tl.constexpr,
    NP: tl.constexpr,
    QP: tl.constexpr,
    BD: tl.constexpr,
):
    """Phase 1 for one token: every query of a block against its completed sources (Algorithm 1, lines 2-6).

    Two passes over the sources, in chunks of BD features: the first accumulates the `N x Q` logits
    `(w ⊙ γ) · v / rms(v)` and gives each query's softmax and log-sum-exp, the second the weighted sums. The queries
    come folded, or (IN_PLACE) as a table of their parameters' addresses (`load_queries`)."""
    token = tl.program_id(0).to(tl.int64)
    source_ids = tl.arange(0, NP)
    query_ids = tl.arange(0, QP)
    features = tl.arange(0, BD)
    source_mask = source_ids < num_sources
    query_mask = query_ids < num_queries
    source_rows = sources + source_ids[:, None].to(tl.int64) * source_stride + token * token_stride

    scores = tl.zeros([NP, QP], dtype=tl.float32)
    for start in range(0, hidden, BD):
        feature_mask = start + features < hidden
        values = tl.load(
            source_rows + start + features[None, :], mask=source_mask[:, None] & feature_mask[None, :], other=0.0
        ).to(tl.float32)
        query = load_queries(
            queries,
            first_pseudo_query,
            first_key_weight,
            num_queries,
            hidden,
            start + features,
            feature_mask,
            IN_PLACE,
            QP,
        )
        scores += tl.sum(values[:, None, :] * query[None, :, :], axis=2)

    scale = tl.load(inv_rms + source_ids.to(tl.int64) * num_tokens + token, mask=source_mask, other=0.0)
    logit = scores * scale[:, None]
    both = source_mask[:, None] & query_mask[None, :]
    tl.store(logits + (query_ids[None, :] * num_sources + source_ids[:, None]) * num_tokens + token, logit, mask=both)
    logit = tl.where(source_mask[:, None], logit, float("-inf"))
    peak = tl.max(logit, axis=0)
    exponentials = tl.exp(logit - peak[None, :])
    total = tl.sum(exponentials, axis=0)
    probabilities = exponentials / total[None, :]
    tl.store(logsumexp + query_ids * num_tokens + token, peak + tl.log(total), mask=query_mask)

    output_rows = outputs + (query_ids[:, None].to(tl.int64) * num_tokens + token) * hidden
    for start in range(0, hidden, BD):
        feature_mask = start + features < hidden
        values = tl.load(
            source_rows + start + features[None, :], mask=source_mask[:, None] & feature_mask[None, :], other=0.0
        ).to(tl.float32)
        output = tl.sum(probabilities[:, :, None] * values[:, None, :], axis=0)
        tl.store(
            output_rows + start + features[None, :],
            output.to(outputs.dtype.element_ty),
            mask=query_mask[:, None] & feature_mask[None, :],
        )


@triton.jit
def phase_one_backward_kernel(
    sources,
    inv_rms,
    queries,
    logsumexp,
    logits,
    grad_outputs,
    grad_logsumexp,
    grad_logits,
    grad_sources,
    grad_inv_rms,
    grad_scores,
    num_sources,
    num_queries,
    num_tokens,
    hidden,
    source_stride,
    token_stride,
    HAS_GRAD_OUTPUTS: tl.constexpr,
    HAS_GRAD_LOGSUMEXP: tl.constexpr,
    HAS_GRAD_LOGITS: tl.constexpr,
    NP: tl.constexpr,
    QP: tl.constexpr,
    BD: tl.constexpr,
):
    """Phase 1's backward for one token, from the saved logits and log-sum-exps and the sources read back in place.

    `p` the softmax weights, `o_q = Σ_i p_iq v_i`: `dℓ_iq = p_iq (g_q · v_i - g_q · o_q + dlse_q) + dℓ'_iq` (the last
    term from the logits' own gradient, when the depth weights were used), `g_q · o_q = Σ_i p_iq (g_q · v_i)`. Then
    `dv_i = Σ_q p_iq g_q + Σ_q dℓ_iq r_i (w ⊙ γ)_q` and `d(1/rms)_i = Σ_q dℓ_iq ℓ_iq / r_i`. The per-token
    `dℓ_iq r_i` go to `grad_scores`, from which `query_grad_kernel` sums the queries' gradient over the tokens."""
    token = tl.program_id(0).to(tl.int64)
    source_ids = tl.arange(0, NP)
    query_ids = tl.arange(0, QP)
    features = tl.arange(0, BD)
    source_mask = source_ids < num_sources
    query_mask = query_ids < num_queries
    both = source_mask[:, None] & query_mask[None, :]
    source_rows = sources + source_ids[:, None].to(tl.int64) * source_stride + token * token_stride
    grad_rows = grad_outputs + (query_ids[:, None].to(tl.int64) * num_tokens + token) * hidden
    logit_offsets = (query_ids[None, :] * num_sources + source_ids[:, None]) * num_tokens + token

    logit = tl.load(logits + logit_offsets, mask=both, other=0.0)
    lse = tl.load(logsumexp + query_ids * num_tokens + token, mask=query_mask, other=0.0)
    probabilities = tl.where(both, tl.exp(logit - lse[None, :]), 0.0)

    grad_logit = tl.zeros([NP, QP], dtype=tl.float32)
    if HAS_GRAD_OUTPUTS:
        dots = tl.zeros([NP, QP], dtype=tl.float32)  # g_q · v_i
        for start in range(0, hidden, BD):
            feature_mask = start + features < hidden
            values = tl.load(
                source_rows + start + features[None, :], mask=source_mask[:, None] & feature_mask[None, :], other=0.0
            ).to(tl.float32)
            grad = tl.load(
                grad_rows + start + features[None, :],
                mask=query_mask[:, None] & feature_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            dots += tl.sum(values[:, None, :] * grad[None, :, :], axis=2)
        grad_logit = probabilities * (dots - tl.sum(probabilities * dots, axis=0)[None, :])
    if HAS_GRAD_LOGSUMEXP:
        grad_lse = tl.load(grad_logsumexp + query_ids * num_tokens + token, mask=query_mask, other=0.0)
        grad_logit += probabilities * grad_lse[None, :]
    if HAS_GRAD_LOGITS:
        grad_logit += tl.load(grad_logits + logit_offsets, mask=both, other=0.0)

    scale = tl.load(inv_rms + source_ids.to(tl.int64) * num_tokens + token, mask=source_mask, other=1.0)
    tl.store(
        grad_inv_rms + source_ids.to(tl.int64) * num_tokens + token,
        tl.sum(grad_logit * logit, axis=1) / scale,
        mask=source_mask,
    )
    grad_score = grad_logit * scale[:, None]
    tl.store(grad_scores + logit_offsets, grad_score, mask=both)

    grad_source_rows = grad_sources + (source_ids[:, None].to(tl.int64) * num_tokens + token) * hidden
    for start in range(0, hidden, BD):
        feature_mask = start + features < hidden
        query = tl.load(
            queries + query_ids[:, None] * hidden + start + features[None, :],
            mask=query_mask[:, None] & feature_mask[None, :],
            other=0.0,
        )
        grad_values = tl.sum(grad_score[:, :, None] * query[None, :, :], axis=1)
        if HAS_GRAD_OUTPUTS:
            grad = tl.load(
                grad_rows + start + features[None, :],
                mask=query_mask[:, None] & feature_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            grad_values += tl.sum(probabilities[:, :, None] * grad[None, :, :], axis=1)
        tl.store(
            grad_source_rows + start + features[None, :],
            grad_values.to(grad_sources.dtype.element_ty),
            mask=source_mask[:, None] & feature_mask[None, :],
        )


@triton.jit
def query_grad_kernel(
    sources,
    grad_scores,
    partial_grads,
    num_sources,
    num_queries,
    num_tokens,
    hidden,
    source_stride,
    token_stride,
    tokens_per_program,
    QP: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    """The queries' gradient `Σ_t Σ_i dℓ_iq r_i v_i` over one range of tokens and one chunk of features: a
    deterministic partial sum (no atomics) that `attnres_triton.py` adds up over the ranges."""
    chunk = tl.program_id(0)
    split = tl.program_id(1)
    query_ids = tl.arange(0, QP)
    query_mask = query_ids < num_queries
    features = chunk * BD + tl.arange(0, BD)
    feature_mask = features < hidden
    first = split.to(tl.int64) * tokens_per_program
    last = tl.minimum(first + tokens_per_program, num_tokens)

    total = tl.zeros([QP, BD], dtype=tl.float32)
    for start in range(first, last, BT):
        tokens = start + tl.arange(0, BT)
        token_mask = tokens < last
        source_rows = sources + tokens[:, None] * token_stride + features[None, :]
        score_rows = grad_scores + query_ids[None, :].to(tl.int64) * num_sources * num_tokens + tokens[:, None]
        for _ in range(0, num_sources):  # pointers step to the next source: 64-bit offsets whatever the sizes
            grad_score = tl.load(score_rows, mask=token_mask[:, None] & query_mask[None, :], other=0.0)
            values = tl.load(source_rows, mask=token_mask[:, None] & feature_mask[None, :], other=0.0).to(tl.float32)
            total += tl.sum(grad_score[:, :, None] * values[:, None, :], axis=0)
            source_rows += source_stride
            score_rows += num_tokens
    tl.store(
        partial_grads + (split * num_queries + query_ids[:, None]) * hidden + features[None, :],
        total,
        mask=query_mask[:, None] & feature_mask[None, :],
    )


@triton.jit
def merge_forward_kernel(
    phase_one_output,
    logsumexp,
    logits,
    query,
    key_weight,
    partial_sum,
    norm_weight,
    normed,
    merged,
    weights,
    num_sources,
    num_tokens,
    hidden,
    key_eps,
    norm_eps,
    HAS_PARTIAL: tl.constexpr,
    HAS_KEY_WEIGHT: tl.constexpr,
    HAS_NORM: tl.constexpr,
    RETURN_WEIGHTS: tl.constexpr,
    NP: tl.constexpr,
    BD: tl.constexpr,
):
    """Phase 2 of one aggregation for one token, fused with the PreNorm RMSNorm that reads it.

    The running partial sum `s` joins phase 1's output `o` by the online-softmax merge: its logit
    `z = (w ⊙ γ) · s / rms_ε(s)`, its weight `a = sigmoid(z - lse)`, the input `h = o + a (s - o)` (rounded to the
    input dtype, as the eager `lerp` is). The RMSNorm then normalises `h` with its own eps (ε / n², which keeps a
    zero-query graft exact) and scales by its weight, rounding where `AttnResRMSNorm` rounds. When asked, the depth
    weights over the `N` completed sources and the partial sum come out too: `p_i (1 - a)` and `a`. `query` is
    `w ⊙ γ`, or `w` with `γ` in `key_weight` (HAS_KEY_WEIGHT: the parameters read in place)."""
    token = tl.program_id(0).to(tl.int64)
    features = tl.arange(0, BD)
    feature_mask = features < hidden
    row = token * hidden + features
    output = tl.load(phase_one_output + row, mask=feature_mask, other=0.0).to(tl.float32)
    lse = tl.load(logsumexp + token)
    if HAS_PARTIAL:
        partial = tl.load(partial_sum + row, mask=feature_mask, other=0.0).to(tl.float32)
        pseudo_query = tl.load(query + features, mask=feature_mask, other=0.0).to(tl.float32)
        if HAS_KEY_WEIGHT:
            pseudo_query *= tl.load(key_weight + features, mask=feature_mask, other=0.0).to(tl.float32)
        partial_inv_rms = tl.rsqrt(tl.sum(partial * partial, axis=0) / hidden + key_eps)
        partial_logit = tl.sum(partial * pseudo_query, axis=0) * partial_inv_rms
        partial_weight = 1.0 / (1.0 + tl.exp(lse - partial_logit))
        output = (output + partial_weight * (partial - output)).to(merged.dtype.element_ty)
        tl.store(merged + row, output, mask=feature_mask)
        output = output.to(tl.float32)
    if HAS_NORM:
        inv_rms = tl.rsqrt(tl.sum(output * output, axis=0) / hidden + norm_eps)
        if HAS_PARTIAL:  # `AttnResRMSNorm` rounds the normalised input to the input's dtype before its weight
            scaled = (output * inv_rms).to(merged.dtype.element_ty).to(tl.float32)
        else:
            scaled = (output * inv_rms).to(phase_one_output.dtype.element_ty).to(tl.float32)
        gain = tl.load(norm_weight + features, mask=feature_mask, other=0.0).to(tl.float32)
        tl.store(normed + row, (gain * scaled).to(normed.dtype.element_ty), mask=feature_mask)
    if RETURN_WEIGHTS:
        source_ids = tl.arange(0, NP)
        source_mask = source_ids < num_sources
        logit = tl.load(logits + source_ids.to(tl.int64) * num_tokens + token, mask=source_mask, other=0.0)
        probabilities = tl.exp(logit - lse)
        columns = num_sources + 1 if HAS_PARTIAL else num_sources
        if HAS_PARTIAL:
            probabilities = probabilities * (1.0 - partial_weight)
            tl.store(weights + token * columns + num_sources, partial_weight)
        tl.store(weights + token * columns + source_ids, probabilities, mask=source_mask)


@triton.jit
def merge_backward_kernel(
    phase_one_output,
    logsumexp,
    logits,
    query,
    partial_sum,
    norm_weight,
    grad_normed,
    grad_merged,
    grad_weights,
    grad_output,
    grad_logsumexp,
    grad_logits,
    grad_partial,
    query_grads,
    norm_weight_grads,
    num_sources,
    num_tokens,
    hidden,
    key_eps,
    norm_eps,
    tokens_per_program,
    HAS_PARTIAL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_GRAD_NORMED: tl.constexpr,
    HAS_GRAD_MERGED: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr,
    NP: tl.constexpr,
    BD: tl.constexpr,
):
    """`merge_forward_kernel`'s backward over one range of tokens, recomputing the forward's per-token statistics
    from its inputs (nothing but the inputs is saved). The gradients of the pseudo-query and of the norm's weight are
    sums over tokens: each program adds up its range in registers and writes one partial row (no atomics).

    RMSNorm: `dh = r (γ ⊙ dy) - h r³ (Σ γ ⊙ dy ⊙ h) / D`. Merge: `do = dh (1 - a)`, `ds = dh a`,
    `da = dh · (s - o)` (plus `dW_s - Σ_i dW_i p_i` from the depth weights), `dz = da a (1 - a)`, `dlse = -dz`
    (minus `Σ_i dℓ_i`), `ds += dz (r_s (w ⊙ γ) - z r_s² s / D)`, `d(w ⊙ γ) += dz r_s s`."""
    program = tl.program_id(0)
    features = tl.arange(0, BD)
    feature_mask = features < hidden
    source_ids = tl.arange(0, NP)
    source_mask = source_ids < num_sources
    first = program.to(tl.int64) * tokens_per_program
    last = tl.minimum(first + tokens_per_program, num_tokens)
    if HAS_PARTIAL:
        pseudo_query = tl.load(query + features, mask=feature_mask, other=0.0)
    if HAS_NORM:
        gain = tl.load(norm_weight + features, mask=feature_mask, other=0.0).to(tl.float32)
    query_total = tl.zeros([BD], dtype=tl.float32)
    gain_total = tl.zeros([BD], dtype=tl.float32)

    for token in range(first, last):
        row = token * hidden + features
        output = tl.load(phase_one_output + row, mask=feature_mask, other=0.0).to(tl.float32)
        lse = tl.load(logsumexp + token)
        merged = output
        if HAS_PARTIAL:
            partial = tl.load(partial_sum + row, mask=feature_mask, other=0.0).to(tl.float32)
            partial_inv_rms = tl.rsqrt(tl.sum(partial * partial, axis=0) / hidden + key_eps)
            partial_logit = tl.sum(partial * pseudo_query, axis=0) * partial_inv_rms
            partial_weight = 1.0 / (1.0 + tl.exp(lse - partial_logit))
            merged = (output + partial_weight * (partial - output)).to(partial_sum.dtype.element_ty).to(tl.float32)
        grad = tl.zeros([BD], dtype=tl.float32)
        if HAS_GRAD_NORMED:
            inv_rms = tl.rsqrt(tl.sum(merged * merged, axis=0) / hidden + norm_eps)
            if HAS_PARTIAL:
                scaled = (merged * inv_rms).to(partial_sum.dtype.element_ty).to(tl.float32)
            else:
                scaled = (merged * inv_rms).to(phase_one_output.dtype.element_ty).to(tl.float32)
            grad_y = tl.load(grad_normed + row, mask=feature_mask, other=0.0).to(tl.float32)
            gain_total += grad_y * scaled
            grad_scaled = grad_y * gain
            grad += inv_rms * grad_scaled - merged * (inv_rms * inv_rms * inv_rms / hidden) * tl.sum(
                grad_scaled * merged, axis=0
            )
        if HAS_GRAD_MERGED:
            grad += tl.load(grad_merged + row, mask=feature_mask, other=0.0).to(tl.float32)
        grad_lse = 0.0
        if HAS_PARTIAL:
            grad_weight = tl.sum(grad * (partial - output), axis=0)
            grad_o = grad * (1.0 - partial_weight)
        else:
            grad_o = grad
        if HAS_GRAD_WEIGHTS:
            logit = tl.load(logits + source_ids.to(tl.int64) * num_tokens + token, mask=source_mask, other=0.0)
            probabilities = tl.where(source_mask, tl.exp(logit - lse), 0.0)
            columns = num_sources + 1 if HAS_PARTIAL else num_sources
            grad_w = tl.load(grad_weights + token * columns + source_ids, mask=source_mask, other=0.0)
            if HAS_PARTIAL:
                grad_weight += tl.load(grad_weights + token * columns + num_sources) - tl.sum(
                    grad_w * probabilities, axis=0
                )
                grad_w = grad_w * (1.0 - partial_weight)
            grad_logit = grad_w * probabilities
            tl.store(grad_logits + source_ids.to(tl.int64) * num_tokens + token, grad_logit, mask=source_mask)
            grad_lse -= tl.sum(grad_logit, axis=0)
        if HAS_PARTIAL:
            grad_z = grad_weight * partial_weight * (1.0 - partial_weight)
            grad_lse -= grad_z
            grad_s = grad * partial_weight + grad_z * partial_inv_rms * (
                pseudo_query - partial * (partial_logit * partial_inv_rms / hidden)
            )
            tl.store(grad_partial + row, grad_s.to(grad_partial.dtype.element_ty), mask=feature_mask)
            query_total += grad_z * partial_inv_rms * partial
        tl.store(grad_output + row, grad_o.to(grad_output.dtype.element_ty), mask=feature_mask)
        tl.store(grad_logsumexp + token, grad_lse)

    if HAS_PARTIAL:
        tl.store(query_grads + program * hidden + features, query_total, mask=feature_mask)
    if HAS_NORM:
        tl.store(norm_weight_grads + program * hidden + features, gain_total, mask=feature_mask)


# Under TRITON_INTERPRET=1 (read when the kernels above were decorated) `triton.jit` gives interpreted functions that
# run on CPU tensors: the tests' way to run these kernels without a GPU.
INTERPRETED = not isinstance(phase_one_forward_kernel, triton.runtime.JITFunction)


# transformers imports a checkpoint's copy of this file under a module name of its own, beside the installed package's:
# torch.library refuses to define an operator twice, so each copy registers its operators in a namespace of its own.
MODULE_DIGEST = hashlib.sha256(__name__.encode()).hexdigest()[:12]
NAMESPACE = "attnres" if __name__ == "attnres.attnres_triton" else f"attnres_{MODULE_DIGEST}"


def next_power_of_2(value: int) -> int:
    """Triton tiles are powers of two (at least 2, the smallest tile every Triton release accepts)."""
    return max(2, 1 << (value - 1).bit_length())


def cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@functools.cache
def reduction_programs(device: torch.device) -> int:
    """How many programs share a sum over tokens (each writes one partial, added up afterwards, so the result does
    not depend on scheduling): a few per multiprocessor on a GPU; one under the interpreter, which runs programs one
    after another."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def merge_warps(block: int) -> int:
    """Warps for the kernels that hold a whole hidden vector per token: enough that each thread keeps 16 or fewer."""
    return min(16, max(4, block // 512))


def phase_one_tile(hidden: int, sources: int, queries: int) -> int:
    """Feature chunk of the phase-1 kernels, which hold a (sources x queries x chunk) product: about 4096 values."""
    return min(next_power_of_2(hidden), max(16, 4096 // (sources * queries)))


# --- phase 1 ---------------------------------------------------------------------------------------------------------


def phase_one_outputs_like(sources: torch.Tensor, sources_inv_rms: torch.Tensor, num_queries: int):
    """Phase 1's outputs, unwritten: weighted sums `(Q, B, T, D)` in the sources' dtype, fp32 log-sum-exps `(Q, B, T)`
    and logits `(Q, N, B, T)` (the kernel launch and the fake implementations allocate the same)."""
    num_sources, *tokens_shape, hidden = sources.shape
    return (
        sources.new_empty(num_queries, *tokens_shape, hidden),
        sources_inv_rms.new_empty(num_queries, *tokens_shape),
        sources_inv_rms.new_empty(num_queries, num_sources, *tokens_shape),
    )


def launch_phase_one(
    sources: torch.Tensor,
    sources_inv_rms: torch.Tensor,
    queries: torch.Tensor,
    num_queries: int,
    first_pseudo_query: torch.Tensor | None = None,
    first_key_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`phase_one_forward_kernel` over every token, the queries folded (`queries` `(Q, D)`) or in place (`queries`
    the address table, with the first parameters for their element types)."""
    num_sources, *_, hidden = sources.shape
    num_tokens = sources[0].numel() // hidden
    flat = sources.reshape(num_sources, num_tokens, hidden)
    outputs, logsumexp, logits = phase_one_outputs_like(sources, sources_inv_rms, num_queries)
    sources_block, queries_block = next_power_of_2(num_sources), next_power_of_2(num_queries)
    in_place = first_pseudo_query is not None
    phase_one_forward_kernel[(num_tokens,)](
        flat,
        sources_inv_rms.contiguous(),
        queries.contiguous(),
        outputs,
        logsumexp,
        logits,
        first_pseudo_query if in_place else queries,  # unread placeholders for the folded queries
        first_key_weight if in_place else queries,
        num_sources,
        num_queries,
        num_tokens,
        hidden,
        flat.stride(0),
        flat.stride(1),
        IN_PLACE=in_place,
        NP=sources_block,
        QP=queries_block,
        BD=phase_one_tile(hidden, sources_block, queries_block),
    )
    return outputs, logsumexp, logits


@torch.library.custom_op(f"{NAMESPACE}::phase_one", mutates_args=())
def phase_one(
    sources: torch.Tensor, sources_inv_rms: torch.Tensor, queries: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 1 (Algorithm 1): `queries` `(Q, D)` fp32 against `sources` `(N, B, T, D)` with their fp32 `1 / rms`
    `(N, B, T)`. Returns each query's weighted sum `(Q, B, T, D)` in the sources' dtype, and fp32 log-sum-exps
    `(Q, B, T)` and logits `(Q, N, B, T)`."""
    return launch_phase_one(sources, sources_inv_rms, queries, queries.shape[0])


@phase_one.register_fake
def _(sources, sources_inv_rms, queries):
    return phase_one_outputs_like(sources, sources_inv_rms, queries.shape[0])


@functools.lru_cache(maxsize=256)
def address_table(device: torch.device, addresses: tuple[int, ...]) -> torch.Tensor:
    """`addresses` as an int64 tensor on `device`, made once per set of parameter locations (one host-to-device copy,
    not one per step). Its content is a function of the key alone, so a table found here is never stale: parameters
    updated in place keep their addresses, and parameters moved or reallocated give a new key."""
    return torch.tensor(addresses, dtype=torch.int64, device=device)


@torch.library.custom_op(f"{NAMESPACE}::phase_one_in_place", mutates_args=())
def phase_one_in_place(
    sources: torch.Tensor,
    sources_inv_rms: torch.Tensor,
    # `typing.List`, not `list`: torch 2.6's schema inference knows only the former (2.13 both)
    pseudo_queries: typing.List[torch.Tensor],  # noqa: UP006
    key_weights: typing.List[torch.Tensor],  # noqa: UP006
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`phase_one` for the queries `w ⊙ γ` of the pseudo-queries `w` `(1, D)` and key-norm scales `γ` `(D,)` (each
    list of one dtype, contiguous, on the sources' device), read in place by the kernel: no folded matrix is
    written and read back. Inference only (no backward): in decoding at batch 1 the fold moves more bytes than the
    aggregations themselves, in training it is spread over every token of the batch."""
    table = address_table(sources.device, tuple(tensor.data_ptr() for tensor in pseudo_queries + key_weights))
    return launch_phase_one(sources, sources_inv_rms, table, len(pseudo_queries), pseudo_queries[0], key_weights[0])


@phase_one_in_place.register_fake
def _(sources, sources_inv_rms, pseudo_queries, key_weights):
    return phase_one_outputs_like(sources, sources_inv_rms, len(pseudo_queries))


def reads_in_place(queries, device: torch.device) -> bool:
    """Whether `phase_one_in_place` can read these queries' parameters (a `DepthQueries`): outside autograd and
    `torch.compile` (which folds them in its own fused kernel), each list of one dtype, contiguous, on `device`."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return all(
        len({tensor.dtype for tensor in tensors}) == 1
        and all(tensor.is_contiguous() and tensor.device == device for tensor in tensors)
        for tensors in (queries.pseudo_queries, queries.key_weights)
    )


@torch.library.custom_op(f"{NAMESPACE}::phase_one_backward", mutates_args=())
def phase_one_backward(
    sources: torch.Tensor,
    sources_inv_rms: torch.Tensor,
    queries: torch.Tensor,
    logsumexp: torch.Tensor,
    logits: torch.Tensor,
    grad_outputs: torch.Tensor | None,
    grad_logsumexp: torch.Tensor | None,
    grad_logits: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of the sources (their dtype) and of their `1 / rms`, and the per-token `dℓ · r` `(Q, N, B, T)`
    from which `query_grad` sums the queries' gradient."""
    num_sources, *tokens_shape, hidden = sources.shape
    num_queries, num_tokens = queries.shape[0], sources[0].numel() // hidden
    flat = sources.reshape(num_sources, num_tokens, hidden)
    grad_sources = torch.empty_like(sources, memory_format=torch.contiguous_format)
    grad_inv_rms = torch.empty_like(sources_inv_rms, memory_format=torch.contiguous_format)
    grad_scores = torch.empty_like(logits)
    sources_block, queries_block = next_power_of_2(num_sources), next_power_of_2(num_queries)
    phase_one_backward_kernel[(num_tokens,)](
        flat,
        sources_inv_rms.contiguous(),
        queries.contiguous(),
        logsumexp,
        logits,
        grad_outputs.contiguous() if grad_outputs is not None else logits,  # an unread placeholder pointer
        grad_logsumexp.contiguous() if grad_logsumexp is not None else logsumexp,
        grad_logits.contiguous() if grad_logits is not None else logits,
        grad_sources,
        grad_inv_rms,
        grad_scores,
        num_sources,
        num_queries,
        num_tokens,
        hidden,
        flat.stride(0),
        flat.stride(1),
        HAS_GRAD_OUTPUTS=grad_outputs is not None,
        HAS_GRAD_LOGSUMEXP=grad_logsumexp is not None,
        HAS_GRAD_LOGITS=grad_logits is not None,
        NP=sources_block,
        QP=queries_block,
        BD=phase_one_tile(hidden, sources_block, queries_block),
    )
    return grad_sources, grad_inv_rms, grad_scores


@phase_one_backward.register_fake
def _(sources, sources_inv_rms, queries, logsumexp, logits, grad_outputs, grad_logsumexp, grad_logits):
    return (
        torch.empty_like(sources, memory_format=torch.contiguous_format),
        torch.empty_like(sources_inv_rms, memory_format=torch.contiguous_format),
        torch.empty_like(logits),
    )


QUERY_GRAD_TOKENS, QUERY_GRAD_FEATURES = 16, 64  # the (tokens x queries x features) tile of `query_grad_kernel`


@torch.library.custom_op(f"{NAMESPACE}::query_grad", mutates_args=())
def query_grad(sources: torch.Tensor, grad_scores: torch.Tensor) -> torch.Tensor:
    """Partial sums over ranges of tokens of the queries' gradient `Σ_t Σ_i dℓ_iq r_i v_i`: fp32 `(ranges, Q, D)`."""
    num_sources, *_, hidden = sources.shape
    num_queries, num_tokens = grad_scores.shape[0], sources[0].numel() // hidden
    flat = sources.reshape(num_sources, num_tokens, hidden)
    tokens_per_program = max(QUERY_GRAD_TOKENS, cdiv(num_tokens, reduction_programs(sources.device)))
    ranges = cdiv(num_tokens, tokens_per_program)
    partial_grads = grad_scores.new_empty(ranges, num_queries, hidden)
    query_grad_kernel[(cdiv(hidden, QUERY_GRAD_FEATURES), ranges)](
        flat,
        grad_scores,
        partial_grads,
        num_sources,
        num_queries,
        num_tokens,
        hidden,
        flat.stride(0),
        flat.stride(1),
        tokens_per_program,
        QP=next_power_of_2(num_queries),
        BT=QUERY_GRAD_TOKENS,
        BD=QUERY_GRAD_FEATURES,
    )
    return partial_grads


@query_grad.register_fake
def _(sources, grad_scores):
    num_tokens = sources[0].numel() // sources.shape[-1]
    tokens_per_program = max(QUERY_GRAD_TOKENS, cdiv(num_tokens, reduction_programs(sources.device)))
    ranges = cdiv(num_tokens, tokens_per_program)
    return grad_scores.new_empty(ranges, grad_scores.shape[0], sources.shape[-1])


def phase_one_setup_context(ctx, inputs, output) -> None:
    # The sources are held by plain reference, as `PhaseOneFunction` holds them: they live in the model's shared
    # buffer (written once per slot), and saved-tensor hooks such as activation offloading would pack that buffer once
    # per block, the O(N²·d) the two-phase computation exists to avoid.
    ctx.sources, ctx.sources_inv_rms = inputs[0], inputs[1]
    _, logsumexp, logits = output
    ctx.save_for_backward(inputs[2], logsumexp, logits)
    ctx.set_materialize_grads(False)


def phase_one_autograd(ctx, grad_outputs, grad_logsumexp, grad_logits):
    queries, logsumexp, logits = ctx.saved_tensors
    grad_sources, grad_inv_rms, grad_scores = phase_one_backward(
        ctx.sources, ctx.sources_inv_rms, queries, logsumexp, logits, grad_outputs, grad_logsumexp, grad_logits
    )
    grad_queries = query_grad(ctx.sources, grad_scores).sum(0) if ctx.needs_input_grad[2] else None
    return grad_sources, grad_inv_rms, grad_queries


phase_one.register_autograd(phase_one_autograd, setup_context=phase_one_setup_context)


# --- phase 2 ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::merge", mutates_args=())
def merge(
    output: torch.Tensor,
    logsumexp: torch.Tensor,
    logits: torch.Tensor,
    query: torch.Tensor,
    key_weight: torch.Tensor | None,
    partial_sum: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    key_eps: float,
    norm_eps: float,
    return_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 2 of one aggregation: phase 1's `output` `(B, T, D)`, `logsumexp` `(B, T)` and `logits` `(N, B, T)` for
    this query, merged with `partial_sum` `(B, T, D)` when there is one, then normalised by an RMSNorm of weight
    `norm_weight` and eps `norm_eps` when one is given. `query` is `w ⊙ γ` fp32 `(D,)`, or with `key_weight` `γ`
    the pseudo-query `w` itself, both read in place (inference only, as `phase_one_in_place`).

    Returns `(normed, merged, weights)`, each empty when not computed: the normalised input (dtype: the weight's
    times the input's), the merged input `h` (only with a partial sum: without one `h` is phase 1's output), and the
    fp32 depth weights `(B, T, N + 1)` (`(B, T, N)` without a partial sum) when `return_weights`."""
    *tokens_shape, hidden = output.shape
    num_sources, num_tokens = logits.shape[0], logsumexp.numel()
    has_partial, has_norm = partial_sum is not None, norm_weight is not None
    if has_partial:
        merged = torch.empty_like(partial_sum, memory_format=torch.contiguous_format)
    else:
        merged = output.new_empty(0)  # an empty output, not a view of an input: custom operators return none
    normed = (
        output.new_empty(output.shape, dtype=torch.promote_types(norm_weight.dtype, merged.dtype))
        if has_norm
        else output.new_empty(0)
    )
    columns = num_sources + has_partial
    weights = logsumexp.new_empty(*tokens_shape, columns) if return_weights else logsumexp.new_empty(0)
    block = next_power_of_2(hidden)
    merge_forward_kernel[(num_tokens,)](
        output.contiguous(),
        logsumexp.contiguous(),
        logits.contiguous(),
        query.contiguous(),
        key_weight.contiguous() if key_weight is not None else query,
        partial_sum.contiguous() if has_partial else output,
        norm_weight.contiguous() if has_norm else query,
        normed if has_norm else output,  # outputs not computed get an unwritten placeholder pointer
        merged if has_partial else output,
        weights if return_weights else logsumexp,
        num_sources,
        num_tokens,
        hidden,
        key_eps,
        norm_eps,
        HAS_PARTIAL=has_partial,
        HAS_KEY_WEIGHT=key_weight is not None,
        HAS_NORM=has_norm,
        RETURN_WEIGHTS=return_weights,
        NP=next_power_of_2(num_sources),
        BD=block,
        num_warps=merge_warps(block),
    )
    return normed, merged, weights


@merge.register_fake
def _(output, logsumexp, logits, query, key_weight, partial_sum, norm_weight, key_eps, norm_eps, return_weights):
    merged = torch.empty_like(partial_sum) if partial_sum is not None else output.new_empty(0)
    normed = (
        output.new_empty(output.shape, dtype=torch.promote_types(norm_weight.dtype, merged.dtype))
        if norm_weight is not None
        else output.new_empty(0)
    )
    columns = logits.shape[0] + (partial_sum is not None)
    weights = logsumexp.new_empty(*logsumexp.shape, columns) if return_weights else logsumexp.new_empty(0)
    return normed, merged, weights


@torch.library.custom_op(f"{NAMESPACE}::merge_backward", mutates_args=())
def merge_backward(
    output: torch.Tensor,
    logsumexp: torch.Tensor,
    logits: torch.Tensor,
    query: torch.Tensor,
    partial_sum: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    key_eps: float,
    norm_eps: float,
    grad_normed: torch.Tensor | None,
    grad_merged: torch.Tensor | None,
    grad_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`merge`'s backward, recomputing its statistics from its inputs. Returns the gradients of `output`,
    `logsumexp`, `logits` (empty unless `grad_weights`) and `partial_sum` (empty without one), and fp32 partial sums
    over ranges of tokens `(ranges, D)` of the gradients of `query` and `norm_weight` (empty when absent)."""
    hidden = output.shape[-1]
    num_sources, num_tokens = logits.shape[0], logsumexp.numel()
    has_partial = partial_sum is not None
    tokens_per_program = cdiv(num_tokens, min(num_tokens, reduction_programs(output.device)))
    ranges = cdiv(num_tokens, tokens_per_program)
    grad_output = torch.empty_like(output, memory_format=torch.contiguous_format)
    grad_logsumexp = torch.empty_like(logsumexp, memory_format=torch.contiguous_format)
    grad_logits = torch.empty_like(logits) if grad_weights is not None else logits.new_empty(0)
    grad_partial = torch.empty_like(partial_sum) if has_partial else output.new_empty(0)
    query_grads = query.new_empty(ranges, hidden) if has_partial else query.new_empty(0)
    norm_weight_grads = query.new_empty(ranges, hidden) if norm_weight is not None else query.new_empty(0)
    block = next_power_of_2(hidden)
    merge_backward_kernel[(ranges,)](
        output.contiguous(),
        logsumexp.contiguous(),
        logits.contiguous(),
        query.contiguous(),
        partial_sum.contiguous() if has_partial else output,
        norm_weight.contiguous() if norm_weight is not None else query,
        grad_normed.contiguous() if grad_normed is not None else output,
        grad_merged.contiguous() if grad_merged is not None else output,
        grad_weights.contiguous() if grad_weights is not None else logsumexp,
        grad_output,
        grad_logsumexp,
        grad_logits if grad_weights is not None else logits,  # outputs not computed get an unwritten placeholder
        grad_partial if has_partial else output,
        query_grads if has_partial else query,
        norm_weight_grads if norm_weight is not None else query,
        num_sources,
        num_tokens,
        hidden,
        key_eps,
        norm_eps,
        tokens_per_program,
        HAS_PARTIAL=has_partial,
        HAS_NORM=norm_weight is not None,
        HAS_GRAD_NORMED=grad_normed is not None,
        HAS_GRAD_MERGED=grad_merged is not None,
        HAS_GRAD_WEIGHTS=grad_weights is not None,
        NP=next_power_of_2(num_sources),
        BD=block,
        num_warps=merge_warps(block),
    )
    return grad_output, grad_logsumexp, grad_logits, grad_partial, query_grads, norm_weight_grads


@merge_backward.register_fake
def _(output, logsumexp, logits, query, partial_sum, norm_weight, key_eps, norm_eps, grad_normed, grad_merged,
      grad_weights):  # fmt: skip
    num_tokens, hidden = logsumexp.numel(), output.shape[-1]
    ranges = cdiv(num_tokens, cdiv(num_tokens, min(num_tokens, reduction_programs(output.device))))
    return (
        torch.empty_like(output, memory_format=torch.contiguous_format),
        torch.empty_like(logsumexp, memory_format=torch.contiguous_format),
        torch.empty_like(logits) if grad_weights is not None else logits.new_empty(0),
        torch.empty_like(partial_sum) if partial_sum is not None else output.new_empty(0),
        query.new_empty(ranges, hidden) if partial_sum is not None else query.new_empty(0),
        query.new_empty(ranges, hidden) if norm_weight is not None else query.new_empty(0),
    )


def merge_setup_context(ctx, inputs, output) -> None:
    output_, logsumexp, logits, query, key_weight, partial_sum, norm_weight, key_eps, norm_eps, _ = inputs
    if key_weight is not None:
        raise RuntimeError("merge reads the parameters in place only without autograd: fold the query (w ⊙ γ)")
    ctx.save_for_backward(output_, logsumexp, logits, query, partial_sum, norm_weight)
    ctx.key_eps, ctx.norm_eps = key_eps, norm_eps
    ctx.set_materialize_grads(False)


def merge_autograd(ctx, grad_normed, grad_merged, grad_weights):
    output, logsumexp, logits, query, partial_sum, norm_weight = ctx.saved_tensors
    grad_output, grad_logsumexp, grad_logits, grad_partial, query_grads, norm_weight_grads = merge_backward(
        output,
        logsumexp,
        logits,
        query,
        partial_sum,
        norm_weight,
        ctx.key_eps,
        ctx.norm_eps,
        grad_normed if norm_weight is not None else None,
        grad_merged if partial_sum is not None else None,
        grad_weights if grad_weights is not None and grad_weights.numel() else None,
    )
    needs = ctx.needs_input_grad
    return (
        grad_output,
        grad_logsumexp,
        grad_logits if grad_logits.numel() else None,
        query_grads.sum(0) if needs[3] and partial_sum is not None else None,
        None,
        grad_partial if needs[5] else None,
        norm_weight_grads.sum(0).to(norm_weight.dtype) if needs[6] else None,
        None,
        None,
        None,
    )


merge.register_autograd(merge_autograd, setup_context=merge_setup_context)


# --- the implementation interface ------------------------------------------------------------------------------------


def check_device(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "attn_res_implementation='triton' runs on a GPU, and these tensors are on the CPU: use "
            "attn_res_implementation='two_phase' there (or run the kernels under TRITON_INTERPRET=1, as the tests do)."
        )


class TritonDepthAttention:
    """The paper's two-phase computation (§4.2, Algorithm 1) as fused Triton kernels: `TwoPhaseDepthAttention`'s
    math, with each phase one kernel launch. See `NaiveDepthAttention` for the interface.

    `read` is one `phase_one` launch for all the queries of a block: the folded `w ⊙ γ` in training, and in
    inference the pseudo-queries and key norms read in place (`phase_one_in_place`). `merge_norm` is one `merge`
    launch per sublayer: the online-softmax merge with the running partial sum, the PreNorm RMSNorm that reads the
    result and, when asked, the depth weights, where the eager path runs a dozen operators. `merge` is the same launch
    without the RMSNorm, for a norm that must be called as a module (hooked, wrapped or offloaded). Activation memory
    is O(N·d) as in `TwoPhaseDepthAttention`: phase 1 keeps only its logits and log-sum-exps and reads the sources
    back from the shared buffer."""

    @staticmethod
    def read(sources, sources_inv_rms, queries) -> list:
        check_device(sources)
        if reads_in_place(queries, sources.device):
            pseudo_queries, key_weights = queries.pseudo_queries, queries.key_weights
            outputs, logsumexp, logits = phase_one_in_place(sources, sources_inv_rms, pseudo_queries, key_weights)
        else:
            folded = queries.folded()
            pseudo_queries, key_weights = folded.unbind(0), [None] * len(folded)
            outputs, logsumexp, logits = phase_one(sources, sources_inv_rms, folded)
        return list(zip(outputs.unbind(0), logsumexp.unbind(0), logits.unbind(0), pseudo_queries, key_weights))

    @staticmethod
    def merge(read, partial_sum, eps: float, return_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, weights, _ = TritonDepthAttention.merge_norm(read, partial_sum, eps, return_weights, None, 0.0)
        return hidden, weights

    @staticmethod
    def merge_norm(
        read,
        partial_sum: torch.Tensor | None,
        eps: float,
        return_weights: bool,
        norm_weight: torch.Tensor | None,
        norm_eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`merge`, and the RMSNorm of weight `norm_weight` and eps `norm_eps` applied to its result in the same
        launch: `(hidden, weights, normed)`."""
        output, logsumexp, logits, query, key_weight = read
        normed, merged, weights = merge(
            output, logsumexp, logits, query, key_weight, partial_sum, norm_weight, eps, norm_eps, return_weights
        )
        return (
            output if partial_sum is None else merged,
            weights if return_weights else None,
            normed if norm_weight is not None else None,
        )
