"""Families grafted through their own transformers modules (`source_model_type`): `attnres convert` is exact on each.

Every source is built by transformers' own classes, with weights moved away from their symmetric init
(`tiny_models.other_family_source`), saved with a tokenizer, converted by the CLI, and the graft loaded as remote
code in a process where `attnres` cannot be imported."""

import dataclasses
import json

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from attnres import AttnResConfig, AttnResForCausalLM
from attnres.cli import main
from attnres.families import UNSUPPORTED_REASONS, attnres_config_kwargs
from attnres.modeling_attnres import FAMILY_LAYOUTS, AttnResFamilyDecoderLayer
from tests.conftest import PEFT_READS_THE_DEPRECATED_FLAG, TOLERANCES, assert_close
from tests.test_remote_code import load_as_remote_code
from tests.tiny_models import OTHER_FAMILIES, greedy_without_cache, other_family_source, tiny_tokenizer


# transformers 5.4 types OlmoConfig.tie_word_embeddings as an int, and `save_pretrained` then fails building the
# default OlmoConfig() to compare generation parameters: no OLMo checkpoint can be written there to convert.
OLMO_UNSAVABLE = CONFIG_MAPPING["olmo"].__dataclass_fields__["tie_word_embeddings"].type is int
FAMILIES = [
    pytest.param(
        family,
        marks=pytest.mark.skipif(family == "olmo" and OLMO_UNSAVABLE, reason="transformers 5.4 cannot save OLMo"),
    )
    for family in OTHER_FAMILIES
]


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def grafted(tmp_path_factory):
    """Every family converted with the CLI, then loaded in ONE clean process with trust_remote_code."""
    root = tmp_path_factory.mktemp("families")
    families = [family for family in OTHER_FAMILIES if not (family == "olmo" and OLMO_UNSAVABLE)]
    for family in families:
        other_family_source(family).save_pretrained(root / f"{family}-src")
        tiny_tokenizer().save_pretrained(root / f"{family}-src")
        argv = ["convert", str(root / f"{family}-src"), str(root / f"{family}-dst"), "--block-size", "2"]
        assert main([*argv, "--no-progress"]) == 0
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    outputs, reports = load_as_remote_code([root / f"{family}-dst" for family in families], ids, root)
    assert not any(report["attnres_imported"] for report in reports)
    return root, dict(zip(families, outputs)), ids


@pytest.mark.parametrize("family", FAMILIES)
def test_grafted_family_computes_the_source_model(grafted, family):
    root, remote, ids = grafted
    # The source as a user loads it (its default attention implementation, which the graft shares: the family's)
    source = AutoModelForCausalLM.from_pretrained(root / f"{family}-src").eval()
    got = remote[family]
    mask = got["mask"]
    with torch.no_grad():
        expected = source(ids).logits
        expected_padded = source(ids, attention_mask=mask).logits
    valid = mask.bool()  # the padded positions' outputs are unspecified (every key masked)
    worst = max(
        relative_difference(got["logits"], expected),
        relative_difference(got["padded_logits"][valid], expected_padded[valid]),
    )
    print(f"{family}: worst relative logit difference {worst:.2e}")
    assert worst <= TOLERANCES["fp32_graft_relative"], f"{family}: remote-code graft vs source logits: {worst:.2e}"
    # KV-cached greedy decoding (sliding and global layers, NoPE layers, left padding) vs recomputing everything
    assert torch.equal(got["generated"], greedy_without_cache(source, ids[:1, :4], torch.ones_like(ids[:1, :4]), 5))
    assert torch.equal(got["padded_generated"], greedy_without_cache(source, ids, mask, 6))

    config = json.loads((root / f"{family}-dst" / "config.json").read_text())
    assert config["model_type"] == "attnres" and config["source_model_type"] == family
    card = ModelCard.load(root / f"{family}-dst" / "README.md")
    assert f"| source family | `{family}` (built from transformers' own `{family}` modules) |" in card.text
    assert (root / f"{family}-dst" / "tokenizer.json").read_bytes() == (
        root / f"{family}-src" / "tokenizer.json"
    ).read_bytes()
    assert (root / f"{family}-dst" / "generation_config.json").is_file()


