# Copyright 2026 The attnres authors. All rights reserved.
#
# The attention, MLP, RMSNorm and rotary blocks follow transformers' `modeling_llama.py` (Copyright 2022 EleutherAI
# and the HuggingFace Inc. team), so that Llama, Mistral, Qwen2 and Qwen3 checkpoints load into this model unchanged.
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
"""PyTorch AttnRes model: a Llama-family decoder with Attention Residuals (shipped as remote code)."""

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_attnres import AttnResConfig  # checks the transformers version first


logger = logging.get_logger(__name__)

# --- Compatibility across the supported transformers releases ---------------------------------------------------------
# transformers 5.24 renamed the KV cache `past_key_values` -> `cache`: the forward argument that `generate` passes, the
# output field it reads back, the mask helpers' argument, and the name `GradientCheckpointingLayer` clears. Releases
# before 5.24 know only `past_key_values`. This file hands the cache to transformers under the installed release's
# name (CACHE_NAME), and accepts both names from callers (`accepts_both_cache_names`).
CACHE_NAME = "cache" if "cache" in {field.name for field in fields(BaseModelOutputWithPast)} else "past_key_values"


def accepts_both_cache_names(forward: Callable) -> Callable:
    """Let a `forward` whose KV-cache parameter is `cache` also be called with `past_key_values` (transformers < 5.24
    and user code written for it), silently: both are current spellings somewhere in the supported range."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if "past_key_values" in kwargs:
            legacy = kwargs.pop("past_key_values")
            if kwargs.get("cache") is not None and legacy is not None:
                raise ValueError("Pass the KV cache as `cache` or as `past_key_values`, not both.")
            kwargs["cache"] = kwargs.get("cache") if legacy is None else legacy
        return forward(self, *args, **kwargs)

    return wrapper


class CacheFieldAlias:
    """Before transformers 5.24 output classes have no `cache` field: let `outputs.cache` read `past_key_values`
    there (5.24's own `ModelOutput` already answers to the old name)."""

    @property
    def cache(self) -> Cache | None:
        return self.past_key_values


OUTPUT_CACHE_ALIAS = (CacheFieldAlias,) if CACHE_NAME == "past_key_values" else ()

# Kimi K3's names for the AttnRes tensors: per layer `self_attention_res_*` and `mlp_res_*`, and `output_attn_res_*`.
ATTN_RES_PARAMETER = re.compile(r"(self_attention|mlp|output_attn)_res_(proj|norm)\.weight$")


class AttnResRMSNorm(nn.Module):
    """RMSNorm exactly as Llama computes it (fp32 statistics, weight applied in the input dtype)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class AttnResRotaryEmbedding(nn.Module):
    """Rotary embedding of Llama, with every RoPE type transformers knows (llama3, yarn, dynamic, ...)."""

    def __init__(self, config: AttnResConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = self.config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(self.config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: AttnResConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Applies rotary position embedding to query and key states of shape (batch, heads, seq, head_dim)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, num_key_value_heads, seq, head_dim) -> (batch, num_attention_heads, seq, head_dim)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class AttnResMLP(nn.Module):
    def __init__(self, config: AttnResConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class AttnResAttention(nn.Module):
    """Multi-headed attention of the Llama family, with Qwen2's QKV bias, Qwen3's QK-norm and Mistral/Qwen2's
    sliding window as config switches."""

    def __init__(self, config: AttnResConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        # CODEPATH: qkv_bias is Qwen2's bias on q/k/v only; attention_bias is Llama's bias on all four projections.
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias
        )
        # CODEPATH: qk_norm (Qwen3 checkpoints): RMSNorm over each head's query and key before RoPE.
        if config.qk_norm:
            self.q_norm = AttnResRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = AttnResRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        # CODEPATH: sliding layers (Mistral, Qwen2/Qwen3 with use_sliding_window) attend to the last `sliding_window`.
        is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if is_sliding else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if self.config.qk_norm:
            query_states = self.q_norm(query_states)
            key_states = self.k_norm(key_states)
        query_states = query_states.transpose(1, 2)
        key_states = key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # `.to(dtype)` to the tensor's own dtype is a no-op that still costs a dispatch; in decoding, where every tensor
    # here is one token wide, dispatches are the cost.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def as_float32(tensor: torch.Tensor) -> torch.Tensor:
    return cast(tensor, torch.float32)


class AttnResPseudoQuery(nn.Module):
    """The learned pseudo-query `w_l ∈ R^d` of one AttnRes aggregation (paper Eq. 2-3).

    Stored with the shape of Kimi K3's `nn.Linear(hidden_size, 1, bias=False)` weight, so checkpoints share the
    `*_res_proj.weight` tensors, but it is deliberately not an `nn.Linear`: it is never applied as a projection, and
    PEFT's `target_modules="all-linear"` must not wrap it with a LoRA adapter that the depth attention would ignore.
    It is zero-initialised in `AttnResPreTrainedModel._init_weights` (paper §3: uniform weights at the start).
    Parameters are read through module calls (never `.weight` from outside), so that accelerate's offloading hooks
    and PEFT's `modules_to_save` wrappers see them.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden_size))

    def forward(self) -> torch.Tensor:
        """The query in fp32, `(1, hidden)`."""
        return as_float32(self.weight)

    def extra_repr(self) -> str:
        return f"hidden_size={self.weight.shape[-1]}"


class AttnResKeyRMSNorm(nn.Module):
    """The RMSNorm of one aggregation's keys: `k̂ = γ ⊙ v / rms(v)` (paper Eq. 2; Kimi K3's `*_res_norm`).

    The logit `w · (γ ⊙ v / rms(v)) = (w ⊙ γ) · v / rms(v)`, so the learnable scale γ is applied to the query side
    (`forward`) and the keys are never materialised; `1 / rms(v)` depends on the source only, so it is computed once
    per source (with `config.rms_norm_eps`) and shared by every aggregation that reads it.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """`w ⊙ γ`, the query to dot with RMS-normalised sources, in fp32."""
        return query * as_float32(self.weight)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}"


def inverse_rms(hidden_states: torch.Tensor, eps: float) -> torch.Tensor:
    """`1 / sqrt(mean(x²) + eps)` over the hidden dimension, in fp32 and in one pass over `x`: (..., hidden) -> (...)."""
    norm = torch.linalg.vector_norm(hidden_states, dim=-1, dtype=torch.float32)
    return torch.rsqrt((norm * norm).mul_(1 / hidden_states.shape[-1]).add_(eps))


def depth_attention(
    sources: torch.Tensor, sources_inv_rms: torch.Tensor, queries: torch.Tensor, num_sources: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 1 of the paper's two-phase computation (§4.2, Algorithm 1): softmax attention of several pseudo-queries
    over the first `num_sources` completed sources at once, returning each query's softmax statistics so that the
    running partial sum can be merged in afterwards. Each source is read twice (logits, then the weighted sum),
    whatever the number of queries.

    Args:
        sources (`torch.Tensor` of shape `(max_sources, batch, seq, hidden)`): the sources buffer `v_i`.
        sources_inv_rms (`torch.Tensor` of shape `(max_sources, batch, seq)`): `1 / rms(v_i)`, fp32.
        queries (`torch.Tensor` of shape `(num_queries, hidden)`): `w ⊙ γ` of each aggregation, fp32.

    Returns:
        `outputs` `(batch, seq, num_queries, hidden)`: `Σ_i softmax_i(logits) v_i` in the sources' dtype;
        `logsumexp` `(batch, seq, num_queries)`, and `logits` and `probabilities` `(num_sources, batch, seq,
        num_queries)`, fp32.
    """
    _, batch, seq, hidden = sources.shape
    stack = as_float32(sources[:num_sources])
    logits = torch.matmul(stack, queries.t()) * sources_inv_rms[:num_sources].unsqueeze(-1)
    probabilities = torch.softmax(logits, dim=0)
    # p_max = exp(max(logits) - logsumexp) lies in [1/num_sources, 1], so this is exact and never overflows, in a
    # third of the operations of torch.logsumexp (which matter when decoding one token at a time)
    logsumexp = logits.amax(dim=0) - probabilities.amax(dim=0).log()
    # one (queries x sources) @ (sources x hidden) product per token, on strided views: BLAS reads them in place
    outputs = torch.bmm(
        probabilities.view(num_sources, batch * seq, -1).permute(1, 2, 0),
        stack.view(num_sources, batch * seq, hidden).transpose(0, 1),
    )
    return cast(outputs.view(batch, seq, -1, hidden), sources.dtype), logsumexp, logits, probabilities


class DepthAttentionFunction(torch.autograd.Function):
    """`depth_attention` with a hand-written backward that keeps no copy of the sources.

    Autograd would save each block's `(num_sources, batch, seq, hidden)` slice for its backward: O(N²·d) per token
    over N blocks, where the paper's Block AttnRes needs O(N·d). This function saves only the small softmax
    probabilities and reads the sources back from the shared buffer. The buffer is held as a plain reference rather
    than through `save_for_backward`: saved-tensor hooks (activation offloading, checkpointing) would pack the whole
    buffer once per block, the O(N²) this function exists to avoid. Later commits only write slots at or beyond
    `num_sources`, which this backward never reads (see `CommitSourceFunction`).
    """

    @staticmethod
    def forward(ctx, sources, sources_inv_rms, queries, num_sources):
        outputs, logsumexp, logits, probabilities = depth_attention(sources, sources_inv_rms, queries, num_sources)
        ctx.sources, ctx.sources_inv_rms, ctx.num_sources = sources, sources_inv_rms, num_sources
        ctx.save_for_backward(queries, logits, probabilities)
        return outputs, logsumexp, logits

    @staticmethod
    def backward(ctx, grad_outputs, grad_logsumexp, grad_logits):
        queries, logits, probabilities = ctx.saved_tensors
        sources, sources_inv_rms, count = ctx.sources, ctx.sources_inv_rms, ctx.num_sources
        _, batch, seq, hidden = sources.shape
        tokens, num_queries = batch * seq, queries.shape[0]
        stack = as_float32(sources[:count]).view(count, tokens, hidden)
        inv_rms = sources_inv_rms[:count].view(count, tokens, 1)
        probabilities = probabilities.view(count, tokens, num_queries)

        # gradients of the logits: through the weighted sum (softmax backward), the log-sum-exp, and directly
        grad_logits = torch.zeros_like(probabilities) if grad_logits is None else grad_logits.reshape(probabilities.shape)
        grad_mix = None
        if grad_outputs is not None:
            grad_outputs = as_float32(grad_outputs).reshape(tokens, num_queries, hidden)
            grad_probabilities = torch.bmm(grad_outputs, stack.permute(1, 2, 0)).permute(2, 0, 1)
            centred = grad_probabilities - (probabilities * grad_probabilities).sum(0, keepdim=True)
            grad_logits = torch.addcmul(grad_logits, probabilities, centred)
            grad_mix = torch.bmm(probabilities.permute(1, 0, 2), grad_outputs).transpose(0, 1)  # Σ_q p ⋅ g
        if grad_logsumexp is not None:
            grad_logits = torch.addcmul(grad_logits, probabilities, grad_logsumexp.view(1, tokens, num_queries))
        grad_scores = grad_logits * inv_rms  # logits = (v · q) / rms(v)

        grad_queries = None
        if ctx.needs_input_grad[2]:
            grad_queries = torch.mm(grad_scores.view(-1, num_queries).t(), stack.reshape(-1, hidden))
        grad_sources = grad_inv_rms = None
        if ctx.needs_input_grad[0]:
            grad_stack = torch.mm(grad_scores.view(-1, num_queries), queries).view(count, tokens, hidden)
            if grad_mix is not None:
                grad_stack += grad_mix
            grad_sources = sources.new_zeros(sources.shape)
            grad_sources[:count] = grad_stack.view(count, batch, seq, hidden)
        if ctx.needs_input_grad[1]:
            grad_inv_rms = sources_inv_rms.new_zeros(sources_inv_rms.shape)
            grad_inv_rms[:count] = ((grad_logits * logits.view_as(grad_logits)).sum(-1) / inv_rms.squeeze(-1)).view(
                count, batch, seq
            )
        return grad_sources, grad_inv_rms, grad_queries, None


def attend_over_sources(
    sources: torch.Tensor, sources_inv_rms: torch.Tensor, queries: torch.Tensor, num_sources: int, weights: bool
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """Phase 1 over the first `num_sources` sources (see `depth_attention`), split into one read per aggregation:
    `(output, logsumexp, logits or None, query)`, views taken once per block rather than several per sublayer. The
    logits are kept only if `weights` (to report depth weights).

    Eager autograd goes through `DepthAttentionFunction`; `torch.compile` traces the plain operations instead (its
    functionalisation turns the buffer writes into copies, and the compiler plans the saved memory itself)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        outputs, logsumexp, logits = DepthAttentionFunction.apply(sources, sources_inv_rms, queries, num_sources)
    else:
        outputs, logsumexp, logits, _ = depth_attention(sources, sources_inv_rms, queries, num_sources)
    all_logits = logits.unbind(-1) if weights else [None] * queries.shape[0]
    return list(zip(outputs.unbind(-2), logsumexp.unbind(-1), all_logits, queries.unbind(0)))


def merge_partial_sum(
    output: torch.Tensor, logsumexp: torch.Tensor, partial_sum: torch.Tensor, query: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 2 (Algorithm 1's online-softmax merge): add the current block's partial sum as one more source.

    With `ℓ` the log-sum-exp over the completed sources and `s` the partial sum's logit, the partial sum's softmax
    weight is `e^s / (e^ℓ + e^s) = sigmoid(s - ℓ)`, and the merged input is `lerp(output, partial_sum, weight)`:
    exactly the one-shot softmax over all sources. Returns the input `(batch, seq, hidden)` and the weight
    `(batch, seq)`, fp32.
    """
    partial32 = as_float32(partial_sum)
    logit = torch.matmul(partial32, query) * inverse_rms(partial32, eps)
    weight = torch.sigmoid(logit - logsumexp)
    merged = torch.lerp(as_float32(output), partial32, weight.unsqueeze(-1))
    return cast(merged, partial_sum.dtype), weight


class CommitSourceFunction(torch.autograd.Function):
    """Write a source and its `1 / rms` into slot `index` of the shared buffers, for autograd.

    Each source is stored once and every phase 1 reads it from there (O(N·d) per token). The backward hands slot
    `index` of the buffers' gradient to the source and the rest on to the earlier commits; the buffers start as
    uninitialised memory that nothing reads before its slot is written, so no gradient flows past the first commit.

    The write is hidden from autograd's version counter. Activation checkpointing saves the buffers as every layer's
    input and would otherwise reject each later commit, although a commit only fills a slot that nothing has read
    yet: every reader (`DepthAttentionFunction`, checkpointed layers) reads only slots written before it ran.
    """

    @staticmethod
    def forward(ctx, sources, sources_inv_rms, source, source_inv_rms, index):
        # A private torch API (checked on torch 2.6 and 2.13, where it takes one tensor), covered by the reentrant
        # activation-checkpointing tests.
        with torch.autograd._unsafe_preserve_version_counter(sources):
            sources[index] = source
        with torch.autograd._unsafe_preserve_version_counter(sources_inv_rms):
            sources_inv_rms[index] = source_inv_rms
        ctx.index = index
        return sources, sources_inv_rms

    @staticmethod
    def backward(ctx, grad_sources, grad_inv_rms):
        grad_source = None if grad_sources is None else grad_sources[ctx.index]
        grad_source_inv_rms = None if grad_inv_rms is None else grad_inv_rms[ctx.index]
        return grad_sources, grad_inv_rms, grad_source, grad_source_inv_rms, None


def commit_source(
    sources: torch.Tensor, sources_inv_rms: torch.Tensor, source: torch.Tensor, index: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make `source` (a finished block sum, the embedding, or in full mode a sublayer output) completed source number
    `index` of the buffers, with its `1 / rms` computed here once for every aggregation that will read it.

    Without autograd the buffers are written in place; eager autograd goes through `CommitSourceFunction`;
    `torch.compile` traces an out-of-place write, which the compiler may turn back into an in-place one."""
    source_inv_rms = inverse_rms(source, eps)
    if not torch.is_grad_enabled():
        sources[index] = source
        sources_inv_rms[index] = source_inv_rms
        return sources, sources_inv_rms
    if torch.compiler.is_compiling():
        return (
            sources.slice_scatter(source.unsqueeze(0), start=index, end=index + 1),
            sources_inv_rms.slice_scatter(source_inv_rms.unsqueeze(0), start=index, end=index + 1),
        )
    return CommitSourceFunction.apply(sources, sources_inv_rms, source, source_inv_rms, index)


def depth_weights(logits: torch.Tensor, logsumexp: torch.Tensor, partial_weight: torch.Tensor | None) -> torch.Tensor:
    """The softmax weights of one aggregation over `config.depth_sources()` (completed sources, then the partial sum),
    `(batch, seq, num_sources)`, from its phase-1 `logits` `(num_sources, batch, seq)` and `logsumexp`."""
    weights = torch.exp(logits - logsumexp).permute(1, 2, 0)
    if partial_weight is None:
        return weights
    return torch.cat([weights * (1 - partial_weight).unsqueeze(-1), partial_weight.unsqueeze(-1)], dim=-1)


class AttnResDecoderLayer(GradientCheckpointingLayer):
    """One attention and one MLP sublayer, each reading its input through an AttnRes aggregation.

    The residual state travels between layers as three tensors: the running partial sum of the current block, the
    buffer of completed sources `(num_sources, batch, seq, hidden)` (the token embedding, completed block sums, or in
    full mode every sublayer output) and their `1 / rms`. They are positional arguments so that activation
    checkpointing (reentrant or not) tracks their gradients and accelerate's device hooks move them. A layer never
    writes the buffer: the model commits sources between layers, so a checkpointed layer's inputs stay unchanged. In
    `"standard"` mode there are no sources and the partial sum is the PreNorm residual stream.

    The model commits the partial sum before a layer whose attention starts a block, and usually computes phase 1
    for all the layers of a block at once (`inter_block`); under activation checkpointing each layer recomputes its
    own phase 1, so that the checkpointed input stays the partial sum (paper §4.1). Each sublayer then merges the
    partial sum in (phase 2).
    """

    def __init__(self, config: AttnResConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.residual_mode = config.residual_mode
        self.rms_norm_eps = config.rms_norm_eps
        self.self_attn = AttnResAttention(config=config, layer_idx=layer_idx)
        self.mlp = AttnResMLP(config)

        # With zero pseudo-queries an aggregation over n sources returns the PreNorm residual stream divided by n;
        # dividing the PreNorm's eps by n² makes RMSNorm(stream / n) equal RMSNorm(stream) exactly, so a grafted
        # checkpoint computes its original function (see AttnResModel).
        depth_sources = config.depth_sources()
        attention_eps = config.rms_norm_eps / len(depth_sources[2 * layer_idx]) ** 2
        mlp_eps = config.rms_norm_eps / len(depth_sources[2 * layer_idx + 1]) ** 2
        self.input_layernorm = AttnResRMSNorm(config.hidden_size, eps=attention_eps)
        self.post_attention_layernorm = AttnResRMSNorm(config.hidden_size, eps=mlp_eps)

        # Block mode commits the partial sum before the attention of layers 0, B, 2B, ...; full mode before every
        # sublayer (the attention output is handed back to the model, which commits it after the MLP read it).
        self.attention_starts_block = config.sublayer_starts_block(2 * layer_idx)
        self.mlp_starts_block = config.sublayer_starts_block(2 * layer_idx + 1)
        attention_sources = len(depth_sources[2 * layer_idx])
        self.num_completed_sources = attention_sources - (0 if self.attention_starts_block else 1)
        # CODEPATH: residual_mode "block"/"full" (AttnRes checkpoints); "standard" (PreNorm baseline) has none of these.
        if self.residual_mode != "standard":
            self.self_attention_res_proj = AttnResPseudoQuery(config.hidden_size)
            self.self_attention_res_norm = AttnResKeyRMSNorm(config.hidden_size)
            self.mlp_res_proj = AttnResPseudoQuery(config.hidden_size)
            self.mlp_res_norm = AttnResKeyRMSNorm(config.hidden_size)

    def pseudo_queries(self) -> torch.Tensor:
        """The two aggregations' `w ⊙ γ`, `(2, hidden)` fp32 (attention first)."""
        return torch.cat(
            [
                self.self_attention_res_norm(self.self_attention_res_proj()),
                self.mlp_res_norm(self.mlp_res_proj()),
            ]
        )

    @accepts_both_cache_names
    def forward(
        self,
        partial_sum: torch.Tensor | None,
        sources: torch.Tensor | None = None,
        sources_inv_rms: torch.Tensor | None = None,
        inter_block: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_depth_attentions: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor | None, ...]:
        """`partial_sum` is `None` right after a commit. `inter_block` is this layer's two reads of its block's phase
        1 (see `attend_over_sources`; attention first), or `None` to compute them here.

        Returns `(partial_sum, attention_output, layer_input, attention_depth_weights, mlp_depth_weights)`:
        `attention_output` is the source the model must commit next (full mode) or `None`; `layer_input` is the
        hidden state entering the attention sublayer (reported as this layer's `hidden_states` entry); the depth
        weights are `None` unless `return_depth_attentions`."""
        sublayer_kwargs = dict(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        # CODEPATH: "standard" residuals (the PreNorm baseline): each sublayer reads the residual stream itself.
        if self.residual_mode == "standard":
            layer_input = partial_sum
            hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(partial_sum), **sublayer_kwargs)
            partial_sum = partial_sum + hidden_states
            partial_sum = partial_sum + self.mlp(self.post_attention_layernorm(partial_sum))
            return partial_sum, None, layer_input, None, None

        if inter_block is None:
            inter_block = attend_over_sources(
                sources, sources_inv_rms, self.pseudo_queries(), self.num_completed_sources, return_depth_attentions
            )
        attention_read, mlp_read = inter_block

        layer_input, attention_weights = self._read_input(partial_sum, attention_read, return_depth_attentions)
        hidden_states, _ = self.self_attn(hidden_states=self.input_layernorm(layer_input), **sublayer_kwargs)
        partial_sum = hidden_states if partial_sum is None else partial_sum + hidden_states

        hidden_states, mlp_weights = self._read_input(partial_sum, mlp_read, return_depth_attentions)
        attention_output = None
        if self.mlp_starts_block:  # full mode: the attention output becomes a source of its own
            attention_output, partial_sum = partial_sum, None
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        partial_sum = hidden_states if partial_sum is None else partial_sum + hidden_states
        return partial_sum, attention_output, layer_input, attention_weights, mlp_weights

    def _read_input(self, partial_sum, read, weights: bool):
        """The input of one sublayer from its phase-1 `read` (see `attend_over_sources`), merged with the partial sum when
        one is open (phase 2), and, if `weights`, its depth weights over `config.depth_sources()`."""
        output, logsumexp, logits, query = read
        partial_weight = None
        if partial_sum is None:
            hidden_states = output
        else:
            hidden_states, partial_weight = merge_partial_sum(output, logsumexp, partial_sum, query, self.rms_norm_eps)
        if not weights:
            return hidden_states, None
        return hidden_states, depth_weights(logits, logsumexp, partial_weight)


class AttnResPreTrainedModel(PreTrainedModel):
    config: AttnResConfig
    config_class = AttnResConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["AttnResDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # tested; `generate` with a static cache compiles the decode step on GPUs
    _can_record_outputs = {"attentions": AttnResAttention}

    def attn_res_parameters(self) -> dict[str, nn.Parameter]:
        """The AttnRes parameters by name: the pseudo-query (`*_res_proj`) and key norm (`*_res_norm`) of every
        sublayer and of the output. They are what a PreNorm checkpoint lacks, and what healing a graft trains."""
        return {name: param for name, param in self.named_parameters() if ATTN_RES_PARAMETER.search(name)}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, AttnResPseudoQuery):
            # Paper §3: "all pseudo-query vectors must be initialized to zero", so AttnRes starts as a uniform
            # average. `init.zeros_` skips tensors loaded from a checkpoint, and fills those a checkpoint lacks.
            init.zeros_(module.weight)


@dataclass
class AttnResModelOutputWithPast(BaseModelOutputWithPast, *OUTPUT_CACHE_ALIAS):
    r"""
    hidden_states (`tuple(torch.Tensor)`, *optional*, returned when `output_hidden_states=True`):
        `num_hidden_layers + 1` tensors of shape `(batch_size, sequence_length, hidden_size)`: the input of each
        decoder layer (for AttnRes, the aggregation its attention sublayer reads, the paper's `h_l`; for
        `"standard"`, the residual stream, as Llama reports it), then the final normalised output.
    depth_attentions (`tuple(torch.Tensor)`, *optional*, returned when `output_depth_attentions=True`):
        `2 * num_hidden_layers + 1` fp32 tensors of shape `(batch_size, sequence_length, num_sources)`, one per
        sublayer and one for the final output: the softmax weights over the sources listed by
        `config.depth_sources()`. `None` in `"standard"` mode.
    """

    depth_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class AttnResCausalLMOutputWithPast(CausalLMOutputWithPast, *OUTPUT_CACHE_ALIAS):
    r"""
    depth_attentions (`tuple(torch.Tensor)`, *optional*, returned when `output_depth_attentions=True`):
        See [`AttnResModelOutputWithPast`].
    """

    depth_attentions: tuple[torch.Tensor, ...] | None = None


class AttnResModel(AttnResPreTrainedModel):
    """The AttnRes decoder (no language-model head).

    Paper-level summary. Sublayer `l` reads `h_l = Σ_i α_{i→l} v_i`, `α_{i→l} = softmax_i(w_l · RMSNorm(v_i))`, over
    the sources of `config.depth_sources()`: the token embedding, the completed block sums and the current block's
    partial sum (block mode), or every earlier sublayer output (full mode). The final output aggregates all sources
    with its own pseudo-query before the final norm.

    Exactness at zero init. With all pseudo-queries zero, `h_l` is the mean of its `n_l` sources, and their sum is
    the PreNorm residual stream `x_l`, so `h_l = x_l / n_l`. Every reader of `h_l` is an RMSNorm, which is scale
    invariant except through its eps: `RMSNorm_ε(x / n) = RMSNorm_{n²ε}(x)`. The PreNorm reading an aggregation over
    `n_l` sources therefore uses `ε / n_l²`, which makes a zero-query AttnRes model compute exactly the PreNorm network
    with the same weights (up to floating-point rounding) and costs nothing: it is a constant per sublayer. Trained
    AttnRes models are unaffected beyond that eps.
    """

    _auto_class = "AutoModel"  # `save_pretrained` ships this file and the config's as remote code

    def __init__(self, config: AttnResConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [AttnResDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        num_output_sources = len(config.depth_sources()[-1])
        self.norm = AttnResRMSNorm(config.hidden_size, eps=config.rms_norm_eps / num_output_sources**2)
        # CODEPATH: residual_mode "block"/"full": the final output's own pseudo-query and key norm.
        if config.residual_mode != "standard":
            self.output_attn_res_proj = AttnResPseudoQuery(config.hidden_size)
            self.output_attn_res_norm = AttnResKeyRMSNorm(config.hidden_size)
        self.rotary_emb = AttnResRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        # Layers that share one phase 1 (a block; in full mode, each layer), and the sources completed at the end.
        starts = [i for i, layer in enumerate(self.layers) if layer.attention_starts_block] + [len(self.layers)]
        self.layer_groups = [list(range(start, end)) for start, end in zip(starts, starts[1:])]
        self.num_completed_sources = len(config.depth_sources()[-1]) - 1
        self.post_init()

    @accepts_both_cache_names
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AttnResModelOutputWithPast:
        r"""
        Besides Llama's arguments, accepts `output_depth_attentions=True` to return the depth-attention weights of
        every AttnRes aggregation (see [`AttnResModelOutputWithPast`]).
        """
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        output_depth_attentions = bool(kwargs.pop("output_depth_attentions", False))
        if output_depth_attentions and self.config.residual_mode == "standard":
            logger.warning_once("output_depth_attentions has no effect with residual_mode='standard'.")
            output_depth_attentions = False

        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        # It may already have been prepared by e.g. `generate`
        if not isinstance(causal_mask_mapping := attention_mask, dict):
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                CACHE_NAME: cache,
                "position_ids": position_ids,
            }
            causal_mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
            if self.has_sliding_layers:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        layer_kwargs = dict(
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            use_cache=use_cache,
            return_depth_attentions=output_depth_attentions,
            **{CACHE_NAME: cache},  # the name GradientCheckpointingLayer clears when it recomputes the layer
            **kwargs,
        )
        partial_sum, sources, sources_inv_rms = inputs_embeds, None, None
        if self.config.residual_mode != "standard":
            # The sources are written into one buffer as they complete: each is stored, and copied, exactly once.
            sources = inputs_embeds.new_empty(self.num_completed_sources, *inputs_embeds.shape)
            sources_inv_rms = inputs_embeds.new_empty(sources.shape[:-1], dtype=torch.float32)
        # Under activation checkpointing each layer recomputes its own phase 1; otherwise a block shares one.
        batch_phase_one = not (self.gradient_checkpointing and self.training)
        all_hidden_states: list[torch.Tensor] = []
        all_depth_attentions: list[torch.Tensor] = []
        for group in self.layer_groups:
            reads = None
            # CODEPATH: AttnRes modes: commit the finished block (or, in full mode, the last sublayer output) and
            # attend over the completed sources for every aggregation of the block at once.
            if self.config.residual_mode != "standard":
                head = self.layers[group[0]]
                completed = head.num_completed_sources
                sources, sources_inv_rms = commit_source(
                    sources, sources_inv_rms, partial_sum, completed - 1, self.config.rms_norm_eps
                )
                partial_sum = None
                if batch_phase_one:
                    queries = torch.cat([self.layers[i].pseudo_queries() for i in group])
                    reads = attend_over_sources(sources, sources_inv_rms, queries, completed, output_depth_attentions)
            for position, layer_idx in enumerate(group):
                layer_inter_block = None if reads is None else reads[2 * position : 2 * position + 2]
                layer = self.layers[layer_idx]
                partial_sum, attention_output, layer_input, attention_weights, mlp_weights = layer(
                    partial_sum,
                    sources,
                    sources_inv_rms,
                    layer_inter_block,
                    attention_mask=causal_mask_mapping[self.config.layer_types[layer_idx]],
                    **layer_kwargs,
                )
                if attention_output is not None:  # full mode
                    sources, sources_inv_rms = commit_source(
                        sources, sources_inv_rms, attention_output, layer.num_completed_sources, self.config.rms_norm_eps
                    )
                all_hidden_states.append(layer_input)
                all_depth_attentions += [attention_weights, mlp_weights]

        # CODEPATH: "standard" reads the residual stream; AttnRes aggregates all sources with the output query.
        if self.config.residual_mode == "standard":
            hidden_states = partial_sum
        else:
            query = self.output_attn_res_norm(self.output_attn_res_proj())
            [(output, logsumexp, logits, query)] = attend_over_sources(
                sources, sources_inv_rms, query, self.num_completed_sources, output_depth_attentions
            )
            hidden_states, partial_weight = merge_partial_sum(
                output, logsumexp, partial_sum, query, self.config.rms_norm_eps
            )
            if output_depth_attentions:
                all_depth_attentions.append(depth_weights(logits, logsumexp, partial_weight))
        hidden_states = self.norm(hidden_states)

        return AttnResModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_NAME: cache},
            hidden_states=tuple(all_hidden_states) + (hidden_states,) if output_hidden_states else None,
            depth_attentions=tuple(all_depth_attentions) if output_depth_attentions else None,
        )


class AttnResForCausalLM(AttnResPreTrainedModel, GenerationMixin):
    _auto_class = "AutoModelForCausalLM"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AttnResConfig):
        super().__init__(config)
        self.model = AttnResModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @accepts_both_cache_names
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AttnResCausalLMOutputWithPast:
        r"""
        ```python
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer

        >>> model = AutoModelForCausalLM.from_pretrained("path/to/attnres-checkpoint", trust_remote_code=True)
        >>> tokenizer = AutoTokenizer.from_pretrained("path/to/attnres-checkpoint")
        >>> inputs = tokenizer("The capital of France is", return_tensors="pt")
        >>> outputs = model.generate(**inputs, max_new_tokens=8)
        >>> depth = model(**inputs, output_depth_attentions=True).depth_attentions  # one map per sublayer + output
        ```"""
        outputs: AttnResModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        # Only compute the logits that are needed: the last `logits_to_keep` positions (0: all), or the given indices.
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden_states = outputs.last_hidden_state[:, kept, :]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return AttnResCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: outputs.cache},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            depth_attentions=outputs.depth_attentions,
        )


__all__ = ["AttnResForCausalLM", "AttnResModel", "AttnResPreTrainedModel"]
