# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""Which PreNorm checkpoints can be grafted, and how each family's config maps onto `AttnResConfig`.

The graft is exact because every sublayer of these models reads the residual stream through an RMSNorm, which is
invariant to the stream's scale (see `AttnResModel`), and because their sublayers are exactly the ones
`modeling_attnres.py` implements under Llama's parameter names.
"""

from transformers import PreTrainedConfig

from .errors import AttnResError


SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# Families people ask for, and why they cannot be grafted exactly onto this model.
UNSUPPORTED_REASONS = {
    "opt": "OPT uses LayerNorm with biases and learned positions, and can be post-norm (do_layer_norm_before=False), "
    "where the residual stream is normalised after each sum and no scale-invariant reader exists",
    "gpt2": "GPT-2 uses LayerNorm with biases, learned positions and Conv1D layers, not the Llama layout",
    "gpt_neox": "GPT-NeoX computes attention and MLP in parallel from the same input (use_parallel_residual)",
    "phi": "Phi computes attention and MLP in parallel from one LayerNorm",
    "falcon": "Falcon computes attention and MLP in parallel from one LayerNorm",
    "gemma": "Gemma's RMSNorm multiplies by (1 + weight) and its embeddings are scaled; this model implements Llama's",
    "gemma2": "Gemma 2 adds post-sublayer norms and logit soft-capping, which this model does not implement",
    "gemma3": "Gemma 3 adds post-sublayer norms and per-layer RoPE, which this model does not implement",
    "gemma3_text": "Gemma 3 adds post-sublayer norms and per-layer RoPE, which this model does not implement",
    "qwen3_moe": "Qwen3-MoE's MLP is a mixture of experts, which this model does not implement",
    "mixtral": "Mixtral's MLP is a mixture of experts, which this model does not implement",
    "olmo2": "OLMo 2 normalises sublayer outputs (post-norm), so the residual stream has no scale-invariant reader",
    "attnres": "it is already an AttnRes model",
}


def unsupported_message(model_type: str | None) -> str:
    reason = UNSUPPORTED_REASONS.get(model_type, "its architecture is not one this converter maps")
    return (
        f"cannot graft AttnRes onto model_type {model_type!r}: {reason}. Supported: {', '.join(SUPPORTED_FAMILIES)} "
        "(PreNorm decoders with the Llama layout, where every sublayer reads the residual stream through an RMSNorm, "
        "which is what makes the graft exact)."
    )


def attnres_config_kwargs(source: PreTrainedConfig) -> dict:
    """The `AttnResConfig` fields that reproduce `source` (a Llama/Mistral/Qwen2/Qwen3 config) exactly."""
    model_type = getattr(source, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
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
