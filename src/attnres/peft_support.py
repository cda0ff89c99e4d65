# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""PEFT for AttnRes models: Llama's default LoRA targets, and the AttnRes parameters as fully trained modules.

`import attnres` calls `register_peft_defaults()` when PEFT is installed, so `LoraConfig(task_type="CAUSAL_LM")`
without `target_modules` picks `q_proj`/`v_proj` on an AttnRes model exactly as it does on Llama (the projection
names are Llama's). LoRA alone leaves the AttnRes parameters frozen; a grafted model needs them trained (they start
at zero), which `attnres_lora_config()` arranges through PEFT's `modules_to_save`.
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
LLAMA_MODEL_TYPE = "llama"


def is_attn_res_parameter(name: str) -> bool:
    return ATTN_RES_PARAMETER_NAME.search(name) is not None


def register_peft_defaults() -> None:
    """Give model type `attnres` Llama's default target modules in every PEFT method that has defaults for Llama."""
    from peft.utils import constants

    for name in dir(constants):
        mapping = getattr(constants, name)
        if name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(mapping, dict) and LLAMA_MODEL_TYPE in mapping:
            mapping.setdefault("attnres", mapping[LLAMA_MODEL_TYPE])


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
