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
"""AttnRes model configuration (shipped as remote code: imports only the standard library and transformers)."""

import math

from transformers.utils.versions import require_version


# The transformers releases the remote code is tested on (CI runs the lowest and the newest; README "Supported
# versions"). 5.4 is the first with dataclass configs, `capture_outputs` and masks that need no `cache_position`.
# Checked before anything else is imported, so that an older release gets this message, not an ImportError.
SUPPORTED_TRANSFORMERS = ">=5.4,<6"
require_version(
    f"transformers{SUPPORTED_TRANSFORMERS}",
    f"AttnRes models need transformers{SUPPORTED_TRANSFORMERS}: "
    f"run `pip install -U 'transformers{SUPPORTED_TRANSFORMERS}'`.",
)

from huggingface_hub.dataclasses import strict  # noqa: E402
from transformers.configuration_utils import PreTrainedConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.utils import logging  # noqa: E402


logger = logging.get_logger(__name__)

RESIDUAL_MODES = ("block", "full")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
DEFAULT_NUM_BLOCKS = 8  # the paper's N: "N ≈ 8 recovers most of the benefit across model scales"
AUTO_MAP = {
    "AutoConfig": "configuration_attnres.AttnResConfig",
    "AutoModel": "modeling_attnres.AttnResModel",
    "AutoModelForCausalLM": "modeling_attnres.AttnResForCausalLM",
}


