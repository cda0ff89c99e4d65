# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""Which PreNorm checkpoints can be grafted, and how each family's config maps onto `AttnResConfig`.

The graft is exact because every sublayer of these models reads the residual stream through a norm that is invariant
to the stream's scale (RMSNorm, or OLMo's parameter-free LayerNorm; see `AttnResModel`). Llama, Mistral, Qwen2 and
Qwen3 map onto the Llama-family modules of `modeling_attnres.py` (the path tuned for speed); every other family is
built from transformers' own modules for it, as its `FamilyLayout` in `modeling_attnres.py` declares.
"""

from transformers import PreTrainedConfig

from .errors import AttnResError
from .modeling_attnres import FAMILY_LAYOUTS


LLAMA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_FAMILIES = (*LLAMA_FAMILIES, *FAMILY_LAYOUTS)

# Families people ask for, and why they cannot be grafted exactly onto this model.
UNSUPPORTED_REASONS = {
    "opt": "OPT uses LayerNorm with biases and learned positions, and can be post-norm (do_layer_norm_before=False), "
    "where the residual stream is normalised after each sum and no scale-invariant reader exists",
    "gpt2": "GPT-2 uses LayerNorm with biases, learned positions and Conv1D layers, not the Llama layout",
    "gpt_neox": "GPT-NeoX computes attention and MLP in parallel from the same input (use_parallel_residual)",
    "phi": "Phi computes attention and MLP in parallel from one LayerNorm",
    "falcon": "Falcon computes attention and MLP in parallel from one LayerNorm",
    "olmo2": "OLMo 2 normalises only each sublayer's output (x + norm(f(x))): its sublayers read the raw residual "
    "stream, with no scale-invariant norm to absorb the aggregation's 1/n",
    "olmo3": "OLMo 3 normalises only each sublayer's output, like OLMo 2: its sublayers read the raw residual stream",
    "exaone4": "EXAONE 4 normalises only each sublayer's output, like OLMo 2: its sublayers read the raw residual "
    "stream",
    "gemma3": "this is Gemma 3's multimodal wrapper; convert a text-only Gemma 3 checkpoint (model_type gemma3_text)",
    "attnres": "it is already an AttnRes model",
}

# Fields of a source config that describe the checkpoint, not the architecture: `attnres convert` writes its own.
NOT_ARCHITECTURE = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype")


def unsupported_message(model_type: str | None) -> str:
    reason = UNSUPPORTED_REASONS.get(model_type, "its architecture is not one this converter maps")
    return (
        f"cannot graft AttnRes onto model_type {model_type!r}: {reason}. Supported: {', '.join(SUPPORTED_FAMILIES)} "
        "(PreNorm decoders whose every sublayer reads the residual stream through a scale-invariant norm, which is "
        "what makes the graft exact)."
    )


def attnres_config_kwargs(source: PreTrainedConfig) -> dict:
    """The `AttnResConfig` fields that reproduce `source` exactly."""
    model_type = getattr(source, "model_type", None)
    if model_type in FAMILY_LAYOUTS:
        return family_config_kwargs(source)
    if model_type not in LLAMA_FAMILIES:
        raise AttnResError(unsupported_message(model_type))
    kwargs = {
        name: getattr(source, name)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "hidden_act",
            "max_position_embeddings",
            "initializer_range",
            "rms_norm_eps",
            "tie_word_embeddings",
            "rope_parameters",
            "attention_dropout",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
        )
    }
    kwargs["head_dim"] = getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads
    kwargs["attention_bias"] = bool(getattr(source, "attention_bias", False))
    kwargs["mlp_bias"] = bool(getattr(source, "mlp_bias", False))
    kwargs["qkv_bias"] = model_type == "qwen2"  # Qwen2 hard-codes a bias on q/k/v (not on o)
    kwargs["qk_norm"] = model_type == "qwen3"
    kwargs["sliding_window"] = getattr(source, "sliding_window", None)
    layer_types = getattr(source, "layer_types", None)
    if layer_types is None:  # Mistral: the window, when set, applies to every layer
        sliding = kwargs["sliding_window"] is not None
        layer_types = ["sliding_attention" if sliding else "full_attention"] * source.num_hidden_layers
    kwargs["layer_types"] = list(layer_types)
    if "sliding_attention" not in kwargs["layer_types"]:
        kwargs["sliding_window"] = None
    return kwargs


def family_config_kwargs(source: PreTrainedConfig) -> dict:
    """Every architecture field of `source`, unchanged, and its family: the family's own modules read them from the
    AttnRes config as they would from their own. Without `layer_types`, `AttnResConfig` makes every layer sliding
    when `sliding_window` is set, as Mixtral's and Phi-3's attention does."""
    if getattr(source, "use_bidirectional_attention", False):
        raise AttnResError(
            f"cannot graft AttnRes onto this {source.model_type} checkpoint: use_bidirectional_attention=True makes "
            "it an encoder (every token attends to every other), not a causal LM"
        )
    kwargs = {name: value for name, value in source.to_dict().items() if name not in NOT_ARCHITECTURE}
    # OlmoConfig on transformers 5.4 types it (and saves it) as an int
    kwargs["tie_word_embeddings"] = bool(kwargs.get("tie_word_embeddings", False))
    kwargs["source_model_type"] = source.model_type
    return kwargs
