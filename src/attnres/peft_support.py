# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""PEFT for AttnRes models: Llama's default LoRA targets, and the AttnRes parameters as fully trained modules.

`import attnres` calls `register_peft_defaults()` when PEFT is installed, so `LoraConfig(task_type="CAUSAL_LM")`
without `target_modules` picks on an AttnRes model what PEFT picks on its source family: `q_proj`/`v_proj` (Llama and
most families, whose projection names a graft keeps), `qkv_proj` (Phi-3's fused projection). PEFT keys its defaults
by `model_type`, which is `attnres` for every family, so the default is the union over the graftable families: PEFT
wraps the names a model has. LoRA alone leaves the AttnRes parameters frozen; a grafted model needs them trained
(they start at zero), which `attnres_lora_config()` arranges through PEFT's `modules_to_save`.
"""

import re


# The modules holding the AttnRes parameters: each sublayer's pseudo-query and key norm, and the output's.
ATTN_RES_MODULES = (
    "self_attention_res_proj",
    "self_attention_res_norm",
    "mlp_res_proj",
    "mlp_res_norm",
    "output_attn_res_proj",
    "output_attn_res_norm",
)
# Matches their parameters in plain models and inside PEFT wrappers (`...mlp_res_proj.modules_to_save.default.weight`).
ATTN_RES_PARAMETER_NAME = re.compile(r"(^|\.)(" + "|".join(ATTN_RES_MODULES) + r")\.")


def is_attn_res_parameter(name: str) -> bool:
    return ATTN_RES_PARAMETER_NAME.search(name) is not None


# Families PEFT (0.21) has no defaults for, as the LoRA-style mappings would name their attention projections: Phi-3
# fuses q, k and v into one.
FUSED_ATTENTION_TARGETS = {"phi3": ["qkv_proj"]}


def register_peft_defaults() -> None:
    """Give model type `attnres`, in every PEFT method that has defaults for Llama, the union of the default target
    modules of the families `attnres convert` grafts (Llama's first)."""
    from peft.utils import constants

    from .families import SUPPORTED_FAMILIES

    for name in dir(constants):
        mapping = getattr(constants, name)
        if name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(mapping, dict) and "llama" in mapping:
            if not isinstance(mapping["llama"], list):
                mapping.setdefault("attnres", mapping["llama"])
                continue
            targets = []
            for family in SUPPORTED_FAMILIES:
                entry = mapping.get(family, FUSED_ATTENTION_TARGETS.get(family, []) if "q_proj" in targets else [])
                targets += [target for target in entry if isinstance(entry, list) and target not in targets]
            mapping.setdefault("attnres", targets)


def attnres_lora_config(r: int = 16, lora_alpha: int = 32, train_attn_res: bool = True, **kwargs):
    """A `LoraConfig` for causal LM fine-tuning of an AttnRes model; with `train_attn_res`, the AttnRes parameters
    are trained in full alongside the adapters and saved with them (`modules_to_save`)."""
    from peft import LoraConfig

    modules_to_save = list(kwargs.pop("modules_to_save", None) or [])
    if train_attn_res:
        modules_to_save += [name for name in ATTN_RES_MODULES if name not in modules_to_save]
    return LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=lora_alpha, modules_to_save=modules_to_save or None, **kwargs
    )
