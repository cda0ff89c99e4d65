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

import re
from collections.abc import Callable
from dataclasses import dataclass

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
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs
from transformers.utils.versions import require_version

from .configuration_attnres import AttnResConfig


require_version(
    "transformers>=5.23,<6",
    "AttnRes remote code is written against the transformers 5.23 API. Run `pip install -U 'transformers>=5.23,<6'`.",
)

logger = logging.get_logger(__name__)

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
        past_key_values: Cache | None = None,
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

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

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


class AttnResPseudoQuery(nn.Module):
    """The learned pseudo-query `w_l ∈ R^d` of one AttnRes aggregation (paper Eq. 2-3).

    Stored with the shape of Kimi K3's `nn.Linear(hidden_size, 1, bias=False)` weight, so checkpoints share the
    `*_res_proj.weight` tensors, but it is deliberately not an `nn.Linear`: it is never applied as a projection, and
    PEFT's `target_modules="all-linear"` must not wrap it with a LoRA adapter that the depth attention would ignore.
    It is zero-initialised in `AttnResPreTrainedModel._init_weights` (paper §3: uniform weights at the start).
    The logits go through `forward` (not `.weight`) so that accelerate's offloading hooks and PEFT's
    `modules_to_save` wrappers see the call.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden_size))

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        """Depth-attention logits `w · k` in fp32: (..., hidden) -> (...)."""
        return torch.matmul(keys.float(), self.weight.float().squeeze(0))

    def extra_repr(self) -> str:
        return f"hidden_size={self.weight.shape[-1]}"


def depth_attention(
    sources: list[torch.Tensor], pseudo_query: AttnResPseudoQuery, key_norm: AttnResRMSNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over depth (paper Eq. 2-4): `h = Σ_i softmax_i(w · RMSNorm(v_i)) v_i`.

    Args:
        sources (`list[torch.Tensor]`): the values `v_i`, each of shape `(batch, seq, hidden)`.
        pseudo_query (`AttnResPseudoQuery`): the aggregation's pseudo-query `w`.
        key_norm (`AttnResRMSNorm`): the aggregation's RMSNorm, applied to the keys only; values stay raw.

    Returns:
        The aggregated input, `(batch, seq, hidden)` in the sources' dtype, and the depth-attention weights,
        `(batch, seq, num_sources)` in fp32. Keys, logits, softmax and the weighted sum run in fp32 whatever the
        model dtype, and the result is rounded once.
    """
    if len(sources) == 1:
        # One source (e.g. layer 0, which sees only the embedding): its weight is exactly 1, the query gets no gradient.
        return sources[0], sources[0].new_ones(*sources[0].shape[:-1], 1, dtype=torch.float32)
    values = torch.stack(sources, dim=-2).float()  # (batch, seq, num_sources, hidden)
    keys = key_norm(values)
    logits = pseudo_query(keys)  # (batch, seq, num_sources)
    weights = logits.softmax(dim=-1)
    hidden_states = torch.matmul(weights.unsqueeze(-2), values).squeeze(-2)  # (batch, seq, hidden)
    return hidden_states.to(sources[0].dtype), weights


