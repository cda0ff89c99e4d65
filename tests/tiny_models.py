"""Tiny models for the tests: AttnRes configs and their transformers twins (Llama, Qwen2, Qwen3, Mistral).

Each family is described once, as the kwargs its transformers config takes and the AttnResConfig kwargs that describe
the same architecture, so that the "AttnRes at zero queries == transformers" tests compare like with like.
"""

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from attnres import AttnResConfig, AttnResForCausalLM


# Hidden 32, 5 layers: with blocks of 2 layers the partition is [0-1], [2-3], [4] (the last block is shorter).
COMMON = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}, {}),
    "llama3-rope-tied": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            tie_word_embeddings=True,
            attention_bias=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        dict(
            tie_word_embeddings=True,
            attention_bias=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "qwen2-sliding": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
        dict(qkv_bias=True, sliding_window=4, layer_types=["full_attention"] * 2 + ["sliding_attention"] * 3),
    ),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16), dict(head_dim=16, qk_norm=True)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=4), dict(sliding_window=4)),
}


def tiny_config(residual_mode: str = "block", **overrides) -> AttnResConfig:
    kwargs = dict(COMMON, residual_mode=residual_mode)
    if residual_mode == "block" and "attn_res_num_blocks" not in overrides:
        kwargs["attn_res_block_size"] = 2
    kwargs.update(overrides)
    return AttnResConfig(**kwargs)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, query_std: float | None = None) -> nn.Module:
    """Give every parameter a value that makes differences visible: projections with O(1) outputs, norm and key-norm
    weights around 1, small embeddings (as real checkpoints have, which is where RMSNorm's eps matters). Pseudo-queries
    stay zero unless `query_std` is given."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("_res_proj.weight"):
            if query_std is not None:
                param.copy_(torch.randn(param.shape, generator=generator) * query_std)
        elif "norm" in name:
            param.copy_(0.5 + torch.rand(param.shape, generator=generator))
        elif "embed_tokens" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        elif name.endswith("bias"):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        else:
            param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    return model


def family_reference(family: str):
    """A randomly initialised transformers model of `family`, in eval mode, fp32."""
    config_class, model_class, hf_kwargs, _ = FAMILIES[family]
    return randomize_(model_class(config_class(**COMMON, **hf_kwargs))).eval()


def family_pair(family: str, residual_mode: str = "block", **attnres_overrides):
    """A randomly initialised transformers model of `family` and an AttnRes model of the same architecture holding
    the same weights (AttnRes parameters at their zero init). Both in eval mode, fp32."""
    attnres_kwargs = FAMILIES[family][3]
    reference = family_reference(family)
    model = AttnResForCausalLM(tiny_config(residual_mode, **attnres_kwargs, **attnres_overrides)).eval()
    result = model.load_state_dict(reference.state_dict(), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all("_res_" in key for key in result.missing_keys), result.missing_keys
    return reference, model


def attnres_parameter_names(model: nn.Module) -> set[str]:
    return set(model.attn_res_parameters())


WORDS = (  # noqa: SIM905 (a word list reads best as text)
    "the a of to in is and it that for on with as was he she they we you def return if else for while class import "
    "from print self none true false one two three four five six seven eight nine ten cat dog house tree river "
    "mountain city road car train plane boat red green blue yellow black white big small old new good bad fast slow "
    "hot cold up down left right day night sun moon star sky sea fish bird horse cow sheep apple bread milk"
).split()


def tiny_tokenizer():
    """A word-level tokenizer with exactly COMMON["vocab_size"] tokens and a chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS[: COMMON["vocab_size"] - len(specials)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    return tokenizer


# --- Families grafted through their own transformers modules (`source_model_type`) -----------------------------------
# Each config sets what makes the family differ from Llama where the family has it: sliding and global layers, NoPE
# layers, experts with a shared expert and dense layers, soft-capping, multipliers, clipping. The norm eps is large
# (1e-2), so that a norm without eps / n² is visibly not exact (`test_families.py` checks that it is not).
OTHER_FAMILIES = {
    "qwen3_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[1],
        head_dim=8,
    ),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        use_sliding_window=True, sliding_window=4, max_window_layers=3,
    ),
    # (intermediate_size: transformers 5.25's grouped experts need 16-byte strides)
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4, intermediate_size=32),
    "gemma": dict(head_dim=8),
    "gemma2": dict(
        head_dim=8, sliding_window=4, final_logit_softcapping=5.0, attn_logit_softcapping=20.0, query_pre_attn_scalar=8
    ),
    "gemma3_text": dict(
        head_dim=8, sliding_window=4, final_logit_softcapping=5.0, query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                     "full_attention"],
    ),
    "smollm3": dict(no_rope_layer_interval=2, use_sliding_window=True, sliding_window=4),
    "phi3": dict(sliding_window=4),
    "glm4": dict(head_dim=8),
    "granite": dict(residual_multiplier=0.3, embedding_multiplier=6.0, logits_scaling=4.0, attention_multiplier=0.2),
    "olmo": dict(clip_qkv=3.0),
}  # fmt: skip


def other_family_source(model_type: str, **overrides) -> nn.Module:
    """A randomly initialised transformers causal LM of `model_type` (`OTHER_FAMILIES`), built by transformers' own
    classes, in eval mode, fp32, with every weight moved away from its symmetric init (`randomize_`)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kwargs = dict(COMMON, rms_norm_eps=1e-2, tie_word_embeddings=False)
    kwargs.update(OTHER_FAMILIES[model_type], **overrides)
    config_class = CONFIG_MAPPING[model_type]
    if config_class.__dataclass_fields__["tie_word_embeddings"].type is int:
        # OlmoConfig on transformers 5.4 annotates it as an int, which strict validation enforces
        kwargs["tie_word_embeddings"] = int(kwargs["tie_word_embeddings"])
    config = config_class(**kwargs)
    config._attn_implementation = "eager"
    return randomize_(AutoModelForCausalLM.from_config(config)).eval()


@torch.no_grad()
def greedy_without_cache(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int):
    """Greedy decoding as `generate(do_sample=False, pad_token_id=COMMON["pad_token_id"])` does it (a row that has
    produced the EOS token continues with padding), but recomputing the whole sequence at each step: the reference
    for KV-cached `generate`, and one that works for every family on every release (OLMo's `generate` on
    transformers 5.4 cannot build its own config)."""
    finished = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool)
    for _ in range(new_tokens):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        next_token = logits[:, -1].argmax(-1, keepdim=True).masked_fill(finished, COMMON["pad_token_id"])
        finished |= next_token == COMMON["eos_token_id"]
        input_ids = torch.cat([input_ids, next_token], -1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], -1)
    return input_ids