def in_memory_graft(family: str, source=None, **overrides) -> tuple[torch.nn.Module, AttnResForCausalLM]:
    source = other_family_source(family) if source is None else source
    config = AttnResConfig(**attnres_config_kwargs(source.config), attn_res_block_size=2, **overrides)
    config._attn_implementation = "eager"
    model = AttnResForCausalLM(config).eval()
    result = model.load_state_dict(source.state_dict(), strict=False)
    assert not result.unexpected_keys and all("_res_" in key for key in result.missing_keys), result
    return source, model


@pytest.mark.parametrize("family", ["glm4", "gemma2", "olmo"])
def test_without_eps_over_n_squared_a_family_is_not_exact(family):
    """Negative control: the eps / n² of each PreNorm is what makes the graft exact (the sources' norms: an
    attribute `variance_epsilon` (GLM-4), `eps` (Gemma 2), or OLMo's replaced LayerNorm)."""
    source, model = in_memory_graft(family)
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = source(ids).logits
        assert relative_difference(model(ids).logits, expected) <= TOLERANCES["fp32_graft_relative"]
        layout = FAMILY_LAYOUTS[family]
        for module in model.modules():
            if isinstance(module, AttnResFamilyDecoderLayer):
                for sublayer in layout.sublayers:
                    norm = getattr(module, sublayer.norm)
                    attribute = "eps" if layout.fixed_norm_eps is not None else layout.norm_eps
                    setattr(norm, attribute, layout.fixed_norm_eps or model.config.rms_norm_eps)
        assert relative_difference(model(ids).logits, expected) > 10 * TOLERANCES["fp32_graft_relative"]


def test_phi3_long_rope_generation_recomputes_the_cache_as_the_source_does():
    """Phi-3's long-rope checkpoints rotate positions with a short table up to `original_max_position_embeddings`
    and a long one beyond: once a generation passes it, `Phi3ForCausalLM` drops the cache (keys rotated with the short
    table) and recomputes the sequence. The graft does the same, so its greedy tokens are those of the source
    recomputing the whole sequence at every step; without the reset (negative control) they are not. (The reference
    is the recomputation, not the source's `generate`: transformers 5.4's Phi-3 drops the cache but then feeds only
    the last token, and departs from it; 5.25's matches it.)"""
    head_dim = 32 // 4  # tiny_models.COMMON
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * (head_dim // 2),
        "long_factor": [4.0 + i for i in range(head_dim // 2)],  # far from the short table
        "original_max_position_embeddings": 8,
    }
    source = other_family_source("phi3", rope_parameters=rope, original_max_position_embeddings=8)
    source, model = in_memory_graft("phi3", source)
    ids = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(0))
    options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = greedy_without_cache(source, ids, torch.ones_like(ids), 8)  # crosses position 8 at the 3rd token
    assert torch.equal(model.generate(ids, **options), expected)
    model.layout = dataclasses.replace(model.layout, long_rope_cache_reset=False)
    assert not torch.equal(model.generate(ids, **options), expected)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_moe_router_logits_and_auxiliary_loss_are_the_sources(family):
    source, model = in_memory_graft(family)
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = source(ids, attention_mask=mask, labels=ids, output_router_logits=True)
        got = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    assert len(got.router_logits) == len(expected.router_logits) > 0
    for actual, reference in zip(got.router_logits, expected.router_logits):
        assert_close(actual, reference, "fp32", f"{family} router logits")
    assert_close(got.aux_loss, expected.aux_loss, "fp32", f"{family} auxiliary loss")
    assert_close(got.loss, expected.loss, "fp32", f"{family} loss with router_aux_loss_coef * aux_loss")
    assert model(ids).aux_loss is None  # only when asked, as in the source (output_router_logits=False)


@pytest.mark.parametrize("family", ["gemma3_text", "qwen2_moe", "phi3"])
def test_family_activation_checkpointing_gives_the_same_gradients(family):
    _, model = in_memory_graft(family)
    model.train()
    for module in model.modules():  # training-mode code paths, without randomness
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_res_proj.weight"):
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 99, (2, 10), generator=torch.Generator().manual_seed(0))

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}

    plain = gradients()
    recomputed = []
    hooks = [layer.self_attn.register_forward_hook(lambda *_: recomputed.append(1)) for layer in model.model.layers]
    model.activation_checkpointing_enable({"use_reentrant": False})
    checkpointed = gradients()
    assert len(recomputed) == 2 * model.config.num_hidden_layers  # each attention ran twice: forward, recompute
    for hook in hooks:
        hook.remove()
    assert plain.keys() == checkpointed.keys() and any(name.endswith("_res_proj.weight") for name in plain)
    for name in plain:  # recomputed layers read their own phase 1 instead of their block's: sums regrouped
        error = (checkpointed[name] - plain[name]).norm() / plain[name].norm().clamp(min=1e-12)
        assert error <= TOLERANCES["fp32_family_grad_relative"], f"{family} {name}: relative error {error:.2e}"