class AttnResDecoderLayer(GradientCheckpointingLayer):
    """One attention and one MLP sublayer, each reading its input through an AttnRes aggregation.

    The residual state travels between layers as a running partial sum plus the completed sources (token embedding,
    completed block sums, or every sublayer output in full mode). They are positional arguments and flat outputs so
    that activation checkpointing (reentrant or not) tracks their gradients and accelerate's device hooks move them.
    In `"standard"` mode there are no completed sources and the partial sum is the PreNorm residual stream.
    """

    def __init__(self, config: AttnResConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.residual_mode = config.residual_mode
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

        self.attention_starts_block = config.sublayer_starts_block(2 * layer_idx)
        self.mlp_starts_block = config.sublayer_starts_block(2 * layer_idx + 1)
        # CODEPATH: residual_mode "block"/"full" (AttnRes checkpoints); "standard" (PreNorm baseline) has none of these.
        if self.residual_mode != "standard":
            self.self_attention_res_proj = AttnResPseudoQuery(config.hidden_size)
            self.self_attention_res_norm = AttnResRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp_res_proj = AttnResPseudoQuery(config.hidden_size)
            self.mlp_res_norm = AttnResRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        partial_sum: torch.Tensor,
        *completed_sources: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_depth_attentions: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor | None, ...]:
        """Returns `(partial_sum, layer_input, attention_depth_weights, mlp_depth_weights, *completed_sources)`:
        `layer_input` is the hidden state entering the attention sublayer (reported as this layer's
        `hidden_states` entry); the depth weights are `None` unless `return_depth_attentions`."""
        sources = list(completed_sources)
        hidden_states, partial_sum, attention_depth_weights = self._aggregate_input(
            partial_sum, sources, "self_attention", self.attention_starts_block
        )
        layer_input = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        partial_sum = hidden_states if partial_sum is None else partial_sum + hidden_states

        hidden_states, partial_sum, mlp_depth_weights = self._aggregate_input(
            partial_sum, sources, "mlp", self.mlp_starts_block
        )
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        partial_sum = hidden_states if partial_sum is None else partial_sum + hidden_states

        if not return_depth_attentions:
            attention_depth_weights = mlp_depth_weights = None
        return (partial_sum, layer_input, attention_depth_weights, mlp_depth_weights, *sources)

    def _aggregate_input(
        self, partial_sum: torch.Tensor, sources: list[torch.Tensor], sublayer: str, starts_block: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The input of one sublayer. Returns `(sublayer_input, partial_sum, depth_weights)`; at a block start the
        partial sum is committed to `sources` (in place) and comes back as `None`: the sublayer output opens a new one.
        """
        # CODEPATH: "standard" residuals: the sublayer reads the residual stream itself.
        if self.residual_mode == "standard":
            return partial_sum, partial_sum, None
        if starts_block:
            sources.append(partial_sum)
            inputs, partial_sum = sources, None
        else:
            inputs = sources + [partial_sum]
        pseudo_query, key_norm = getattr(self, f"{sublayer}_res_proj"), getattr(self, f"{sublayer}_res_norm")
        hidden_states, depth_weights = depth_attention(inputs, pseudo_query, key_norm)
        return hidden_states, partial_sum, depth_weights


class AttnResPreTrainedModel(PreTrainedModel):
    config: AttnResConfig
    config_class = AttnResConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["AttnResDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
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
class AttnResModelOutputWithPast(BaseModelOutputWithPast):
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
class AttnResCausalLMOutputWithPast(CausalLMOutputWithPast):
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
            self.output_attn_res_norm = AttnResRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = AttnResRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
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
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        # It may already have been prepared by e.g. `generate`
        if not isinstance(causal_mask_mapping := attention_mask, dict):
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                "past_key_values": past_key_values,
                "position_ids": position_ids,
            }
            causal_mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
            if self.has_sliding_layers:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        partial_sum, completed_sources = inputs_embeds, []
        all_hidden_states: list[torch.Tensor] = []
        all_depth_attentions: list[torch.Tensor] = []
        for layer_idx, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            partial_sum, layer_input, attention_weights, mlp_weights, *completed_sources = decoder_layer(
                partial_sum,
                *completed_sources,
                attention_mask=causal_mask_mapping[self.config.layer_types[layer_idx]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                return_depth_attentions=output_depth_attentions,
                **kwargs,
            )
            all_hidden_states.append(layer_input)
            all_depth_attentions += [attention_weights, mlp_weights]

        # CODEPATH: "standard" reads the residual stream; AttnRes aggregates all sources with the output query.
        if self.config.residual_mode == "standard":
            hidden_states = partial_sum
        else:
            hidden_states, output_weights = depth_attention(
                completed_sources + [partial_sum], self.output_attn_res_proj, self.output_attn_res_norm
            )
            all_depth_attentions.append(output_weights)
        hidden_states = self.norm(hidden_states)

        return AttnResModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,
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

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
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
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return AttnResCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            depth_attentions=outputs.depth_attentions,
        )


__all__ = ["AttnResForCausalLM", "AttnResModel", "AttnResPreTrainedModel"]
