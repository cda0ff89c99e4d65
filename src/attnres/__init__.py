# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""Attention Residuals (AttnRes, arXiv:2603.15031) for Hugging Face Transformers.

Importing this package registers `AttnResConfig` (`model_type="attnres"`) with `AutoConfig`, and the models with
`AutoModel` and `AutoModelForCausalLM`, so AttnRes checkpoints load without `trust_remote_code`; with PEFT installed,
it also gives AttnRes Llama's default LoRA target modules (see `attnres.peft_support`).
"""

import importlib.util

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_attnres import AttnResConfig
from .modeling_attnres import AttnResForCausalLM, AttnResModel, AttnResPreTrainedModel


__version__ = "0.1.0"

AutoConfig.register(AttnResConfig.model_type, AttnResConfig, exist_ok=True)
AutoModel.register(AttnResConfig, AttnResModel, exist_ok=True)
AutoModelForCausalLM.register(AttnResConfig, AttnResForCausalLM, exist_ok=True)
if importlib.util.find_spec("peft") is not None:
    from .peft_support import register_peft_defaults

    register_peft_defaults()

__all__ = ["AttnResConfig", "AttnResForCausalLM", "AttnResModel", "AttnResPreTrainedModel", "__version__"]