def test_family_model_records_depth_and_attention_maps_and_splits_per_layer():
    _, model = in_memory_graft("gemma3_text")
    ids = torch.randint(3, 99, (1, 8))
    with torch.no_grad():
        outputs = model(ids, output_depth_attentions=True, output_attentions=True, output_hidden_states=True)
    layers = model.config.num_hidden_layers
    assert len(outputs.depth_attentions) == 2 * layers + 1
    assert len(outputs.attentions) == layers and len(outputs.hidden_states) == layers + 1
    # FSDP and device_map keep the family layers whole, by a class name the model holds
    assert set(model._no_split_modules) == {"AttnResFamilyDecoderLayer"}
    assert {type(layer).__name__ for layer in model.model.layers} == {"AttnResFamilyDecoderLayer"}


@pytest.mark.parametrize("model_type", ["olmo2", "olmo3", "exaone4"])
def test_sublayer_output_norm_families_are_refused_with_the_reason(tmp_path, capsys, model_type):
    # refused from config.json's model_type, before anything else is read
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 1
    err = capsys.readouterr().err
    assert f"cannot graft AttnRes onto model_type {model_type!r}" in err and "raw residual stream" in err
    assert UNSUPPORTED_REASONS[model_type] in err and not (tmp_path / "dst").exists()


def test_bidirectional_gemma3_is_refused(tmp_path, capsys):
    source = other_family_source("gemma3_text", use_bidirectional_attention=True)
    source.save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 1
    assert "use_bidirectional_attention=True makes it an encoder" in capsys.readouterr().err


@PEFT_READS_THE_DEPRECATED_FLAG
@pytest.mark.parametrize("family", ["phi3", "qwen3_moe", "gemma3_text"])
def test_default_lora_targets_fit_every_family(family):
    """`attnres_lora_config()` without target_modules wraps what PEFT wraps on the source family (Phi-3: the fused
    qkv_proj), and at zero LoRA (PEFT's init) the graft still computes its source."""
    peft = pytest.importorskip("peft")
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    from attnres.peft_support import FUSED_ATTENTION_TARGETS, attnres_lora_config

    source, model = in_memory_graft(family)
    peft_model = peft.get_peft_model(model, attnres_lora_config(r=4))
    wrapped = {name.split(".")[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    expected = defaults.get(family) or FUSED_ATTENTION_TARGETS.get(family) or defaults["llama"]
    assert wrapped == set(expected)
    ids = torch.randint(3, 99, (1, 10))
    with torch.no_grad():
        assert relative_difference(peft_model(ids).logits, source(ids).logits) <= TOLERANCES["fp32_graft_relative"]
