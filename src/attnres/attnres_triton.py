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
as `NaiveDepthAttention` and `TwoPhaseDepthAttention` in `modeling_attnres.py` (shipped with it as remote code).

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

import torch

from .attnres_triton_kernels import (
    INTERPRETED,
    merge_backward_kernel,
    merge_forward_kernel,
    phase_one_backward_kernel,
    phase_one_forward_kernel,
    query_grad_kernel,
)


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


@torch.library.custom_op(f"{NAMESPACE}::phase_one", mutates_args=())
def phase_one(
    sources: torch.Tensor, sources_inv_rms: torch.Tensor, queries: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 1 (Algorithm 1): `queries` `(Q, D)` fp32 against `sources` `(N, B, T, D)` with their fp32 `1 / rms`
    `(N, B, T)`. Returns each query's weighted sum `(Q, B, T, D)` in the sources' dtype, and fp32 log-sum-exps
    `(Q, B, T)` and logits `(Q, N, B, T)`."""
    num_sources, *tokens_shape, hidden = sources.shape
    num_queries, num_tokens = queries.shape[0], sources[0].numel() // hidden
    flat = sources.reshape(num_sources, num_tokens, hidden)
    outputs = sources.new_empty(num_queries, *tokens_shape, hidden)
    logsumexp = queries.new_empty(num_queries, *tokens_shape)
    logits = queries.new_empty(num_queries, num_sources, *tokens_shape)
    sources_block, queries_block = next_power_of_2(num_sources), next_power_of_2(num_queries)
    phase_one_forward_kernel[(num_tokens,)](
        flat,
        sources_inv_rms.contiguous(),
        queries.contiguous(),
        outputs,
        logsumexp,
        logits,
        num_sources,
        num_queries,
        num_tokens,
        hidden,
        flat.stride(0),
        flat.stride(1),
        NP=sources_block,
        QP=queries_block,
        BD=phase_one_tile(hidden, sources_block, queries_block),
    )
    return outputs, logsumexp, logits


@phase_one.register_fake
def _(sources, sources_inv_rms, queries):
    num_sources, *tokens_shape, hidden = sources.shape
    return (
        sources.new_empty(queries.shape[0], *tokens_shape, hidden),
        queries.new_empty(queries.shape[0], *tokens_shape),
        queries.new_empty(queries.shape[0], num_sources, *tokens_shape),
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
    partial_sum: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    key_eps: float,
    norm_eps: float,
    return_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 2 of one aggregation: phase 1's `output` `(B, T, D)`, `logsumexp` `(B, T)` and `logits` `(N, B, T)` for
    this query, merged with `partial_sum` `(B, T, D)` when there is one, then normalised by an RMSNorm of weight
    `norm_weight` and eps `norm_eps` when one is given.

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
        HAS_NORM=has_norm,
        RETURN_WEIGHTS=return_weights,
        NP=next_power_of_2(num_sources),
        BD=block,
        num_warps=merge_warps(block),
    )
    return normed, merged, weights


@merge.register_fake
def _(output, logsumexp, logits, query, partial_sum, norm_weight, key_eps, norm_eps, return_weights):
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
    output_, logsumexp, logits, query, partial_sum, norm_weight, key_eps, norm_eps, _ = inputs
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
        grad_partial if needs[4] else None,
        norm_weight_grads.sum(0).to(norm_weight.dtype) if needs[5] else None,
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

    `read` is one `phase_one` launch for all the queries of a block (each query's `w ⊙ γ` is formed first, one
    elementwise product for the block). `merge_norm` is one `merge` launch per sublayer: the online-softmax merge with
    the running partial sum, the PreNorm RMSNorm that reads the result and, when asked, the depth weights, where the
    eager path runs a dozen operators. `merge` is the same launch without the RMSNorm, for a norm that must be called
    as a module (hooked, wrapped or offloaded). Activation memory is O(N·d) as in `TwoPhaseDepthAttention`: phase 1
    keeps only its logits and log-sum-exps and reads the sources back from the shared buffer."""

    @staticmethod
    def read(sources, sources_inv_rms, queries, key_weights) -> list:
        check_device(sources)
        queries = queries * key_weights
        outputs, logsumexp, logits = phase_one(sources, sources_inv_rms, queries)
        return list(zip(outputs.unbind(0), logsumexp.unbind(0), logits.unbind(0), queries.unbind(0)))

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
        output, logsumexp, logits, query = read
        normed, merged, weights = merge(
            output, logsumexp, logits, query, partial_sum, norm_weight, eps, norm_eps, return_weights
        )
        return (
            output if partial_sum is None else merged,
            weights if return_weights else None,
            normed if norm_weight is not None else None,
        )
