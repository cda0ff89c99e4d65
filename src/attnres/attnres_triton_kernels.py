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
"""Triton kernels of the fused two-phase AttnRes (`attn_res_implementation="triton"`), forward and backward.

Only the kernels live here; `attnres_triton.py` launches them as PyTorch custom operators. The math is that of
`phase_one` / `TwoPhaseDepthAttention` in `modeling_attnres.py` (the reference is `naive_depth_attention`): every
statistic (logits, log-sum-exp, 1/rms, softmax weights) in fp32 whatever the input dtype, and outputs rounded to the
input dtype exactly where the eager implementation rounds them, so that both compute the same function.

Shapes, with `T` the tokens (batch x sequence, flattened), `N` completed sources, `Q` queries, `D` the hidden size:
sources `(N, T, D)`, their `1/rms` `(N, T)`, queries `(Q, D)` (the pseudo-query times the key norm's scale), phase 1's
outputs `(Q, T, D)`, log-sum-exps `(Q, T)` and logits `(Q, N, T)`. Every size is a runtime argument except the
power-of-two tile sizes, so one compiled kernel serves every sequence length and every source count of a bucket.
"""

try:  # transformers' remote-code import check skips imports inside `try`: a checkpoint must load without triton
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError(f"attn_res_implementation='triton' needs triton (pip install triton): {error}") from error


@triton.jit
def phase_one_forward_kernel(
    sources,
    inv_rms,
    queries,
    outputs,
    logsumexp,
    logits,
    num_sources,
    num_queries,
    num_tokens,
    hidden,
    source_stride,
    token_stride,
    NP: tl.constexpr,
    QP: tl.constexpr,
    BD: tl.constexpr,
):
    """Phase 1 for one token: every query of a block against its completed sources (Algorithm 1, lines 2-6).

    Two passes over the sources, in chunks of BD features: the first accumulates the `N x Q` logits
    `(w ⊙ γ) · v / rms(v)` and gives each query's softmax and log-sum-exp, the second the weighted sums."""
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
        query = tl.load(
            queries + query_ids[:, None] * hidden + start + features[None, :],
            mask=query_mask[:, None] & feature_mask[None, :],
            other=0.0,
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
    weights over the `N` completed sources and the partial sum come out too: `p_i (1 - a)` and `a`."""
    token = tl.program_id(0).to(tl.int64)
    features = tl.arange(0, BD)
    feature_mask = features < hidden
    row = token * hidden + features
    output = tl.load(phase_one_output + row, mask=feature_mask, other=0.0).to(tl.float32)
    lse = tl.load(logsumexp + token)
    if HAS_PARTIAL:
        partial = tl.load(partial_sum + row, mask=feature_mask, other=0.0).to(tl.float32)
        pseudo_query = tl.load(query + features, mask=feature_mask, other=0.0)
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
