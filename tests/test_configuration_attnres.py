import json
import logging

import pytest
from huggingface_hub.errors import StrictDataclassError

from attnres import AttnResConfig
from attnres.layout import depth_source_names
from tests.tiny_models import COMMON, tiny_config


def test_defaults_follow_the_paper():
    config = AttnResConfig()
    assert config.residual_mode == "block" and config.attn_res_implementation == "two_phase"
    assert config.num_hidden_layers == 32
    assert (config.attn_res_num_blocks, config.attn_res_block_size) == (8, 4)  # N = 8
    assert config.head_dim == 128 and config.num_key_value_heads == 32
    assert config.layer_types == ["full_attention"] * 32
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert set(config.auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}


@pytest.mark.parametrize(
    "num_layers, kwargs, block_size, num_blocks",
    [
        (4, {}, 1, 4),  # neither given: N = min(8, L)
        (16, {}, 2, 8),
        (30, {}, 4, 8),  # SmolLM2: blocks of 4, the last of 2
        (30, {"attn_res_num_blocks": 3}, 10, 3),
        (27, {"attn_res_block_size": 3}, 3, 9),  # Kimi 48B: 27 layers, 3 per block -> 9 blocks
        (5, {"attn_res_block_size": 5}, 5, 1),  # N = 1: embedding isolated + one running sum
        (28, {"attn_res_block_size": 4, "attn_res_num_blocks": 7}, 4, 7),  # both, consistent
    ],
)
def test_block_partition_is_derived(num_layers, kwargs, block_size, num_blocks):
    config = AttnResConfig(num_hidden_layers=num_layers, **kwargs)
    assert (config.attn_res_block_size, config.attn_res_num_blocks) == (block_size, num_blocks)


def test_unreachable_num_blocks_warns_and_stores_the_real_count(caplog):
    with caplog.at_level(logging.WARNING):
        config = AttnResConfig(num_hidden_layers=28, attn_res_num_blocks=8)
    assert (config.attn_res_block_size, config.attn_res_num_blocks) == (4, 7)
    assert "7 blocks" in caplog.text


def test_source_counts_and_names_spell_out_eq6():
    config = tiny_config(attn_res_block_size=2)  # 5 layers -> blocks [0-1], [2-3], [4]
    names = depth_source_names(config)
    counts = [config.num_depth_sources(sublayer) for sublayer in range(2 * 5 + 1)]
    assert counts == [len(n) for n in names] == [1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4]
    assert [config.sublayer_starts_block(s) for s in range(10)] == [True, False, False, False] * 2 + [True, False]
    assert names[0] == ["embedding"]
    assert names[4] == ["embedding", "block 1: layers 0-1"]  # first sublayer of block 2: no partial sum
    assert names[5] == ["embedding", "block 1: layers 0-1", "block 2: layers 2-3 (partial)"]
    assert names[-1] == ["embedding", "block 1: layers 0-1", "block 2: layers 2-3", "block 3: layers 4-4"]


def test_source_counts_of_kimi_48b_layout():
    # Paper §5.2: 27 transformer blocks, 6 sublayers (3 layers) per block -> 9 blocks + embedding = 10 sources.
    config = AttnResConfig(num_hidden_layers=27, attn_res_block_size=3)
    counts = [config.num_depth_sources(sublayer) for sublayer in range(2 * 27 + 1)]
    assert counts[-1] == max(counts) == 10 and config.sublayers_per_block == 6


def test_full_mode_has_one_source_per_sublayer():
    config = tiny_config("full")
    assert [config.num_depth_sources(s) for s in range(11)] == list(range(1, 12)) and config.sublayers_per_block == 1
    assert depth_source_names(config)[-1][-1] == "layer 4 mlp"


def test_json_round_trip(tmp_path):
    config = tiny_config(attn_res_block_size=3, qk_norm=True, sliding_window=8)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "attnres" and saved["attn_res_block_size"] == 3 and saved["attn_res_num_blocks"] == 2
    assert saved["auto_map"]["AutoModel"] == "modeling_attnres.AttnResModel"
    reloaded = AttnResConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"residual_mode": "dense"}, "residual_mode must be one of"),
        ({"attn_res_block_size": 0}, r"attn_res_block_size \(layers per block\) must be between 1 and"),
        ({"attn_res_block_size": 6}, r"must be between 1 and num_hidden_layers \(5\), got 6"),
        ({"attn_res_num_blocks": 0}, "attn_res_num_blocks must be between 1 and num_hidden_layers"),
        ({"attn_res_num_blocks": 6}, r"attn_res_num_blocks must be between 1 and num_hidden_layers \(5\), got 6"),
        ({"attn_res_block_size": 2, "attn_res_num_blocks": 2}, "splits 5 layers into 3 blocks"),
        ({"hidden_size": 30}, "not a multiple of num_attention_heads"),
        ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
        ({"layer_types": ["full_attention"] * 4}, "layer_types has 4 entries"),
        ({"layer_types": ["full_attention"] * 4 + ["linear_attention"]}, "layer_types entries must be in"),
        ({"layer_types": ["sliding_attention"] * 5}, "sliding_window is None"),
        ({"num_hidden_layers": 0, "layer_types": []}, "num_hidden_layers must be a positive integer"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides, message):
    kwargs = dict(COMMON)
    kwargs.update(overrides)
    with pytest.raises(StrictDataclassError, match=message):
        AttnResConfig(**kwargs)


def test_explicit_head_dim_need_not_divide_hidden_size():
    config = AttnResConfig(**dict(COMMON, hidden_size=30, head_dim=16))  # Qwen3 style
    assert config.head_dim == 16


def test_building_a_deep_model_costs_what_building_llama_costs():
    """Sizing a layer reads O(1) integers from the config (the source lists used to be rebuilt for every layer: 14 s
    at 1,000 layers, 168 s at 5,000, where transformers' Llama takes about a second). A complexity check, paired with
    Llama of the same depth so that the machine's speed cancels out: the fastest of three builds of each, on the meta
    device."""
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnres import AttnResForCausalLM

    layers = 1000
    builds = {
        "attnres": lambda: AttnResForCausalLM(AttnResConfig(**COMMON | {"num_hidden_layers": layers})),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON | {"num_hidden_layers": layers})),
    }
    times = {name: [] for name in builds}
    for _ in range(3):
        for name, build in builds.items():
            start = time.perf_counter()
            with torch.device("meta"):
                build()
            times[name].append(time.perf_counter() - start)
    ratio = min(times["attnres"]) / min(times["llama"])
    print(f"[complexity] building {layers} layers, AttnRes / Llama: {ratio:.2f}")
    assert ratio < 3
