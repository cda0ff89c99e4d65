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

import contextlib
import copy
import functools
import importlib
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
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_attnres import AttnResConfig  # checks the transformers version first


try:  # the fused kernels need triton, which transformers' remote-code check does not require (it skips `try` blocks)
    from .attnres_triton import TritonDepthAttention
except ImportError as error:  # no triton: "auto" runs `two_phase`, and asking for "triton" says why it cannot
    TritonDepthAttention, TRITON_UNAVAILABLE = None, str(error)


logger = logging.get_logger(__name__)

# --- Compatibility across the supported transformers releases --------------------------------------------------------
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

    @accepts_both_cache_names  # the decoder layer hands the cache over as a family's attention takes it (CACHE_NAME)
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


# ---------------------------------------------------------------------------------------------------------------------
# Attention Residuals (paper Eq. 2-6). Sublayer `l` reads `h_l = Σ_i α_{i→l} v_i`, `α_{i→l} = softmax_i(w_l · k_i)`,
# `k_i = RMSNorm(v_i)`, over its sources `v_i`: the token embedding, the completed block sums and the running sum of
# the current block (Full AttnRes: every earlier sublayer output).


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # `.to(dtype)` to the tensor's own dtype is a no-op that still costs a dispatch; in decoding, where every tensor
    # here is one token wide, dispatches are the cost.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def as_float32(tensor: torch.Tensor) -> torch.Tensor:
    return cast(tensor, torch.float32)


class AttnResPseudoQuery(nn.Module):
    """The learned pseudo-query `w_l` of one aggregation (paper Eq. 3), zero at initialisation (§3).

    Stored with the shape of Kimi K3's `nn.Linear(hidden_size, 1, bias=False)` weight, so checkpoints share the
    `*_res_proj.weight` tensors, but it is deliberately not an `nn.Linear`: it is never applied as a projection, and
    PEFT's `target_modules="all-linear"` must not wrap it. Read by calling the module, so that the hooks of offloading
    engines and PEFT's `modules_to_save` wrappers see the read.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden_size))

    def forward(self) -> torch.Tensor:
        """`w`, `(1, hidden)`, in the parameter's dtype (`DepthQueries` casts it where it is read)."""
        return self.weight

    def extra_repr(self) -> str:
        return f"hidden_size={self.weight.shape[-1]}"


class AttnResKeyNorm(nn.Module):
    """The learnable scale `γ` of one aggregation's key RMSNorm, `k_i = γ ⊙ v_i / rms(v_i)` (paper Eq. 2; Kimi K3's
    `*_res_norm`), one at initialisation."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))

    def forward(self) -> torch.Tensor:
        """`γ`, `(hidden,)`, in the parameter's dtype."""
        return self.weight

    def extra_repr(self) -> str:
        return f"hidden_size={self.weight.shape[-1]}"


# The modules holding the depth parameters, each returning its one parameter when called.
DEPTH_MODULES = (AttnResPseudoQuery, AttnResKeyNorm)


def fold_queries(pseudo_queries: list[torch.Tensor], key_weights: list[torch.Tensor]) -> torch.Tensor:
    """The queries of several aggregations as one matrix: `w ⊙ γ`, fp32 `(n, hidden)`.

    The key norm's scale folds into the query, `w · (γ ⊙ v / rms(v)) = (w ⊙ γ) · v / rms(v)`, so that no
    implementation scales the sources per query. Three operations (five in half precision) whatever `n`."""
    return as_float32(torch.cat(pseudo_queries)) * as_float32(torch.stack(key_weights))


class DepthQueries:
    """The queries of several aggregations, kept as their parameters: each aggregation's pseudo-query `w` `(1,
    hidden)` and key-norm scale `γ` `(hidden,)`, in order.

    An implementation reads them either folded into one fp32 matrix (`folded`: `fold_queries`, computed the first time
    any row is asked for, once for all the rows of the forward, which the model slices block by block), or in place,
    a kernel reading each parameter where it lives (the Triton path in decoding, where the fold itself would move
    more bytes than the aggregations: at batch 1 every parameter is read once per token)."""

    def __init__(
        self,
        pseudo_queries: list[torch.Tensor],
        key_weights: list[torch.Tensor],
        whole: "DepthQueries | None" = None,
        offset: int = 0,
    ) -> None:
        self.pseudo_queries, self.key_weights = pseudo_queries, key_weights
        # the set these rows were sliced from, and where they start in it (None: this is the whole set)
        self.whole, self.offset = whole, offset
        self.matrix = None  # the whole set's fold, once asked for

    def __len__(self) -> int:
        return len(self.pseudo_queries)

    def __getitem__(self, rows: slice) -> "DepthQueries":
        start, stop, _ = rows.indices(len(self))
        whole = self if self.whole is None else self.whole
        return DepthQueries(self.pseudo_queries[start:stop], self.key_weights[start:stop], whole, self.offset + start)

    def folded(self) -> torch.Tensor:
        """`w ⊙ γ` of these rows, fp32 `(n, hidden)`: rows of the fold of the whole set."""
        whole = self if self.whole is None else self.whole
        if whole.matrix is None:
            whole.matrix = fold_queries(whole.pseudo_queries, whole.key_weights)
        return whole.matrix[self.offset : self.offset + len(self)]


