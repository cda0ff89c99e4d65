# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""What an AttnRes config builds: its block layout, the sources every sublayer reads, and its parameter counts."""

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .configuration_attnres import AttnResConfig
from .errors import AttnResError
from .model_sources import locate_model
from .modeling_attnres import AttnResForCausalLM


@dataclass
class ModelLayout:
    residual_mode: str
    num_hidden_layers: int
    hidden_size: int
    attn_res_block_size: int
    attn_res_num_blocks: int
    total_parameters: int
    attnres_parameters: int
    # Every depth source, in order: the output attends over all of them, every other aggregation over the first ones.
    sources: list[str]
    # Per aggregation (one per sublayer, then the output): its name, how many of `sources` it attends over, and whether
    # the last of them is the current block's partial sum rather than the completed block. O(depth) in Full AttnRes
    # too, where each aggregation's source names spelled out (`depth_source_names`) make O(depth²).
    aggregations: list[tuple[str, int, bool]]

    @property
    def attnres_fraction(self) -> float:
        return self.attnres_parameters / self.total_parameters

    def to_dict(self) -> dict:
        return asdict(self) | {"attnres_fraction": self.attnres_fraction}


def read_config(name: str) -> AttnResConfig:
    """The AttnResConfig of a config.json file, a checkpoint directory or a Hub id, checked to be one."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    path = Path(name).expanduser()
    try:
        if path.is_file() and path.suffix == ".json":
            config = AttnResConfig.from_json_file(path)
        else:
            located = locate_model(name)
            source = located.directory or located.hub_id or located.gguf_file.parent
            config = AutoConfig.from_pretrained(source, trust_remote_code=False)  # AttnRes configs are registered
    except (OSError, ValueError, TypeError, StrictDataclassError) as error:
        reason = " ".join(line.strip() for line in str(error).splitlines()[:2])
        raise AttnResError(f"cannot read a config from {name!r}: {reason}") from None
    if getattr(config, "model_type", None) != "attnres":
        raise AttnResError(f"{name!r} is a {config.model_type!r} model, not an AttnRes model (model_type 'attnres')")
    return config


def aggregation_names(num_hidden_layers: int) -> list[str]:
    """`layers.0.attn`, `layers.0.mlp`, ..., `output`: the AttnRes aggregations in forward order."""
    return [f"layers.{i}.{kind}" for i in range(num_hidden_layers) for kind in ("attn", "mlp")] + ["output"]


def source_names(config: AttnResConfig) -> list[str]:
    """The names of all depth sources, in the order of the output's depth-attention weights (paper Eq. 6): the
    embedding, then the blocks (Full AttnRes: the sublayer outputs). The aggregation before sublayer `s` attends over
    the first `config.num_depth_sources(s)` of them, the last being a partial sum unless `s` opens a block."""
    starts = [sublayer for sublayer in range(2 * config.num_hidden_layers) if config.sublayer_starts_block(sublayer)]
    return ["embedding"] + [_source_name(config, sublayer, block) for block, sublayer in enumerate(starts, start=1)]


def aggregations(config: AttnResConfig) -> list[tuple[str, int, bool]]:
    """Per aggregation, in forward order (`layers.0.attn`, `layers.0.mlp`, ..., `output`): its name, how many of
    `source_names(config)` it attends over, and whether the last of them is the current block's partial sum."""
    num_sublayers = 2 * config.num_hidden_layers
    return [
        (
            name,
            config.num_depth_sources(sublayer),
            sublayer < num_sublayers and not config.sublayer_starts_block(sublayer),
        )
        for sublayer, name in enumerate(aggregation_names(config.num_hidden_layers))
    ]


def depth_source_names(config: AttnResConfig) -> list[list[str]]:
    """The names of the sources each aggregation attends over, in the order of its depth-attention weights: one list
    per sublayer (`2 * num_hidden_layers`), then the final output's. Paper Eq. 6 spelled out: the embedding, the
    completed blocks (Full AttnRes: sublayer outputs), then the current block's partial sum. (O(depth²) names in Full
    AttnRes; `source_names` and `aggregations` say the same in O(depth).)"""
    sources = source_names(config)
    return [aggregation_sources(sources, count, partial) for _, count, partial in aggregations(config)]