@strict
class AttnResConfig(PreTrainedConfig):
    r"""
    Configuration of a Llama-family decoder whose residual connections are Attention Residuals (AttnRes, Kimi Team,
    arXiv:2603.15031). The architecture fields are those of `LlamaConfig`, plus what Mistral, Qwen2 and Qwen3 need
    (`sliding_window`/`layer_types`, `qkv_bias`, `qk_norm`), so that those checkpoints map onto this config 1:1.

    AttnRes replaces the PreNorm sum `h_l = h_1 + Σ_{i<l} f_i(h_i)` by a softmax over depth: each sublayer (attention
    or MLP) and the final output own a learned pseudo-query `w`; keys are the RMS-normalised sources, values the raw
    sources. The sources are the token embedding and, in `"block"` mode, the sums of completed blocks of layers plus
    the running sum of the current block; in `"full"` mode, every sublayer output. (A plain PreNorm model is
    transformers' `LlamaForCausalLM`, with the same parameter names.)

    Args (AttnRes-specific; the others mean what they mean in `LlamaConfig`):
        residual_mode (`str`, *optional*, defaults to `"block"`):
            `"block"` (Block AttnRes) or `"full"` (Full AttnRes: blocks of one sublayer).
        attn_res_block_size (`int`, *optional*):
            Number of **decoder layers** (each = one attention + one MLP sublayer, i.e. two of the paper's "layers")
            per block; the unit of Kimi K3's `attn_res_block_size`. The paper's block size `S` in sublayers is twice
            this. Blocks start at layers `0, B, 2B, ...`; the last block holds the remaining layers and may be
            shorter. Derived from `attn_res_num_blocks` when not given.
        attn_res_num_blocks (`int`, *optional*):
            The paper's `N`, the number of blocks. When only this is given, the block size is
            `ceil(num_hidden_layers / N)`, and the number of blocks stored is the one that block size yields (it can
            be smaller than asked, e.g. 28 layers with `N=8` give blocks of 4 layers and 7 blocks; a warning says
            so). With neither field given, `N = min(8, num_hidden_layers)`. Both fields describe the partition
            `"block"` mode uses; they are kept (and ignored) in `"full"` mode so that one config can be switched.
        attn_res_implementation (`str`, *optional*, defaults to `"two_phase"`):
            How the depth softmax is computed: `"two_phase"` (the paper's two-phase computation, O(N·d) memory),
            `"triton"` (the same computation as fused Triton kernels, on a GPU; needs `pip install triton`),
            `"naive"` (the paper's equations as written; the reference), or `"auto"`: `"triton"` on CUDA where triton
            imports, `"two_phase"` elsewhere. All compute the same function; see `ATTN_RES_IMPLEMENTATIONS` in
            `modeling_attnres.py`. The default stays `"two_phase"` until the Triton kernels have been compiled and
            tested on a GPU (so far they have run only under Triton's interpreter).
        qk_norm (`bool`, *optional*, defaults to `False`):
            RMSNorm on each query and key head before RoPE (Qwen3).
        qkv_bias (`bool`, *optional*, defaults to `False`):
            Bias on the query, key and value projections only (Qwen2). `attention_bias` puts a bias on all four
            attention projections (Llama).
        sliding_window (`int`, *optional*):
            Window of the layers whose `layer_types` entry is `"sliding_attention"` (Mistral, Qwen2).
        layer_types (`list[str]`, *optional*):
            `"full_attention"` or `"sliding_attention"` per layer. Defaults to all sliding when `sliding_window` is
            set (Mistral), else all full.
        source_model_type (`str`, *optional*):
            The transformers family whose own decoder sublayers the model is built from (e.g. `"gemma2"`,
            `"mixtral"`; `FAMILY_LAYOUTS` in `modeling_attnres.py` lists them), for checkpoints grafted from a family
            other than Llama, Mistral, Qwen2 and Qwen3. The config then also holds every field of that family's
            config (`attnres convert` copies them), which the family's modules read as they would their own config;
            the family's attribute aliases (`attribute_map`, e.g. Mixtral's `num_experts`) are answered too.
            `None` (the default): the Llama-family modules of `modeling_attnres.py`.

    ```python
    >>> from attnres import AttnResConfig, AttnResForCausalLM

    >>> config = AttnResConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4,
    ...                        attn_res_num_blocks=4)
    >>> config.attn_res_block_size
    2
    >>> model = AttnResForCausalLM(config)
    ```"""

    model_type = "attnres"
    _auto_class = "AutoConfig"  # `save_pretrained` ships this file as remote code
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # transformers >= 5.24, < 5.24

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    residual_mode: str = "block"
    attn_res_block_size: int | None = None
    attn_res_num_blocks: int | None = None
    attn_res_implementation: str = "two_phase"
    source_model_type: str | None = None

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: a family module reading one of its config's aliases (Qwen3-MoE's
        # modules read `config.num_experts`, which Mixtral's config stores as `num_local_experts`). The family config
        # class is only looked up, never instantiated (some cannot be: OlmoConfig on transformers 5.4 rejects its own
        # default `tie_word_embeddings`).
        source_model_type = self.__dict__.get("source_model_type")
        if source_model_type is not None and not name.startswith("_") and source_model_type in CONFIG_MAPPING:
            alias = CONFIG_MAPPING[source_model_type].attribute_map.get(name)
            if alias is not None:
                return getattr(self, alias)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __post_init__(self, **kwargs):
        if self.head_dim is None and self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            layer_type = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [layer_type] * self.num_hidden_layers
        self._derive_block_partition()
        if kwargs.get("auto_map") is None:
            # `save_pretrained` copies this file and modeling_attnres.py next to the weights; with all three Auto
            # entries, `AutoConfig`/`AutoModel`/`AutoModelForCausalLM` all load them with `trust_remote_code=True`.
            kwargs["auto_map"] = dict(AUTO_MAP)
        super().__post_init__(**kwargs)

    def _derive_block_partition(self) -> None:
        """Fill in whichever of `attn_res_block_size` / `attn_res_num_blocks` is missing (invalid values are left
        for `validate_architecture` to report)."""
        num_layers = self.num_hidden_layers
        if num_layers < 1:
            return
        if self.attn_res_block_size is None:
            requested_blocks = self.attn_res_num_blocks
            if requested_blocks is None:
                requested_blocks = min(DEFAULT_NUM_BLOCKS, num_layers)
            if not 1 <= requested_blocks <= num_layers:
                return
            self.attn_res_block_size = math.ceil(num_layers / requested_blocks)
            user_requested = self.attn_res_num_blocks is not None
            self.attn_res_num_blocks = math.ceil(num_layers / self.attn_res_block_size)
            if user_requested and self.attn_res_num_blocks != requested_blocks:
                logger.warning(
                    f"attn_res_num_blocks={requested_blocks} cannot split {num_layers} layers into blocks of equal "
                    f"size; using blocks of {self.attn_res_block_size} layers, i.e. {self.attn_res_num_blocks} "
                    "blocks. Set attn_res_block_size to choose the partition explicitly."
                )
        elif self.attn_res_num_blocks is None and 1 <= self.attn_res_block_size <= num_layers:
            self.attn_res_num_blocks = math.ceil(num_layers / self.attn_res_block_size)

    def validate_architecture(self):
        """Part of `@strict`-powered validation: every error names the field, the value and the fix."""
        if self.residual_mode == "standard":
            raise ValueError(
                "residual_mode='standard' is no longer an AttnRes mode: a plain PreNorm model is transformers' "
                "LlamaForCausalLM, with the same parameter names; load these weights with a LlamaConfig."
            )
        if self.residual_mode not in RESIDUAL_MODES:
            raise ValueError(f"residual_mode must be one of {RESIDUAL_MODES}, got {self.residual_mode!r}.")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.head_dim is None:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                f"({self.num_attention_heads}); change one of them or set head_dim explicitly."
            )
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"rope_parameters: unknown rope_type {rope_type!r}; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}."
            )
        self._validate_layer_types()
        self._validate_block_partition()

    def _validate_layer_types(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}; "
                "give one entry per layer."
            )
        unknown = sorted(set(self.layer_types) - set(ATTENTION_LAYER_TYPES))
        if unknown:
            raise ValueError(f"layer_types entries must be in {ATTENTION_LAYER_TYPES}, got {unknown}.")
        if "sliding_attention" in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
            raise ValueError(
                f"layer_types has 'sliding_attention' layers but sliding_window is {self.sliding_window}; set "
                "sliding_window to a positive window size or make every layer 'full_attention'."
            )

    def _validate_block_partition(self) -> None:
        num_layers = self.num_hidden_layers
        block_size, num_blocks = self.attn_res_block_size, self.attn_res_num_blocks
        if num_blocks is not None and not 1 <= num_blocks <= num_layers:
            raise ValueError(
                f"attn_res_num_blocks must be between 1 and num_hidden_layers ({num_layers}), got {num_blocks}: a "
                "block holds at least one layer. Use residual_mode='full' for one source per sublayer."
            )
        if block_size is None or not 1 <= block_size <= num_layers:
            raise ValueError(
                f"attn_res_block_size (layers per block) must be between 1 and num_hidden_layers ({num_layers}), "
                f"got {block_size}."
            )
        if num_blocks != math.ceil(num_layers / block_size):
            raise ValueError(
                f"attn_res_block_size={block_size} splits {num_layers} layers into "
                f"{math.ceil(num_layers / block_size)} blocks, but attn_res_num_blocks={num_blocks}; give only one "
                "of the two."
            )

    @property
    def sublayers_per_block(self) -> int:
        """The paper's block size `S`, in sublayers: two per decoder layer of a block; one in Full AttnRes, where
        every sublayer output is a source of its own."""
        return 1 if self.residual_mode == "full" else 2 * self.attn_res_block_size

    def sublayer_starts_block(self, sublayer: int) -> bool:
        """Whether sublayer `sublayer` (`2 * layer` is a layer's attention, `2 * layer + 1` its MLP) opens a block:
        the running sum of the previous block (at sublayer 0, the token embedding) is then a completed source."""
        return sublayer % self.sublayers_per_block == 0

    def num_depth_sources(self, sublayer: int) -> int:
        """How many sources the aggregation before sublayer `sublayer` attends over (paper Eq. 6); `sublayer =
        2 * num_hidden_layers` is the final output's. The embedding and the completed blocks, plus the current
        block's partial sum unless the sublayer opens a block: `1 + n + [i > 0]` for the `i`-th sublayer of block
        `n` (counted from 0)."""
        block, position = divmod(sublayer, self.sublayers_per_block)
        return 1 + block + (position > 0)


__all__ = ["AttnResConfig"]