def naive_depth_attention(values: torch.Tensor, query: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One aggregation exactly as the paper writes it (Eq. 2-4; Figure 2's `block_attn_res`): the reference.

    Args:
        values (`torch.Tensor` of shape `(num_sources, batch, seq, hidden)`): the sources `v_i`, oldest first.
        query (`torch.Tensor` of shape `(hidden,)`): the pseudo-query with the key norm's scale folded in, `w ⊙ γ`
            (`DepthQueries.folded`).
        eps (`float`): the key RMSNorm's epsilon.

    Returns:
        The aggregated input `(batch, seq, hidden)` in the sources' dtype, and the weights `α` `(batch, seq,
        num_sources)`. Everything is computed in fp32, whatever the model's dtype.
    """
    values32 = values.float()
    keys = values32 * torch.rsqrt(values32.pow(2).mean(-1, keepdim=True) + eps)  # k_i = RMSNorm(v_i) / γ
    weights = torch.einsum("d,nbsd->nbs", query, keys).softmax(dim=0)  # φ(w, k) = exp(wᵀk): no temperature
    hidden = torch.einsum("nbs,nbsd->bsd", weights, values32)  # Σ_i α_i v_i, over raw (unnormalised) values
    return hidden.to(values.dtype), weights.permute(1, 2, 0)


class NaiveDepthAttention:
    """`naive_depth_attention` behind the implementation interface: every aggregation stacks all its sources, the
    running partial sum included, and runs Eq. 2-4 by itself. Nothing is shared between aggregations, and autograd
    keeps each stack: O(L²·d) activation memory in Full AttnRes. It is the reference the other implementations are
    tested against.

    The interface, for any implementation: `read(sources, sources_inv_rms, queries)` does whatever can be done before
    the partial sum exists, for several aggregations at once, and returns one opaque read per query. `sources`
    `(num_sources, batch, seq, hidden)` are the completed sources in the model's dtype, `sources_inv_rms` their
    `1 / rms(v_i)` (fp32, with the key norm's eps), `queries` a `DepthQueries`.
    `merge(read, partial_sum, eps, return_weights)` gives one aggregation's input `(batch, seq, hidden)` and, if
    asked, its weights `(batch, seq, num_sources)` over the completed sources then the partial sum."""

    @staticmethod
    def read(sources, sources_inv_rms, queries: DepthQueries) -> list:
        return [(sources, query) for query in queries.folded()]

    @staticmethod
    def merge(read, partial_sum, eps: float, return_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        sources, query = read
        values = sources if partial_sum is None else torch.cat([sources, partial_sum.unsqueeze(0)])
        hidden, weights = naive_depth_attention(values, query, eps)
        return hidden, weights if return_weights else None


@functools.lru_cache(maxsize=64)
def host_scalar(value: float) -> torch.Tensor:
    """`value` as a 0-dim fp32 CPU tensor: a binary operator on any device takes it as a kernel argument (PyTorch
    lets 0-dim CPU tensors meet tensors on other devices), without a launch or a copy, where a Python number would
    not be accepted (`hypot`) or would need an operator of its own.

    Made once per value (a decoding step would otherwise build a hundred, each costing about as much as a launch), and
    outside inference mode, so that autograd may save it even when it was first made inside `torch.inference_mode`.
    Nothing writes it: it is only ever an operand."""
    with torch.inference_mode(False):
        return torch.tensor(value, dtype=torch.float32, device="cpu")


def norm_with_eps(hidden_states: torch.Tensor, eps: float, keepdim: bool = False) -> torch.Tensor:
    """`sqrt(|x|² + d·eps) = sqrt(d) · rms_eps(x)` over the hidden dimension `d`, fp32, from `x` in any dtype, in
    two operations (a norm, then a `hypot` with the constant) where `rsqrt(mean(x²) + eps)` takes four. With
    `keepdim`, shaped `(..., 1)` to scale `x` without an `unsqueeze` (itself an operator call).

    Under `torch.compile` the constant is folded by plain arithmetic instead, which the compiler fuses; a CPU tensor
    in a graph would keep it from capturing CUDA graphs."""
    norm = torch.linalg.vector_norm(hidden_states, dim=-1, keepdim=keepdim, dtype=torch.float32)
    scaled_eps = hidden_states.shape[-1] * eps
    if torch.compiler.is_compiling():
        return torch.sqrt(norm * norm + scaled_eps)
    return torch.hypot(norm, host_scalar(scaled_eps**0.5))


def inverse_rms(
    hidden_states: torch.Tensor, eps: float, out: torch.Tensor | None = None, keepdim: bool = False
) -> torch.Tensor:
    """`1 / sqrt(mean(x²) + eps) = sqrt(d) / norm_with_eps(x)`, fp32: (..., hidden) -> (...) (`(..., 1)` with
    `keepdim`), written into `out` when given (a slot of the sources' buffer: no copy)."""
    sqrt_hidden = hidden_states.shape[-1] ** 0.5
    if torch.compiler.is_compiling():
        inv_rms = sqrt_hidden / norm_with_eps(hidden_states, eps, keepdim)
        return inv_rms if out is None else out.copy_(inv_rms)
    return torch.div(host_scalar(sqrt_hidden), norm_with_eps(hidden_states, eps, keepdim), out=out)


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`AttnResRMSNorm`'s function with the same roundings (fp32 statistics, the normalised input rounded to the input
    dtype, then the weight), its statistic computed as the aggregations compute theirs (`inverse_rms`: one fused
    reduction where `rsqrt(mean(x²) + eps)` writes `x²` out and reads it back). Equal to the module up to fp32
    rounding, not bit for bit: the module stays a bit-exact copy of Llama's, for the norms called as modules."""
    inv_rms = inverse_rms(hidden_states, eps, keepdim=True)
    return weight * cast(as_float32(hidden_states) * inv_rms, hidden_states.dtype)


def phase_one(
    sources: torch.Tensor, sources_inv_rms: torch.Tensor, queries: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 1 of the two-phase computation (Algorithm 1): several queries attend over the completed sources at once.

    Args:
        sources (`torch.Tensor` of shape `(num_sources, batch, seq, hidden)`): the completed sources `v_i`.
        sources_inv_rms (`torch.Tensor` of shape `(num_sources, batch, seq)`): `1 / rms(v_i)`, fp32.
        queries (`torch.Tensor` of shape `(num_queries, hidden)`): each aggregation's `w ⊙ γ`, fp32.

    Returns:
        fp32 `outputs` `(batch, seq, num_queries, hidden)` (phase 2 mixes them in fp32: no round trip through the
        sources' dtype), `logsumexp` `(batch, seq, num_queries)`, and `scores` (`w ⊙ γ · v`, before the `1 / rms`)
        and `probabilities` `(num_sources, batch, seq, num_queries)`.
    """
    stack = as_float32(sources)
    scores = nn.functional.linear(stack, queries)
    logits = scores * sources_inv_rms.unsqueeze(-1)  # w · γ ⊙ v / rms(v)
    probabilities = torch.softmax(logits, dim=0)
    # the last entry of the running log-sum-exp: one operator, and as exact as torch.logsumexp's several
    logsumexp = torch.logcumsumexp(logits, dim=0)[-1]
    # one (queries x sources) @ (sources x hidden) product per token, on strided views: BLAS reads them in place
    outputs = torch.matmul(probabilities.permute(1, 2, 3, 0), stack.permute(1, 2, 0, 3))
    return outputs, logsumexp, scores, probabilities


class PhaseOneFunction(torch.autograd.Function):
    """`phase_one` with a hand-written backward that keeps no copy of the sources.

    Autograd would save each block's stack of sources for its backward: O(N²·d) per token over N blocks, where Block
    AttnRes needs O(N·d). This function saves only the small scores and probabilities and reads the sources back from
    the buffer they live in (held as a plain reference: saved-tensor hooks such as activation offloading would pack
    the buffer once per block, the O(N²) this function exists to avoid). Later commits only write slots beyond the
    ones it read (`CommitSourceFunction`), so what it reads back is what it read.
    """

    @staticmethod
    def forward(ctx, sources, sources_inv_rms, queries):
        outputs, logsumexp, scores, probabilities = phase_one(sources, sources_inv_rms, queries)
        ctx.sources, ctx.sources_inv_rms = sources, sources_inv_rms
        ctx.save_for_backward(queries, scores, probabilities)
        ctx.set_materialize_grads(False)  # an output nothing reads gets None, not a tensor of zeros
        return outputs, logsumexp, probabilities

    @staticmethod
    def backward(ctx, grad_outputs, grad_logsumexp, grad_probabilities):
        queries, scores, probabilities = ctx.saved_tensors
        num_sources, batch, seq, hidden = ctx.sources.shape
        tokens, num_queries = batch * seq, queries.shape[0]
        stack = as_float32(ctx.sources).view(num_sources, tokens, hidden)
        probabilities = probabilities.view(num_sources, tokens, num_queries)

        # All that reaches the probabilities: directly, and through the weighted sum `outputs = Σ_i p_i v_i`.
        grad_p = None if grad_probabilities is None else grad_probabilities.view_as(probabilities)
        if grad_outputs is not None:
            grad_outputs = grad_outputs.reshape(tokens, num_queries, hidden)
            through_outputs = torch.bmm(grad_outputs, stack.permute(1, 2, 0)).permute(2, 0, 1)
            grad_p = through_outputs if grad_p is None else grad_p + through_outputs
        # softmax backward, p ⊙ (g - Σ_i p_i g_i), plus d logsumexp / d logits = p
        grad_logsumexp = None if grad_logsumexp is None else grad_logsumexp.view(tokens, num_queries)
        if grad_p is None:
            grad_logits = probabilities * grad_logsumexp
        else:
            weighted = probabilities * grad_p
            centre = weighted.sum(0) if grad_logsumexp is None else weighted.sum(0) - grad_logsumexp
            grad_logits = torch.addcmul(weighted, probabilities, centre, value=-1)
        grad_scores = grad_logits * ctx.sources_inv_rms.view(num_sources, tokens, 1)  # logits = scores / rms(v)

        grad_sources = grad_inv_rms = grad_queries = None
        if ctx.needs_input_grad[0]:
            # Token-major (tokens, sources, hidden), so that the weighted sum's gradient, Σ_q p_q g_q per token, is
            # added in place by one batched product (into a source-major view BLAS would take one call per token).
            grad_sources = torch.mm(grad_scores.transpose(0, 1).reshape(-1, num_queries), queries)
            grad_sources = grad_sources.view(tokens, num_sources, hidden)
            if grad_outputs is not None:
                grad_sources.baddbmm_(probabilities.transpose(0, 1), grad_outputs)
            grad_sources = grad_sources.transpose(0, 1).view(num_sources, batch, seq, hidden)
        if ctx.needs_input_grad[1]:
            grad_inv_rms = (grad_logits * scores.view_as(grad_logits)).sum(-1).view(num_sources, batch, seq)
        if ctx.needs_input_grad[2]:
            grad_queries = torch.mm(grad_scores.view(-1, num_queries).t(), stack.view(-1, hidden))
        return grad_sources, grad_inv_rms, grad_queries


def phase_two(
    output: torch.Tensor, logsumexp: torch.Tensor, query: torch.Tensor, partial_sum: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 2 (Algorithm 1's online-softmax merge): the running partial sum `p` joins phase 1's read as one more
    source, which is exactly the one-shot softmax over all sources.

    The completed sources' total weight is `e^ℓ / (e^ℓ + e^s) = sigmoid(ℓ - s)`, with `ℓ` their log-sum-exp and
    `s = w ⊙ γ · p / rms(p)` the partial sum's logit, and the input is the lerp from `p` to phase 1's (fp32) output
    `o` by that weight: six operators, whatever the number of sources. Every per-token scalar is kept as a `(batch,
    seq, 1)` column (`logsumexp` is one, `query` is `(hidden, 1)`), so that none needs an `unsqueeze` to scale a
    hidden vector: in decoding each operator call, a view's included, costs about as much as its arithmetic.

    Returns the input `(batch, seq, hidden)` in the partial sum's dtype, the completed sources' total weight, and,
    for the backward, `norm_with_eps(p)` and `w ⊙ γ · p` (fp32, `(batch, seq, 1)` each)."""
    partial32 = as_float32(partial_sum)
    norm = norm_with_eps(partial_sum, eps, keepdim=True)
    dot = torch.matmul(partial32, query)
    # ℓ - s, with s = dot / rms(p) = sqrt(d) · dot / norm_with_eps(p)
    completed_weight = torch.sigmoid(torch.addcdiv(logsumexp, dot, norm, value=-(partial_sum.shape[-1] ** 0.5)))
    hidden = torch.lerp(partial32, output, completed_weight)
    return cast(hidden, partial_sum.dtype), completed_weight, norm, dot


class PhaseTwoFunction(torch.autograd.Function):
    """`phase_two` with a hand-written backward: about half the operators autograd would record for its six, each
    one pass over at most three hidden-size tensors (the partial sum, phase 1's output and the incoming gradient)."""

    @staticmethod
    def forward(ctx, output, logsumexp, query, partial_sum, eps):
        hidden, completed_weight, norm, dot = phase_two(output, logsumexp, query, partial_sum, eps)
        ctx.save_for_backward(output, query, partial_sum, completed_weight, norm, dot)
        ctx.set_materialize_grads(False)
        return hidden, completed_weight

    @staticmethod
    def backward(ctx, grad_hidden, grad_completed_weight):
        output, query, partial_sum, completed_weight, norm, dot = ctx.saved_tensors
        sqrt_hidden = partial_sum.shape[-1] ** 0.5
        partial32 = as_float32(partial_sum)
        # hidden = p + a (o - p), a = sigmoid(ℓ - s), s = sqrt(d) · dot / norm, norm = sqrt(|p|² + d·eps)
        grad_weight = grad_completed_weight
        grad_output = grad_partial = None
        if grad_hidden is not None:
            grad_hidden = as_float32(grad_hidden)
            # g · (o - p) as two dot products, which read each tensor once and write no (o - p)
            rows = grad_hidden.unsqueeze(-2)
            through_hidden = torch.matmul(rows, output.unsqueeze(-1)).view_as(dot)
            through_hidden -= torch.matmul(rows, partial32.unsqueeze(-1)).view_as(dot)
            grad_weight = through_hidden if grad_weight is None else grad_weight + through_hidden
            grad_output = grad_hidden * completed_weight
            grad_partial = grad_hidden * (1 - completed_weight)
        # (the backward runs only when some output has a gradient, so `grad_weight` is never None here)
        grad_logsumexp = torch.ops.aten.sigmoid_backward(grad_weight, completed_weight)
        # d(ℓ - s)/d dot = -sqrt(d) / norm, d(ℓ - s)/d norm = sqrt(d) · dot / norm², and d norm / d p = p / norm
        grad_dot = torch.div(grad_logsumexp, norm).mul_(-sqrt_hidden)
        query_row = query.t()
        if grad_partial is None:
            grad_partial = grad_dot * query_row
        else:
            grad_partial.addcmul_(grad_dot, query_row)
        grad_partial.addcmul_(partial32, torch.mul(grad_dot, dot).div_(norm).div_(norm), value=-1)
        grad_query = torch.mm(partial32.reshape(-1, partial32.shape[-1]).t(), grad_dot.reshape(-1, 1))
        return grad_output, grad_logsumexp, grad_query, grad_partial, None


class TwoPhaseDepthAttention:
    """The paper's two-phase computation (§4.2, Algorithm 1): exact, and O(N·d) in activation memory.

    `read` is phase 1 (`phase_one`): several aggregations attend at once over the completed sources, which do not
    change within a block, so each source is read twice (logits, weighted sum) whatever the number of queries.
    `merge` is phase 2 (`phase_two`). Each source's `1 / rms` is computed once, when it is committed. In training
    both phases run as autograd functions with hand-written backwards. See `NaiveDepthAttention` for the interface."""

    @staticmethod
    def read(sources, sources_inv_rms, queries: DepthQueries) -> list:
        queries = queries.folded()
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            outputs, logsumexp, probabilities = PhaseOneFunction.apply(sources, sources_inv_rms, queries)
        else:  # no autograd, or `torch.compile`, which plans the saved memory itself
            outputs, logsumexp, _, probabilities = phase_one(sources, sources_inv_rms, queries)
        # per query: its output, its log-sum-exp and its query as columns (see `phase_two`), and the probabilities of
        # all the block's queries with the query's index in them (sliced only if the weights are asked for)
        return [
            (output, logsumexp, probabilities, index, query, sources.dtype)
            for index, (output, logsumexp, query) in enumerate(
                zip(outputs.unbind(-2), logsumexp.unsqueeze(-1).unbind(-2), queries.unsqueeze(-1).unbind(0))
            )
        ]

    @staticmethod
    def merge(read, partial_sum, eps: float, return_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        output, logsumexp, probabilities, index, query, dtype = read
        weights = probabilities[..., index].permute(1, 2, 0) if return_weights else None
        if partial_sum is None:
            return cast(output, dtype), weights
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            hidden, completed_weight = PhaseTwoFunction.apply(output, logsumexp, query, partial_sum, eps)
        else:
            hidden, completed_weight, _, _ = phase_two(output, logsumexp, query, partial_sum, eps)
        if return_weights:
            weights = torch.cat([weights * completed_weight, 1 - completed_weight], -1)
        return hidden, weights

    @staticmethod
    def merge_norm(
        read,
        partial_sum: torch.Tensor | None,
        eps: float,
        return_weights: bool,
        norm_weight: torch.Tensor,
        norm_eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """`merge`, and the PreNorm RMSNorm of weight `norm_weight` and eps `norm_eps` that reads its result
        (`rms_norm`: one operator and one pass over the input fewer than the module): `(hidden, weights, normed)`."""
        hidden, weights = TwoPhaseDepthAttention.merge(read, partial_sum, eps, return_weights)
        return hidden, weights, rms_norm(hidden, norm_weight, norm_eps)


# `config.attn_res_implementation` -> implementation; a fused kernel plugs in with the same two static methods (and may
# add `merge_norm`: the merge with the RMSNorm that reads it, computed together). "auto" picks one per device
# (`depth_attention`).
ATTN_RES_IMPLEMENTATIONS = {
    "naive": NaiveDepthAttention,
    "two_phase": TwoPhaseDepthAttention,
    "triton": TritonDepthAttention,  # attnres_triton.py; None where triton does not import
}


def depth_attention(config: AttnResConfig, device: torch.device) -> type:
    """The implementation `config.attn_res_implementation` names for tensors on `device`; "auto" is the fused Triton
    kernels on CUDA where triton imports, and `two_phase` everywhere else."""
    name = config.attn_res_implementation
    if name == "auto":
        name = "triton" if device.type == "cuda" and TritonDepthAttention is not None else "two_phase"
    implementation = ATTN_RES_IMPLEMENTATIONS[name]
    if implementation is None:
        raise ImportError(
            f"attn_res_implementation='triton' needs triton ({TRITON_UNAVAILABLE}): pip install triton, or use "
            "attn_res_implementation='two_phase'."
        )
    return implementation


class CommitSourceFunction(torch.autograd.Function):
    """Write a source and its `1 / rms` into the next slot of the shared buffers, for autograd, and return the
    completed sources so far as views of the buffers.

    Each source is stored once and every phase 1 reads it from there (O(N·d) per token). Each commit's outputs are
    the `k + 1` completed slots, and what reads them reads exactly those views, so the gradients that flow back are
    `k + 1` slots wide, never the whole buffer: the backward hands slot `k` to the source (with the gradient that
    reached its `1 / rms`) and the first `k` slots on to the earlier commits.

    The write is hidden from autograd's version counter. Reentrant activation checkpointing saves the completed
    sources as every layer's input and would otherwise reject each later commit, although a commit only fills a slot
    that nothing has read yet: every reader (`PhaseOneFunction`, checkpointed layers) reads only slots written before
    it ran.
    """

    @staticmethod
    def forward(ctx, sources, sources_inv_rms, buffer, inv_rms_buffer, source, eps):
        index = sources.shape[0]
        # A private torch API, checked on torch 2.6 and 2.13 (where it takes one tensor) and covered by the reentrant
        # activation-checkpointing tests on both.
        with torch.autograd._unsafe_preserve_version_counter(buffer):
            buffer[index] = source
        with torch.autograd._unsafe_preserve_version_counter(inv_rms_buffer):
            inverse_rms(source, eps, out=inv_rms_buffer[index])
        ctx.index, ctx.buffer, ctx.inv_rms_buffer = index, buffer, inv_rms_buffer
        ctx.set_materialize_grads(False)
        return buffer[: index + 1], inv_rms_buffer[: index + 1]

    @staticmethod
    def backward(ctx, grad_sources, grad_inv_rms):
        index = ctx.index
        grad_source = None if grad_sources is None else grad_sources[index]
        if grad_inv_rms is not None:  # r = (|v|²/d + eps)^(-1/2): dr/dv = -r³ v / d
            source, inv_rms = ctx.buffer[index], ctx.inv_rms_buffer[index]
            coefficient = inv_rms.pow(3).mul_(grad_inv_rms[index]).unsqueeze(-1)
            if grad_source is None:
                grad_source = torch.mul(source, coefficient).mul_(-1 / source.shape[-1])
            else:
                grad_source = torch.addcmul(grad_source, source, coefficient, value=-1 / source.shape[-1])
        earlier = None if grad_sources is None or not ctx.needs_input_grad[0] else grad_sources[:index]
        earlier_inv_rms = None if grad_inv_rms is None or not ctx.needs_input_grad[1] else grad_inv_rms[:index]
        return earlier, earlier_inv_rms, None, None, grad_source, None


class CompletedSources:
    """The completed sources of one forward (the token embedding, the finished block sums, or in Full AttnRes every
    sublayer output) and their `1 / rms`, oldest first.

    They live in two buffers allocated once, each source written once when it completes (O(N·d) per token);
    `values` and `inv_rms` are the filled part, the views every phase 1 and every layer reads. Without autograd the
    buffers are written in place; eager autograd goes through `CommitSourceFunction`; `torch.compile` traces an
    out-of-place write, which the compiler may turn back into an in-place one."""

    def __init__(self, like: torch.Tensor, capacity: int) -> None:
        self.buffer = like.new_empty(capacity, *like.shape)
        self.inv_rms_buffer = like.new_empty(self.buffer.shape[:-1], dtype=torch.float32)
        self.values, self.inv_rms = self.buffer[:0], self.inv_rms_buffer[:0]

    def commit(self, source: torch.Tensor, eps: float) -> None:
        """Make `source` the next completed source, with its `1 / rms` computed here once for every aggregation that
        will read it."""
        index = self.values.shape[0]
        if not torch.is_grad_enabled():
            self.buffer[index] = source
            inverse_rms(source, eps, out=self.inv_rms_buffer[index])
        elif torch.compiler.is_compiling():
            self.buffer = self.buffer.slice_scatter(source.unsqueeze(0), start=index, end=index + 1)
            self.inv_rms_buffer = self.inv_rms_buffer.slice_scatter(
                inverse_rms(source, eps).unsqueeze(0), start=index, end=index + 1
            )
        else:
            self.values, self.inv_rms = CommitSourceFunction.apply(
                self.values, self.inv_rms, self.buffer, self.inv_rms_buffer, source, eps
            )
            return
        self.values, self.inv_rms = self.buffer[: index + 1], self.inv_rms_buffer[: index + 1]


class AttnResAggregation(nn.Module):
    """The input of one sublayer (or of the final norm) as a softmax over depth: this aggregation's phase-2 `merge` of
    its phase-1 read with the running partial sum, by the implementation that made the read; given the weight and eps
    of the PreNorm RMSNorm that reads the result, also that norm in the same pass (`merge_norm`; see
    `normalized_input`).

    It holds no weights: its pseudo-query and key norm are its layer's `*_res_proj` / `*_res_norm` (Kimi K3's parameter
    names), which phase 1 reads for every aggregation of a layer or block at once. It is the module that
    `output_depth_attentions=True` records (`_can_record_outputs`): the weights come back as its second output.
    """

    def __init__(self, config: AttnResConfig) -> None:
        super().__init__()
        self.eps = config.rms_norm_eps  # the key norm's, read once as the RMSNorms read theirs

    def forward(
        self,
        implementation: type,
        read,
        partial_sum: torch.Tensor | None,
        norm_weight: torch.Tensor | None = None,
        norm_eps: float = 0.0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns the aggregated input `h`, its depth weights (when `output_depth_attentions`), and with `norm_weight`
        the RMSNorm of `h` (else `None`)."""
        return_weights = kwargs.get("output_depth_attentions", False)
        if norm_weight is not None:
            return implementation.merge_norm(read, partial_sum, self.eps, return_weights, norm_weight, norm_eps)
        hidden, weights = implementation.merge(read, partial_sum, self.eps, return_weights)
        return hidden, weights, None


def normalized_input(
    aggregation: AttnResAggregation,
    implementation: type,
    read,
    partial_sum: torch.Tensor | None,
    norm: nn.Module,
    **kwargs: Unpack[TransformersKwargs],
) -> torch.Tensor:
    """`norm(h)`, the input a sublayer (or the output head) reads, with `h` from `aggregation`: computed in the merge
    where the implementation can (`merge_norm`) and the norm may be computed from its weight (`fusable_norm_weight`),
    else by calling the norm. The norm's weight and eps go to the aggregation, never the module: module hooks
    (accelerate's among them) move a module passed as an argument."""
    if hasattr(implementation, "merge_norm") and (weight := fusable_norm_weight(norm)) is not None:
        return aggregation(implementation, read, partial_sum, weight, norm.variance_epsilon, **kwargs)[2]
    return norm(aggregation(implementation, read, partial_sum, **kwargs)[0])


def calls_only_forward(module: nn.Module) -> bool:
    """Whether calling `module` runs its class's `forward` and nothing else: no forward or backward hooks on it and no
    `forward` replaced on the instance (accelerate's hooks replace it, DeepSpeed ZeRO-3 and users add hooks; PEFT's
    wrappers are classes of their own, which callers rule out by type). Only then may the model compute what the call
    would, or read the parameter the call would return, without the call (module-wide global hooks are not checked)."""
    # nn.Module's own hook dictionaries, those its `_call_impl` checks (private; the same on torch 2.6 and 2.13,
    # covered by tests/test_modeling_attnres.py::test_hooked_depth_parameters_are_read_by_calling_their_module)
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in vars(module)
    )


def fusable_norm_weight(norm: nn.Module) -> torch.Tensor | None:
    """The weight from which an implementation may compute `norm` instead of calling it, or `None`: a plain
    `AttnResRMSNorm` (`calls_only_forward`) holding its whole weight (not an FSDP or ZeRO-3 shard, nor an offloaded
    placeholder on the meta device)."""
    if type(norm) is not AttnResRMSNorm or not calls_only_forward(norm):
        return None
    # the norm's one parameter, checked directly: `holds_full_parameters` walks the module, which, 33 times per step,
    # costs a decoding step more than its launches do
    weight = norm.weight
    return weight if type(weight) is nn.Parameter and weight.device.type != "meta" and weight.numel() > 0 else None


def holds_full_parameters(module: nn.Module, device: torch.device) -> bool:
    """Whether `module`'s parameters are plain tensors on `device` that hold their whole value right now. Engines that
    shard or offload a module (FSDP's DTensors, DeepSpeed ZeRO-3's empty placeholders, accelerate's meta-device
    offload) materialize them only inside the forward of the module they wrap."""
    return all(is_whole(parameter, device) for parameter in module.parameters())


def is_whole(parameter: torch.Tensor, device: torch.device) -> bool:
    """Whether `parameter` is a plain parameter on `device` holding its whole value (see `holds_full_parameters`)."""
    return type(parameter) is nn.Parameter and parameter.device == device and parameter.numel() > 0


def depth_parameter(module: nn.Module) -> torch.Tensor:
    """What calling a depth module (`AttnResPseudoQuery`, `AttnResKeyNorm`, or PEFT's wrapper of one) returns: read
    directly when the call would run only the module's `forward` (`calls_only_forward`; 66 module calls cost a
    decoding step more than the aggregations' own launches), else by the call, which offloading hooks and PEFT's
    `modules_to_save` wrappers must see."""
    return module.weight if reads_directly(module) else module()


def shared_depth_parameter(module: nn.Module, device: torch.device) -> torch.Tensor | None:
    """`depth_parameter(module)` if the model may read it from outside the forward of the layer holding it, to share
    the block's phase 1; else `None`. It may if the parameter holds its whole value on `device` now (engines that
    shard or offload a layer materialize it only inside the layer's forward: `holds_full_parameters`), checked before
    any call (a ZeRO-3 hook would gather it for the call and release it after, under the reference kept)."""
    if reads_directly(module):
        weight = module.weight
        return weight if is_whole(weight, device) else None
    return module() if holds_full_parameters(module, device) else None


def reads_directly(module: nn.Module) -> bool:
    """Whether a depth module's parameter may be read without calling it: a plain `AttnResPseudoQuery` or
    `AttnResKeyNorm` whose call would run only its `forward`, which returns it (`calls_only_forward`)."""
    return type(module) in DEPTH_MODULES and calls_only_forward(module)


class OffloadedLayerInputs(torch.autograd.graph.saved_tensors_hooks):
    """`activation_checkpointing_enable(offload=True)` (transformers 5.23's option): the tensors that a checkpointed
    layer saves for its recompute (its inputs) are held in host memory by torch's `save_on_cpu`, pinned on an
    accelerator, except the completed-source buffers.

    Every layer receives a view of those buffers. Offloading each view, as transformers' own `offload` does, would
    copy every completed source once per layer: O(L·N·d) host memory and transfers per token (O(L²·d) in Full
    AttnRes) for buffers that exist once, O(N·d), and stay on the device anyway for phase 1's backward
    (`PhaseOneFunction`). They are saved by reference instead. On a CPU nothing is copied at all (`save_on_cpu`
    without pinning keeps CPU tensors as they are)."""

    def __init__(self, *shared: torch.Tensor) -> None:
        device = shared[0].device
        offload = torch.autograd.graph.save_on_cpu(pin_memory=device.type != "cpu", device_type=device.type)
        shared_storages = {tensor.untyped_storage().data_ptr() for tensor in shared}

        def pack(tensor: torch.Tensor):
            if tensor.untyped_storage().data_ptr() in shared_storages:
                return tensor
            return offload.pack_hook(tensor)

        def unpack(packed) -> torch.Tensor:
            return packed if isinstance(packed, torch.Tensor) else offload.unpack_hook(packed)

        super().__init__(pack, unpack)


@dataclass(frozen=True)
class FamilySublayer:
    """One sublayer of a decoder layer, by the names of the layer's children: the PreNorm that reads the
    residual stream, the sublayer itself, and the modules applied to its output before it joins the residual sum
    (Gemma 2's and GLM-4's post-norms, Phi-3's residual dropout): for AttnRes they are part of the sublayer's value."""

    norm: str
    module: str
    output_modules: tuple[str, ...] = ()


# This file's Llama-family layers: attention, then MLP, nothing applied to their outputs.
LLAMA_SUBLAYERS = (FamilySublayer("input_layernorm", "self_attn"), FamilySublayer("post_attention_layernorm", "mlp"))


class AttnResDecoderLayer(GradientCheckpointingLayer):
    """One attention and one MLP sublayer, each reading its input through an AttnRes aggregation and keeping its
    PreNorm: `f_l(RMSNorm(h_l))`.

    The depth state travels between layers as three positional tensors (so that activation checkpointing tracks their
    gradients and accelerate's hooks move them): `hidden_states`, the running sum of the sublayer outputs since the
    last commit (the current block's partial sum), and the completed sources with their `1 / rms`. The model commits
    sources between layers, so a layer never writes them and a recomputed (checkpointed) layer sees its inputs
    unchanged; at a layer that opens a block, `hidden_states` has just been committed and a new partial sum starts.

    Which children are each sublayer's PreNorm and module, and what is applied to a sublayer's output, are `sublayers`
    and `residual_multiplier`: this file's Llama-family modules here, a family's own in `AttnResFamilyDecoderLayer`.
    """

    sublayers: tuple[FamilySublayer, FamilySublayer] = LLAMA_SUBLAYERS
    residual_multiplier: float | None = None

    def __init__(self, config: AttnResConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.attention_type = config.layer_types[layer_idx]
        self.self_attn = AttnResAttention(config=config, layer_idx=layer_idx)
        self.mlp = AttnResMLP(config)
        attention, mlp = 2 * layer_idx, 2 * layer_idx + 1  # the two sublayers' indices
        # A zero-query aggregation over n sources is the PreNorm stream / n, and RMSNorm_ε(x / n) = RMSNorm_{n²ε}(x):
        # this eps makes a graft compute its source's function exactly (see AttnResModel).
        self.input_layernorm = AttnResRMSNorm(
            config.hidden_size, config.rms_norm_eps / config.num_depth_sources(attention) ** 2
        )
        self.post_attention_layernorm = AttnResRMSNorm(
            config.hidden_size, config.rms_norm_eps / config.num_depth_sources(mlp) ** 2
        )
        self.add_depth_modules(config, layer_idx)

    def add_depth_modules(self, config: AttnResConfig, layer_idx: int) -> None:
        """The AttnRes parameters and aggregations of the layer's two sublayers, and where the layer stands in its
        block: the same in every family."""
        attention, mlp = 2 * layer_idx, 2 * layer_idx + 1
        self.self_attention_res_proj = AttnResPseudoQuery(config.hidden_size)
        self.self_attention_res_norm = AttnResKeyNorm(config.hidden_size)
        self.mlp_res_proj = AttnResPseudoQuery(config.hidden_size)
        self.mlp_res_norm = AttnResKeyNorm(config.hidden_size)
        self.attention_input = AttnResAggregation(config)
        self.mlp_input = AttnResAggregation(config)
        self.starts_block = config.sublayer_starts_block(attention)
        # Full AttnRes: the MLP opens a block of its own. It reads the attention output as the partial sum (the same
        # softmax as reading it as a completed source), so that both sublayers share one phase 1; the model then
        # commits the attention output.
        self.mlp_starts_block = config.sublayer_starts_block(mlp)

    def is_recomputed(self) -> bool:
        """Whether this call of the layer runs under activation checkpointing: the condition on which
        `GradientCheckpointingLayer` (unchanged from transformers 5.4 to 5.25) checkpoints `forward`."""
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def depth_modules(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        """The modules holding the layer's depth parameters: the attention's and the MLP's pseudo-queries, then their
        key norms."""
        return self.self_attention_res_proj, self.mlp_res_proj, self.self_attention_res_norm, self.mlp_res_norm

    def depth_query_parts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The pseudo-queries `w` and key-norm scales `γ` of the layer's two aggregations (attention, MLP), for
        `DepthQueries`."""
        attention_query, mlp_query, attention_key_weight, mlp_key_weight = map(depth_parameter, self.depth_modules())
        return [attention_query, mlp_query], [attention_key_weight, mlp_key_weight]

    def shared_depth_query_parts(self, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """`depth_query_parts` read by the model, to share the block's phase 1, or `None` where it may not read them
        from outside the layer's forward (`shared_depth_parameter`). Only the layer's four depth parameters are
        checked: walking the whole layer, every step, cost a decoding step more than the aggregations' launches."""
        parameters = []
        for module in self.depth_modules():
            if (parameter := shared_depth_parameter(module, device)) is None:
                return None
            parameters.append(parameter)
        return parameters[:2], parameters[2:]

    def sublayer_output(self, sublayer: FamilySublayer, output) -> torch.Tensor:
        """The value a sublayer adds to the residual stream: its output (the first entry of a tuple, an attention's
        or a router-returning MoE block's), through its output modules, times the multiplier."""
        if isinstance(output, tuple):
            output = output[0]
        for name in sublayer.output_modules:
            output = getattr(self, name)(output)
        if self.residual_multiplier is not None:
            output = output * self.residual_multiplier
        return output

    @accepts_both_cache_names
    def forward(
        self,
        hidden_states: torch.Tensor,
        sources: torch.Tensor,
        sources_inv_rms: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | dict | None = None,
        depth_reads: list | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`sources` / `sources_inv_rms` are the completed sources this layer reads. `depth_reads`: the layer's two
        phase-1 reads when the model computed phase 1 for its whole block; otherwise the layer computes them.
        `position_embeddings` may map layer types to their own (Gemma 3).

        Returns the running sum after the layer and, in Full AttnRes, the attention output for the model to commit."""
        partial_sum = None if self.starts_block else hidden_states
        implementation = depth_attention(self.config, hidden_states.device)
        if depth_reads is None:
            depth_reads = implementation.read(sources, sources_inv_rms, DepthQueries(*self.depth_query_parts()))
        attention_read, mlp_read = depth_reads
        if isinstance(position_embeddings, dict):
            position_embeddings = position_embeddings[self.attention_type]
        attention, mlp = self.sublayers

        attention_norm = getattr(self, attention.norm)
        attention_input = normalized_input(
            self.attention_input, implementation, attention_read, partial_sum, attention_norm, **kwargs
        )
        attention_output = getattr(self, attention.module)(
            hidden_states=attention_input,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            # a family's attention takes the cache under the installed release's name only: under the other it would
            # land in **kwargs and the cache would silently never be updated
            **{CACHE_NAME: cache},
            **kwargs,
        )
        attention_output = self.sublayer_output(attention, attention_output)
        partial_sum = attention_output if partial_sum is None else partial_sum + attention_output

        mlp_norm = getattr(self, mlp.norm)
        mlp_input = normalized_input(self.mlp_input, implementation, mlp_read, partial_sum, mlp_norm, **kwargs)
        mlp_output = self.sublayer_output(mlp, getattr(self, mlp.module)(mlp_input))
        # CODEPATH: Full AttnRes (residual_mode "full"): every sublayer output is a source of its own.
        if self.mlp_starts_block:
            return mlp_output, attention_output
        return partial_sum + mlp_output, None


# ---------------------------------------------------------------------------------------------------------------------
# Other PreNorm families. Their decoder layers are built from transformers' own classes for the family (attention,
# MLP or sparse MoE block, norms, rotary embedding, under their own parameter names, so a graft copies the source's
# tensors unchanged); AttnRes replaces only the residual sums. What differs between families around the sublayers is
# declared in one `FamilyLayout` per family: a new family is a new entry, not new model code.


@dataclass(frozen=True)
class FamilyLayout:
    """How a transformers family's PreNorm decoder computes around its sublayers.

    The modules are the classes `<prefix>DecoderLayer`, `<prefix>RotaryEmbedding` and `<prefix>PreTrainedModel` of
    `transformers.models.<package>.modeling_<package>`; the model adopts each decoder layer's children. The other
    fields name config fields (or are `None` where the family has no such step)."""

    package: str
    prefix: str
    sublayers: tuple[FamilySublayer, FamilySublayer] = LLAMA_SUBLAYERS  # attention, then MLP
    norm_eps: str = "variance_epsilon"  # the norms' attribute holding their eps (Gemma's: `eps`)
    fixed_norm_eps: float | None = None  # a norm that hard-codes its eps (OLMo's LayerNorm): replaced, see below
    scaled_embedding: str | None = None  # an embedding class that multiplies by sqrt(hidden_size) (Gemma)
    embedding_multiplier: str | None = None  # the embeddings times this field (Granite)
    residual_multiplier: str | None = None  # each sublayer output times this field (Granite)
    logits_divisor: str | None = None  # logits / this field (Granite)
    logit_softcapping: str | None = None  # logits = c * tanh(logits / c), c this field (Gemma 2, Gemma 3)
    rope_per_layer_type: bool = False  # `rotary_emb(x, position_ids, layer_type)` (Gemma 3)
    moe: bool = False  # sparse MoE MLPs: router logits recorded, auxiliary loss as the family computes it
    long_rope_cache_reset: bool = False  # `generate` recomputes the cache past the short-rope positions (Phi-3)


GEMMA2_SUBLAYERS = (
    FamilySublayer("input_layernorm", "self_attn", ("post_attention_layernorm",)),
    FamilySublayer("pre_feedforward_layernorm", "mlp", ("post_feedforward_layernorm",)),
)

# source model_type -> layout. Llama, Mistral, Qwen2 and Qwen3 are not here: they use this file's own Llama-family
# modules (`source_model_type=None`), the path tuned for speed (fused norms, Triton kernels).
FAMILY_LAYOUTS = {
    "qwen3_moe": FamilyLayout("qwen3_moe", "Qwen3Moe", moe=True),
    "qwen2_moe": FamilyLayout("qwen2_moe", "Qwen2Moe", moe=True),
    "mixtral": FamilyLayout("mixtral", "Mixtral", moe=True),
    "gemma": FamilyLayout("gemma", "Gemma", norm_eps="eps", scaled_embedding="GemmaTextScaledWordEmbedding"),
    "gemma2": FamilyLayout(
        "gemma2",
        "Gemma2",
        GEMMA2_SUBLAYERS,
        norm_eps="eps",
        scaled_embedding="Gemma2TextScaledWordEmbedding",
        logit_softcapping="final_logit_softcapping",
    ),
    "gemma3_text": FamilyLayout(
        "gemma3",
        "Gemma3",
        GEMMA2_SUBLAYERS,
        norm_eps="eps",
        scaled_embedding="Gemma3TextScaledWordEmbedding",
        logit_softcapping="final_logit_softcapping",
        rope_per_layer_type=True,
    ),
    "smollm3": FamilyLayout("smollm3", "SmolLM3"),
    "phi3": FamilyLayout(
        "phi3",
        "Phi3",
        (
            FamilySublayer("input_layernorm", "self_attn", ("resid_attn_dropout",)),
            FamilySublayer("post_attention_layernorm", "mlp", ("resid_mlp_dropout",)),
        ),
        long_rope_cache_reset=True,
    ),
    "glm4": FamilyLayout(
        "glm4",
        "Glm4",
        (
            FamilySublayer("input_layernorm", "self_attn", ("post_self_attn_layernorm",)),
            FamilySublayer("post_attention_layernorm", "mlp", ("post_mlp_layernorm",)),
        ),
    ),
    "granite": FamilyLayout(
        "granite",
        "Granite",
        embedding_multiplier="embedding_multiplier",
        residual_multiplier="residual_multiplier",
        logits_divisor="logits_scaling",
    ),
    # OlmoLayerNorm computes `layer_norm(x, eps=1e-5)` with the constant in its forward (transformers 5.4 to 5.25)
    "olmo": FamilyLayout("olmo", "Olmo", fixed_norm_eps=1e-5),
}


def family_layout(config: AttnResConfig) -> FamilyLayout:
    layout = FAMILY_LAYOUTS.get(config.source_model_type)
    if layout is None:
        raise ValueError(
            f"source_model_type must be one of {sorted(FAMILY_LAYOUTS)} (or None for the Llama-family modules), got "
            f"{config.source_model_type!r}."
        )
    return layout


def family_modeling(layout: FamilyLayout):
    """The family's modeling module in the installed transformers."""
    return importlib.import_module(f"transformers.models.{layout.package}.modeling_{layout.package}")


def family_class(layout: FamilyLayout, suffix: str) -> type:
    return getattr(family_modeling(layout), layout.prefix + suffix)


class AttnResLayerNorm(nn.Module):
    """A LayerNorm without parameters whose eps can be set: what OLMo's `OlmoLayerNorm` computes, whose eps is a
    constant in its forward. LayerNorm is invariant to the scale of its input except through eps, like RMSNorm
    (`LN_ε(x / n) = LN_{n²ε}(x)`), so a graft needs `ε / n²`, which only a settable eps gives."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.normalized_shape = (hidden_size,)
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = nn.functional.layer_norm(hidden_states.to(torch.float32), self.normalized_shape, eps=self.eps)
        return hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


def norm_reading_sources(norm: nn.Module, layout: FamilyLayout, num_sources: int) -> nn.Module:
    """`norm`, the family's PreNorm, made to read an aggregation over `num_sources` sources: at zero queries the
    aggregation is the PreNorm stream / n, and `Norm_ε(x / n) = Norm_{n²ε}(x)` (see `AttnResModel`)."""
    if layout.fixed_norm_eps is not None:
        return AttnResLayerNorm(norm.normalized_shape[0], layout.fixed_norm_eps / num_sources**2)
    setattr(norm, layout.norm_eps, getattr(norm, layout.norm_eps) / num_sources**2)
    return norm


# The modules this file adds to a family model, which the family's `_init_weights` does not know.
ATTN_RES_MODULES = (AttnResPseudoQuery, AttnResKeyNorm, AttnResAggregation, AttnResLayerNorm)


class AttnResFamilyDecoderLayer(AttnResDecoderLayer):
    """A decoder layer of another family (`config.source_model_type`): the children of the family's own decoder
    layer, adopted under their own names, with each sublayer reading an AttnRes aggregation through its PreNorm and its
    output (after the family's output modules and multiplier) added to the running sum in place of the residual: the
    forward of `AttnResDecoderLayer`, with the family's `sublayers` and `residual_multiplier`."""

    def __init__(self, config: AttnResConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.config = config
        self.hidden_size = config.hidden_size
        self.attention_type = config.layer_types[layer_idx]
        layout = family_layout(config)
        self.sublayers = layout.sublayers
        # The family's own layer, built as its model builds it (`<prefix>DecoderLayer(config, layer_idx)` on
        # transformers 5.4 to 5.25), from this config, so that `set_attn_implementation` reaches its modules.
        for name, child in family_class(layout, "DecoderLayer")(config, layer_idx).named_children():
            self.add_module(name, child)
        for index, sublayer in enumerate(layout.sublayers):
            norm = norm_reading_sources(
                getattr(self, sublayer.norm), layout, config.num_depth_sources(2 * layer_idx + index)
            )
            self.add_module(sublayer.norm, norm)
        # CODEPATH: residual_multiplier (Granite checkpoints) scales every sublayer output.
        self.residual_multiplier = getattr(config, layout.residual_multiplier) if layout.residual_multiplier else None
        self.add_depth_modules(config, layer_idx)


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
    # Recorded by module name where the module's class depends on the family: every family's attention is a layer's
    # `self_attn`, every MoE router a layer's `mlp.gate` (`class_name` matches the end of the module's name, on
    # transformers 5.4 to 5.25).
    _can_record_outputs = {
        "hidden_states": AttnResDecoderLayer,
        "attentions": OutputRecorder(target_class=None, index=1, class_name="self_attn"),
        "router_logits": OutputRecorder(target_class=None, index=0, class_name="mlp.gate"),
        "depth_attentions": OutputRecorder(AttnResAggregation, index=1),
    }
    # The attention backends a family's modules support are the family's (Gemma 2 on transformers 5.25 claims no
    # sdpa, which cannot soft-cap its attention logits); a family model takes these flags from it.
    FAMILY_CAPABILITY_FLAGS = (
        "_supports_sdpa",
        "_supports_flash_attn",
        "_supports_flex_attn",
        "_supports_attention_backend",
        "_can_compile_fullgraph",
    )

    def __init__(self, config: AttnResConfig, *inputs, **kwargs):
        # CODEPATH: source_model_type (grafts of Gemma, Mixtral, Phi-3, ...): the family's capabilities, set on the
        # instance before `PreTrainedModel.__init__` checks the requested attention implementation against them.
        if config.source_model_type is not None:
            family_model = family_class(family_layout(config), "PreTrainedModel")
            for flag in self.FAMILY_CAPABILITY_FLAGS:
                object.__setattr__(self, flag, getattr(family_model, flag, False))
            # FSDP and `device_map` find the layers to keep whole by class name; a name missing from the model fails
            object.__setattr__(self, "_no_split_modules", [AttnResFamilyDecoderLayer.__name__])
        super().__init__(config, *inputs, **kwargs)

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers decides whether a model's experts implementation can be set by searching the model class's
        # source file for "@use_experts_implementation" (5.4 reads the file, 5.25 its `inspect` source). The MoE
        # blocks of a family model are the family's, which carry that decorator; the Llama-family modules have no
        # experts, which nothing then reads.
        return True

    def attn_res_parameters(self) -> dict[str, nn.Parameter]:
        """The AttnRes parameters by name: the pseudo-query (`*_res_proj`) and key norm (`*_res_norm`) of every
        sublayer and of the output. They are what a PreNorm checkpoint lacks, and what healing a graft trains."""
        return {name: param for name, param in self.named_parameters() if ATTN_RES_PARAMETER.search(name)}

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Activation checkpointing, under the name and with the options of transformers 5.23 (where
        `gradient_checkpointing_enable` is a deprecated alias that calls this) on every supported release.

        Args:
            activation_checkpointing_kwargs (`dict`, *optional*):
                Passed to `torch.utils.checkpoint.checkpoint` (default `{"use_reentrant": False}`).
            every_n_layers (`int`, *optional*, defaults to 1):
                Checkpoint only decoder layers `0, n, 2n, ...`; the others keep their activations and share their
                block's phase 1.
            offload (`bool`, *optional*, defaults to `False`):
                Hold what the checkpointed layers save for their recompute in host memory, except the shared
                completed-source buffers (see `OffloadedLayerInputs`), so that the sources stay O(N·d).
        """
        if not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
        if hasattr(PreTrainedModel, "activation_checkpointing_enable"):  # transformers >= 5.23
            super().activation_checkpointing_enable(activation_checkpointing_kwargs)
        else:
            super().gradient_checkpointing_enable(activation_checkpointing_kwargs)
        decoder_layers = [module for module in self.modules() if isinstance(module, AttnResDecoderLayer)]
        for index, layer in enumerate(decoder_layers):
            layer.gradient_checkpointing = index % every_n_layers == 0
        for module in self.modules():
            if isinstance(module, AttnResModel):
                module.offloads_checkpointed_inputs = offload

    def activation_checkpointing_disable(self) -> None:
        """Switch activation checkpointing off, under transformers 5.23's name on every supported release."""
        if hasattr(PreTrainedModel, "activation_checkpointing_disable"):  # transformers >= 5.23
            super().activation_checkpointing_disable()
        else:
            super().gradient_checkpointing_disable()

    def _init_weights(self, module: nn.Module) -> None:
        if self.config.source_model_type is None:
            super()._init_weights(module)
        elif not isinstance(module, ATTN_RES_MODULES):  # CODEPATH: source_model_type: the family initialises its own
            family_initializer(self.config)._init_weights(module)
        # `init.*_` skip tensors loaded from a checkpoint and fill those a checkpoint lacks (a graft's).
        if isinstance(module, AttnResPseudoQuery):
            init.zeros_(module.weight)  # paper §3: "all pseudo-query vectors must be initialized to zero"
        elif isinstance(module, AttnResKeyNorm):
            init.ones_(module.weight)


def family_initializer(config: AttnResConfig) -> PreTrainedModel:
    """An instance of the family's `PreTrainedModel` whose `_init_weights` initialises the family's modules as the
    family does, non-persistent buffers included (Gemma's `embed_scale`, Gemma 3's per-layer-type `inv_freq`), which
    loading from the meta device leaves to it. Created without `__init__` (its `_init_weights` reads only `config`,
    and calls the zero-argument `super()`, which needs an instance of its class; checked on transformers 5.4 and
    5.25, and covered by the family save/load tests)."""
    family_model = family_class(family_layout(config), "PreTrainedModel")
    initializer = family_model.__new__(family_model)
    object.__setattr__(initializer, "config", config)
    return initializer


@dataclass
class AttnResModelOutputWithPast(BaseModelOutputWithPast, *OUTPUT_CACHE_ALIAS):
    r"""
    hidden_states (`tuple(torch.Tensor)`, *optional*, returned when `output_hidden_states=True`):
        `num_hidden_layers + 1` tensors of shape `(batch_size, sequence_length, hidden_size)`: the token embedding,
        then each decoder layer's output as Llama and transformers' in-tree Block AttnRes (Inkling2) report it, which
        here is the running sum of the current block (in Full AttnRes, the layer's MLP output), and last the final
        normalised output. The inputs the sublayers read are the first outputs of the `attention_input` /
        `mlp_input` modules.
    depth_attentions (`tuple(torch.Tensor)`, *optional*, returned when `output_depth_attentions=True`):
        `2 * num_hidden_layers + 1` fp32 tensors of shape `(batch_size, sequence_length, num_sources)`, one per
        sublayer and one for the final output: each aggregation's softmax weights over its sources (the embedding,
        the completed blocks or sublayer outputs, then the running partial sum); `attnres.layout.depth_source_names`
        names them.
    router_logits (`tuple(torch.Tensor)`, *optional*, returned when `output_router_logits=True`):
        A sparse MoE family's router logits, one tensor per MoE layer, as the family returns them.
    """

    depth_attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class AttnResCausalLMOutputWithPast(CausalLMOutputWithPast, *OUTPUT_CACHE_ALIAS):
    r"""
    depth_attentions (`tuple(torch.Tensor)`, *optional*, returned when `output_depth_attentions=True`):
        See [`AttnResModelOutputWithPast`].
    router_logits (`tuple(torch.Tensor)`, *optional*, returned when `output_router_logits=True`):
        See [`AttnResModelOutputWithPast`].
    aux_loss (`torch.Tensor`, *optional*, returned when `output_router_logits=True`):
        A sparse MoE family's load-balancing loss, computed by the family's own `load_balancing_loss_func`; `loss`
        includes it times `router_aux_loss_coef` when `labels` are given, as in the family's model.
    """

    depth_attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None


class AttnResModel(AttnResPreTrainedModel):
    """The AttnRes decoder (no language-model head).

    Sublayer `l` reads `h_l = Σ_i α_{i→l} v_i`, `α_{i→l} = softmax_i(w_l · RMSNorm(v_i))`, over its sources (paper
    Eq. 2-6): the token embedding, the completed block sums and the current block's partial sum (Block AttnRes), or
    every earlier sublayer output (Full AttnRes). The final output aggregates all sources with its own pseudo-query
    before the final norm.

    Exactness at zero init. With all pseudo-queries zero, `h_l` is the mean of its `n_l` sources, and their sum is the
    PreNorm residual stream `x_l`, so `h_l = x_l / n_l`. Every reader of `h_l` is an RMSNorm, which is scale invariant
    except through its eps: `RMSNorm_ε(x / n) = RMSNorm_{n²ε}(x)`. The PreNorm reading an aggregation over `n_l`
    sources therefore uses `ε / n_l²`, which makes a zero-query AttnRes model compute exactly the PreNorm network with
    the same weights (up to floating-point rounding), at no cost: it is a constant per sublayer.
    """

    _auto_class = "AutoModel"  # `save_pretrained` ships this file and the config's as remote code

    def __init__(self, config: AttnResConfig):
        super().__init__(config)
        if config.attn_res_implementation not in {"auto", *ATTN_RES_IMPLEMENTATIONS}:
            raise ValueError(
                f"attn_res_implementation must be one of {sorted({'auto', *ATTN_RES_IMPLEMENTATIONS})}, got "
                f"{config.attn_res_implementation!r}."
            )
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        output = 2 * config.num_hidden_layers  # the final output reads like one more sublayer
        self.embedding_multiplier = None
        self.rope_layer_types = None
        if config.source_model_type is None:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
            self.layers = nn.ModuleList(
                [AttnResDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
            )
            self.norm = AttnResRMSNorm(
                config.hidden_size, eps=config.rms_norm_eps / config.num_depth_sources(output) ** 2
            )
            self.rotary_emb = AttnResRotaryEmbedding(config=config)
        else:  # CODEPATH: source_model_type (grafts of Gemma, Mixtral, Phi-3, ...): the family's own modules
            self.init_family_modules(config, family_layout(config), output)
        self.output_attn_res_proj = AttnResPseudoQuery(config.hidden_size)
        self.output_attn_res_norm = AttnResKeyNorm(config.hidden_size)
        self.final_input = AttnResAggregation(config)
        self.offloads_checkpointed_inputs = False  # set by `activation_checkpointing_enable(offload=True)`
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        # the completed sources the final output reads (the last partial sum is merged in, never committed)
        self.max_completed_sources = config.num_depth_sources(output) - 1
        self.post_init()

    def init_family_modules(self, config: AttnResConfig, layout: FamilyLayout, output: int) -> None:
        """The embedding, layers, final norm and rotary embedding of `layout`'s family, built as the family's model
        builds them (the signatures used are those of transformers 5.4 to 5.25)."""
        if layout.scaled_embedding is not None:
            self.embed_tokens = family_class(layout, "TextScaledWordEmbedding")(
                config.vocab_size, config.hidden_size, self.padding_idx, embed_scale=config.hidden_size**0.5
            )
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [AttnResFamilyDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        # The family's final norm is its PreNorm class with eps `rms_norm_eps` (in every family here): a copy of the
        # first layer's, given that eps, then made to read the output's aggregation.
        final_norm = copy.deepcopy(getattr(self.layers[0], layout.sublayers[0].norm))
        if layout.fixed_norm_eps is None:
            setattr(final_norm, layout.norm_eps, config.rms_norm_eps)
        self.norm = norm_reading_sources(final_norm, layout, config.num_depth_sources(output))
        self.rotary_emb = family_class(layout, "RotaryEmbedding")(config=config)
        # CODEPATH: embedding_multiplier (Granite checkpoints).
        if layout.embedding_multiplier is not None:
            self.embedding_multiplier = getattr(config, layout.embedding_multiplier)
        # CODEPATH: rope_per_layer_type (Gemma 3 checkpoints): one rotary embedding per attention type.
        if layout.rope_per_layer_type:
            self.rope_layer_types = sorted(set(config.layer_types))

    def position_embeddings(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor):
        """The rotary `(cos, sin)` of the positions, or, for a family with a rotary embedding per attention type,
        those of each type by name (each layer takes its own)."""
        if self.rope_layer_types is None:
            return self.rotary_emb(inputs_embeds, position_ids=position_ids)
        return {
            layer_type: self.rotary_emb(inputs_embeds, position_ids, layer_type)
            for layer_type in self.rope_layer_types
        }

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
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.embedding_multiplier is not None:  # Granite scales given embeddings too
            inputs_embeds = inputs_embeds * self.embedding_multiplier
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

        kwargs.setdefault("output_depth_attentions", getattr(self.config, "output_depth_attentions", False))
        layer_kwargs = dict(
            position_embeddings=self.position_embeddings(inputs_embeds, position_ids),
            position_ids=position_ids,
            use_cache=use_cache,
            **{CACHE_NAME: cache},  # the name GradientCheckpointingLayer clears when it recomputes a layer
            **kwargs,
        )
        eps = self.config.rms_norm_eps
        completed = CompletedSources(inputs_embeds, self.max_completed_sources)
        offload = (
            OffloadedLayerInputs(completed.buffer, completed.inv_rms_buffer)
            if self.offloads_checkpointed_inputs
            else None
        )
        implementation = depth_attention(self.config, inputs_embeds.device)
        layer_queries = [
            None if layer.is_recomputed() else layer.shared_depth_query_parts(inputs_embeds.device)
            for layer in self.layers
        ]
        sharing = [parts is not None for parts in layer_queries]
        queries = self.depth_queries(layer_queries)
        blocks = self.blocks()
        final_read, first_row, first_layer = None, 0, 0
        hidden_states = inputs_embeds
        for number, block in enumerate(blocks):
            completed.commit(hidden_states, eps)
            block_sharing = sharing[first_layer : first_layer + len(block)]
            rows = 2 * sum(block_sharing)
            # In Block AttnRes nothing is committed once the last block opens: the output reads the same completed
            # sources, so its query (the last row) joins that block's phase 1.
            with_output = number == len(blocks) - 1 and not any(layer.mlp_starts_block for layer in block)
            block_reads = (
                implementation.read(
                    completed.values, completed.inv_rms, queries[first_row : first_row + rows + with_output]
                )
                if rows or with_output
                else []
            )
            if with_output:
                final_read = block_reads.pop()
            shared_reads = iter(block_reads)
            for layer, shares in zip(block, block_sharing):
                with offload if offload is not None and layer.is_recomputed() else contextlib.nullcontext():
                    hidden_states, attention_output = layer(
                        hidden_states,
                        completed.values,
                        completed.inv_rms,
                        depth_reads=[next(shared_reads), next(shared_reads)] if shares else None,
                        attention_mask=causal_mask_mapping[layer.attention_type],
                        **layer_kwargs,
                    )
                if attention_output is not None:  # Full AttnRes
                    completed.commit(attention_output, eps)
            first_row, first_layer = first_row + rows, first_layer + len(block)

        if final_read is None:
            [final_read] = implementation.read(completed.values, completed.inv_rms, queries[-1:])
        hidden_states = normalized_input(
            self.final_input, implementation, final_read, hidden_states, self.norm, **kwargs
        )
        return AttnResModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: cache})

    def blocks(self) -> list[list[AttnResDecoderLayer]]:
        """The decoder layers grouped into blocks (Full AttnRes: one layer each): before each block the model commits
        the running sum as a completed source, and a block's layers all read the same completed sources."""
        blocks = []
        for layer in self.layers:
            if layer.starts_block:
                blocks.append([])
            blocks[-1].append(layer)
        return blocks

    def depth_queries(self, layer_queries: list[tuple[list[torch.Tensor], list[torch.Tensor]] | None]) -> DepthQueries:
        """The queries of every aggregation whose phase 1 the model computes (`DepthQueries`, folded at once): those of
        the layers that share their block's phase 1 (`layer_queries`: each layer's `shared_depth_query_parts`, `None`
        for the others), in order, then the output's (the last row).

        A layer shares its block's phase 1 (Algorithm 1: a block's queries share one read of the sources) unless
        activation checkpointing recomputes it (it then recomputes its phase 1 from its own inputs, keeping only the
        partial sum per layer, paper §4.1; with transformers 5.23's `every_n_layers` only some layers are), or the
        model may not read its parameters from outside its forward (FSDP, ZeRO-3, offloading: see
        `shared_depth_parameter`)."""
        pseudo_queries, key_weights = [], []
        for parts in layer_queries:
            if parts is not None:
                pseudo_queries += parts[0]
                key_weights += parts[1]
        pseudo_queries.append(depth_parameter(self.output_attn_res_proj))
        key_weights.append(depth_parameter(self.output_attn_res_norm))
        return DepthQueries(pseudo_queries, key_weights)


class AttnResForCausalLM(AttnResPreTrainedModel, GenerationMixin):
    _auto_class = "AutoModelForCausalLM"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AttnResConfig):
        super().__init__(config)
        self.model = AttnResModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.layout = None if config.source_model_type is None else family_layout(config)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, inputs_embeds=None, **kwargs):
        """`GenerationMixin`'s, except for a family that switches RoPE tables with the sequence length (Phi-3's
        long-rope checkpoints): once the sequence first passes `original_max_position_embeddings`, the cached keys
        were rotated with the short table, so the cache is dropped and the whole sequence recomputed, as
        `Phi3ForCausalLM.prepare_inputs_for_generation` does (transformers 5.4 to 5.25; `generate` passes every
        argument by keyword and reads `inputs_embeds` and `**kwargs` from this signature)."""
        # CODEPATH: long_rope_cache_reset (Phi-3 checkpoints).
        if self.layout is not None and self.layout.long_rope_cache_reset:
            cache = kwargs.get(CACHE_NAME)
            limit = getattr(self.config, "original_max_position_embeddings", None)
            if cache is not None and limit is not None and input_ids.shape[1] > limit >= cache.get_seq_length():
                kwargs[CACHE_NAME] = None
                if "next_sequence_length" in kwargs:  # transformers 5.25: the whole sequence is the next input
                    kwargs["next_sequence_length"] = None
        return super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)

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
        logits = self.lm_head(outputs.last_hidden_state[:, kept, :])

        if self.layout is not None:  # CODEPATH: source_model_type (Granite's and Gemma 2/3's logits)
            logits = family_logits(self.layout, self.config, logits)

        loss = aux_loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        # CODEPATH: moe (Mixtral, Qwen2-MoE, Qwen3-MoE checkpoints): the load-balancing loss as the family adds it.
        if outputs.router_logits is not None and self.layout is not None and self.layout.moe:
            aux_loss = family_modeling(self.layout).load_balancing_loss_func(
                outputs.router_logits,
                getattr(self.config, "num_experts", None) or self.config.num_local_experts,
                self.config.num_experts_per_tok,
                attention_mask,
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)

        return AttnResCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: outputs.cache},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            depth_attentions=outputs.depth_attentions,
            router_logits=outputs.router_logits,
            aux_loss=aux_loss,
        )


def family_logits(layout: FamilyLayout, config: AttnResConfig, logits: torch.Tensor) -> torch.Tensor:
    """The family's transform of the language-model head's output, in the family's order."""
    if layout.logits_divisor is not None:
        logits = logits / getattr(config, layout.logits_divisor)
    if layout.logit_softcapping is not None and (cap := getattr(config, layout.logit_softcapping)) is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


__all__ = ["AttnResForCausalLM", "AttnResModel", "AttnResPreTrainedModel"]