def aggregation_sources(sources: list[str], count: int, partial: bool) -> list[str]:
    """The names of the first `count` of `sources`, the last marked as a partial sum if `partial`."""
    return sources[: count - 1] + [sources[count - 1] + (" (partial)" if partial else "")]


def _source_name(config: AttnResConfig, sublayer: int, block: int) -> str:
    layer, kind = divmod(sublayer, 2)
    if config.residual_mode == "full":
        return f"layer {layer} {'mlp' if kind else 'attn'}"
    last_layer = min(layer + config.attn_res_block_size, config.num_hidden_layers) - 1
    return f"block {block}: layers {layer}-{last_layer}"


def parameter_counts(config: AttnResConfig) -> tuple[int, int]:
    """`(all, AttnRes)` parameters of the model `config` describes, without building its layers: every decoder layer
    has the same parameters (attention type and place in the blocks change no shape), so both counts are affine in
    the depth and follow from models of one and two layers, built on the meta device. Building every layer takes
    about 3 ms each: minutes for 100,000 layers."""
    counts = []
    for layers in (1, 2):
        small = AttnResConfig.from_dict(
            config.to_dict()
            | {
                "num_hidden_layers": layers,
                "layer_types": config.layer_types[:layers],
                "attn_res_block_size": 1,
                "attn_res_num_blocks": None,
            }  # fmt: skip
        )
        with torch.device("meta"):
            model = AttnResForCausalLM(small)
        attnres = sum(p.numel() for p in model.attn_res_parameters().values())
        counts.append((sum(p.numel() for p in model.parameters()), attnres))
    (total_1, attnres_1), (total_2, attnres_2) = counts
    more = config.num_hidden_layers - 1
    return total_1 + more * (total_2 - total_1), attnres_1 + more * (attnres_2 - attnres_1)


def describe(config: AttnResConfig) -> ModelLayout:
    """Lay out `config` without allocating weights, in time linear in its depth."""
    total_parameters, attnres_parameters = parameter_counts(config)
    return ModelLayout(
        residual_mode=config.residual_mode,
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        attn_res_block_size=config.attn_res_block_size,
        attn_res_num_blocks=config.attn_res_num_blocks,
        total_parameters=total_parameters,
        attnres_parameters=attnres_parameters,
        sources=source_names(config),
        aggregations=aggregations(config),
    )


def short_source_name(name: str) -> str:
    """`embedding` -> `emb`, `block 3: layers 4-5` -> `b3`, `layer 2 mlp` -> `2.mlp`."""
    if name == "embedding":
        return "emb"
    if name.startswith("block "):
        return "b" + name.split(":")[0].removeprefix("block ")
    return name.removeprefix("layer ").replace(" ", ".")


def format_layout(layout: ModelLayout, max_sources_shown: int = 12) -> str:
    lines = [f"residual_mode: {layout.residual_mode}"]
    if layout.residual_mode == "block":
        lines.append(
            f"blocks: {layout.attn_res_num_blocks} of {layout.attn_res_block_size} layer(s) "
            f"({layout.num_hidden_layers} layers, {2 * layout.num_hidden_layers} sublayers)"
        )
        lines += [f"  {name.split(':')[0]}: {name.split(': ')[1]}" for name in layout.sources[1:]]
    lines.append(
        f"parameters: {layout.total_parameters:,} total, {layout.attnres_parameters:,} AttnRes "
        f"({100 * layout.attnres_fraction:.3f}%: a pseudo-query and a key RMSNorm of {layout.hidden_size} per "
        "sublayer and for the output)"
    )
    lines.append("depth sources of each aggregation (emb = token embedding, bN = block N, * = partial sum):")
    width = max(len(name) for name, _, _ in layout.aggregations)
    short = [short_source_name(source) for source in layout.sources]
    half = max_sources_shown // 2
    for name, count, partial in layout.aggregations:  # only the names shown are looked at: linear in depth
        shown = short[:count] if count <= max_sources_shown else short[:half] + ["..."] + short[count - half : count]
        if partial:
            shown[-1] += "*"
        lines.append(f"  {name:<{width}}  {count:>3}  {' '.join(shown)}")
    return "\n".join(lines)
