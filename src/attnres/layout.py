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
    # (aggregation name, source names), one per sublayer and one for the final output
    depth_sources: list[tuple[str, list[str]]]

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


def depth_source_names(config: AttnResConfig) -> list[list[str]]:
    """The names of the sources each aggregation attends over, in the order of its depth-attention weights: one list
    per sublayer (`2 * num_hidden_layers`), then the final output's. Paper Eq. 6 spelled out: the embedding, the
    completed blocks (Full AttnRes: sublayer outputs), then the current block's partial sum."""
    num_sublayers = 2 * config.num_hidden_layers
    completed: list[str] = []
    partial = "embedding"
    names = []
    for sublayer in range(num_sublayers + 1):
        if sublayer < num_sublayers and config.sublayer_starts_block(sublayer):
            completed.append(partial)
            partial = _source_name(config, sublayer, len(completed))
            names.append(list(completed))
        else:
            names.append(completed + [partial + (" (partial)" if sublayer < num_sublayers else "")])
    return names


def _source_name(config: AttnResConfig, sublayer: int, block: int) -> str:
    layer, kind = divmod(sublayer, 2)
    if config.residual_mode == "full":
        return f"layer {layer} {'mlp' if kind else 'attn'}"
    last_layer = min(layer + config.attn_res_block_size, config.num_hidden_layers) - 1
    return f"block {block}: layers {layer}-{last_layer}"


def describe(config: AttnResConfig) -> ModelLayout:
    """Lay out `config` without allocating weights: the model is built on the meta device to count parameters."""
    with torch.device("meta"):
        model = AttnResForCausalLM(config)
    return ModelLayout(
        residual_mode=config.residual_mode,
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        attn_res_block_size=config.attn_res_block_size,
        attn_res_num_blocks=config.attn_res_num_blocks,
        total_parameters=sum(p.numel() for p in model.parameters()),
        attnres_parameters=sum(p.numel() for p in model.attn_res_parameters().values()),
        depth_sources=list(zip(aggregation_names(config.num_hidden_layers), depth_source_names(config))),
    )


def short_source_name(name: str) -> str:
    """`embedding` -> `emb`, `block 3: layers 4-5 (partial)` -> `b3*`, `layer 2 mlp` -> `2.mlp`."""
    partial = name.endswith(" (partial)")
    name = name.removesuffix(" (partial)")
    if name == "embedding":
        short = "emb"
    elif name.startswith("block "):
        short = "b" + name.split(":")[0].removeprefix("block ")
    else:
        short = name.removeprefix("layer ").replace(" ", ".")
    return short + ("*" if partial else "")


def format_layout(layout: ModelLayout, max_sources_shown: int = 12) -> str:
    lines = [f"residual_mode: {layout.residual_mode}"]
    if layout.residual_mode == "block":
        lines.append(
            f"blocks: {layout.attn_res_num_blocks} of {layout.attn_res_block_size} layer(s) "
            f"({layout.num_hidden_layers} layers, {2 * layout.num_hidden_layers} sublayers)"
        )
        lines += [f"  {name.split(':')[0]}: {name.split(': ')[1]}" for name in layout.depth_sources[-1][1][1:]]
    lines.append(
        f"parameters: {layout.total_parameters:,} total, {layout.attnres_parameters:,} AttnRes "
        f"({100 * layout.attnres_fraction:.3f}%: a pseudo-query and a key RMSNorm of {layout.hidden_size} per "
        "sublayer and for the output)"
    )
    lines.append("depth sources of each aggregation (emb = token embedding, bN = block N, * = partial sum):")
    width = max(len(name) for name, _ in layout.depth_sources)
    for name, sources in layout.depth_sources:
        shown = [short_source_name(source) for source in sources]
        if len(shown) > max_sources_shown:
            half = max_sources_shown // 2
            shown = shown[:half] + ["..."] + shown[-half:]
        lines.append(f"  {name:<{width}}  {len(sources):>3}  {' '.join(shown)}")
    return "\n".join(lines)
