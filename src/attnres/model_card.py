# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""Model cards for AttnRes checkpoints: rendered from `model_cards/attnres.md` with huggingface_hub's ModelCard."""

from importlib.resources import files
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from . import __version__
from .configuration_attnres import AttnResConfig
from .layout import describe


TEMPLATE = files("attnres") / "model_cards" / "attnres.md"
RESULTS_START = "<!-- attnres:results:start -->"
RESULTS_END = "<!-- attnres:results:end -->"


def source_license(source_dir: Path) -> dict:
    """The license fields of the source's own model card (`license`, `license_name`, `license_link`), if any."""
    readme = source_dir / "README.md"
    if not readme.is_file():
        return {}
    try:
        data = ModelCard.load(readme).data.to_dict()
    except Exception:  # a README without valid front matter tells us nothing about the license
        return {}
    return {key: data[key] for key in ("license", "license_name", "license_link") if data.get(key)}


def render_model_card(
    config: AttnResConfig,
    *,
    base_model: str,
    base_model_is_hub_id: bool,
    license_fields: dict,
    command: str,
    dtype: str,
    source_family: str,
    repo_id: str = "path/to/this-checkpoint",
) -> str:
    layout = describe(config)
    card_data = ModelCardData(
        base_model=base_model if base_model_is_hub_id else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["attnres", "attention-residuals", "custom_code"],
        **license_fields,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=TEMPLATE.read_text(),
        model_name=f"{Path(base_model).name} + {config.residual_mode.capitalize()} AttnRes",
        variant=config.residual_mode.capitalize(),
        base_model=base_model,
        attnres_version=__version__,
        source_family=source_family,
        family_modules=config.source_model_type is not None,
        residual_mode=config.residual_mode,
        num_blocks=config.attn_res_num_blocks,
        block_size=config.attn_res_block_size,
        num_layers=config.num_hidden_layers,
        attnres_parameters=f"{layout.attnres_parameters:,}",
        total_parameters=f"{layout.total_parameters:,}",
        attnres_percent=f"{100 * layout.attnres_fraction:.3f}%",
        dtype=dtype,
        trained="no (grafted, zero-initialised pseudo-queries)",
        command=command,
        repo_id=repo_id,
    )
    return str(card)


def fill_results(card_text: str, rows: list, table: str, settings: list[str], model_name: str) -> str:
    """The card with its results section replaced by `table`, a sentence per headline metric on the paired comparison
    with the baseline, and `settings`, and its `model-index` metadata set to the AttnRes scores (what the Hub shows in
    the evaluation widget)."""
    from huggingface_hub import EvalResult

    from .eval_tasks import SUITE

    if RESULTS_START not in card_text or RESULTS_END not in card_text:
        raise ValueError(
            f"the model card has no results section (the {RESULTS_START} ... {RESULTS_END} markers that "
            "`attnres convert` writes); add them where the table should go"
        )
    card = ModelCard(card_text)
    card.data.model_name = card.data.model_name or model_name
    card.data.eval_results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=SUITE[row.task].hub_dataset,
            dataset_name=row.task,
            metric_type=row.metric.split(" (")[0],
            metric_name=row.metric,
            metric_value=round(row.attnres, 4),
        )
        for row in rows
    ]
    text = str(card)
    before, rest = text.split(RESULTS_START, 1)
    _, after = rest.split(RESULTS_END, 1)
    section = "\n".join(["", table, "", *paired_summary(rows), *settings, ""])
    return f"{before}{RESULTS_START}\n{section}\n{RESULTS_END}{after}"


def paired_summary(rows: list) -> list[str]:
    """One line per headline metric: the difference to the baseline with its paired interval, for right/wrong scores
    the flips and McNemar's p, so a reader of the card sees whether the difference is more than noise, and how many
    documents both models answered identically."""
    from .eval_tasks import is_primary_metric
    from .paired_stats import CONFIDENCE

    lines = []
    for row in rows:
        paired = row.paired
        if paired is None or not is_primary_metric(row.task, row.metric):
            continue
        line = (
            f"- {row.task} {row.metric}: AttnRes - baseline = {row.delta:+.4f}, {CONFIDENCE:.0%} CI "
            f"[{paired.ci_low:+.4f}, {paired.ci_high:+.4f}] over {paired.items:,} paired documents"
        )
        if paired.mcnemar_p is not None:
            line += (
                f"; {paired.right_to_wrong} lost, {paired.wrong_to_right} gained (McNemar p = {paired.mcnemar_p:.3g})"
            )
        if row.identical_answers is not None:
            line += "; identical answers on {} of {} documents".format(*row.identical_answers)
        lines.append(line)
    return [*lines, ""] if lines else []
