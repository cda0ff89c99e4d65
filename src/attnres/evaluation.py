# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""`attnres eval`: run the benchmark suite with lm-eval's Python API and compare a baseline with an AttnRes model.

Three steps, each a function: `evaluate_model` wraps each model in lm-eval's `HFLM` (with `loading_options`: no
checkpoint's own code unless `--trust-remote-code`, no Hub kernels unless `--use-kernels`) and runs
`simple_evaluate` on the task configs `eval_tasks` writes;
`comparison_rows` pairs the two models' scores, their per-document scores for paired statistics (`paired_stats`:
bootstrap interval of the difference, flips, McNemar's test) and their per-document answers (`identical_answers`: how
many documents got the same answer from both); `write_report` renders results.md, results.json, the per-document
samples, comparison.png and the model card. `run_eval` is the glue. lm-eval's `use_cache` keeps every model response
in SQLite, keyed by the model's identity, so an interrupted run resumes where it stopped; under `accelerate launch` /
`torchrun`, HFLM splits the requests across the processes and the first one writes the report. The report is staged
next to `--output` and renamed into place at the end (`paths.staged_directory`).
"""

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import AttnResError
from .eval_tasks import BenchmarkTask, PreparedTasks, check_requirements, is_primary_metric, write_task_configs
from .model_card import RESULTS_START, fill_results
from .model_sources import check_available, check_model_code, check_tokenizer, loading_options, locate_model
from .paired_stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, PairedStatistics, paired_statistics
from .paths import check_replaceable, first_missing_ancestor, staged_directory


logger = logging.getLogger(__name__)


@dataclass
class ComparisonRow:
    """One metric of one task: the two models' scores, their standard errors and the difference; where the metric is
    the mean of per-document scores, the paired statistics of the per-document differences; and where the responses
    are answers (`answer`), `identical_answers`: (documents both models answered identically, documents) over the row's
    documents (`metric_records`: those of its filter, a group's subtasks pooled), so the same for every metric of a
    task and filter."""

    task: str
    metric: str
    samples: int | None
    baseline: float | None
    baseline_stderr: float | None
    attnres: float
    attnres_stderr: float | None
    paired: PairedStatistics | None = None
    identical_answers: tuple[int, int] | None = None

    @property
    def delta(self) -> float | None:
        return None if self.baseline is None else self.attnres - self.baseline

    def to_dict(self) -> dict:
        return {**asdict(self), "delta": self.delta}


def resolve_model(name: str, flag: str, trust_remote_code: bool) -> str:
    """What HFLM loads for `name`: a local checkpoint directory (absolute) or a Hub id, checked first (it can be had,
    it has a tokenizer, which code it runs) so that HFLM does not fail after loading another model."""
    located = locate_model(name, flag=flag)
    check_available(located, flag=flag)
    check_tokenizer(
        located,
        flag=flag,
        fix="lm-eval needs one: save the tokenizer it was made with into it (`attnres convert` copies its source's)",
    )
    check_model_code(located, flag=flag, trust_remote_code=trust_remote_code)
    if located.gguf_file is not None:
        raise AttnResError(
            f"{flag} {name!r} is a GGUF file; convert it first (`attnres fetch --transformers-dir`, or `attnres "
            "convert` for a graft) so that both models are evaluated from the same dequantized weights"
        )
    return str(located.directory or located.hub_id)


def model_fingerprint(model: str, dtype: str) -> str:
    """Identifies a model for the response cache: a changed checkpoint, or changed remote code, must not reuse old
    answers. Weights are identified by size and modification time, configs and code (small) by their content."""
    digest = hashlib.sha256(f"{model}|{dtype}".encode())
    path = Path(model)
    if path.is_dir():
        for name in sorted(os.listdir(path)):
            if name.endswith((".json", ".py")):
                digest.update(name.encode() + b"|" + (path / name).read_bytes())
            elif name.endswith((".safetensors", ".bin", ".gguf")):
                stat = (path / name).stat()
                digest.update(f"{name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have before any model loads (HFLM would fail inside torch, after
    loading the model)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        raise AttnResError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind.type == "cuda" and (kind.index or 0) >= available:
        found = f"{available} CUDA device(s)" if available else f"no CUDA device (torch {torch.__version__})"
        raise AttnResError(f"--device {device}: this machine has {found}; use --device cpu, or leave --device out "
                           "to use the first accelerator there is")  # fmt: skip
    if kind.type == "mps" and not torch.backends.mps.is_available():
        raise AttnResError(f"--device {device}: MPS is not available here; use --device cpu or leave --device out")


def check_batch_size(batch_size: str) -> None:
    """lm-eval's HFLM takes a positive integer, "auto" or "auto:N" (the largest batch that fits, found again N times
    over the run); anything else fails inside it (`int("abc")`), after the model has loaded."""
    if not re.fullmatch(r"[1-9][0-9]*|auto(:[1-9][0-9]*)?", batch_size):
        raise AttnResError(
            f"--batch-size {batch_size!r}: must be a positive integer, 'auto' or 'auto:N' (the largest batch that "
            "fits, found again N times over the run)"
        )


def check_cache_dir(cache_dir: Path | None) -> None:
    """The response cache goes into `cache_dir`, which must be a directory this process can write, or be creatable in
    one: lm-eval would find out only after the model has loaded, with a traceback. Checked by creating (and removing)
    a file there, which answers for read-only directories and file systems, permissions and ACLs alike."""
    if cache_dir is None:
        return
    missing = first_missing_ancestor(cache_dir)
    existing = cache_dir if missing is None else missing.parent
    fix = "choose another --cache-dir, or pass --no-cache to run without one"
    if not existing.is_dir():
        where = "" if existing == cache_dir else f": {existing}"
        raise AttnResError(f"--cache-dir {cache_dir}{where} is not a directory; {fix}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise AttnResError(f"--cache-dir {cache_dir}: cannot write in {existing} ({error.strerror}); {fix}") from None


def set_aside_if_corrupt(database: Path) -> None:
    """lm-eval keeps the responses in a SQLite file (sqlitedict) that it opens unchecked: a file that is not a
    database or is damaged (a full disk, a copy cut short) fails every later run with `sqlite3.DatabaseError`. Such a
    file, with SQLite's journal files (which would otherwise be replayed into the next one), is renamed to
    `<name>.corrupt-<time>` beside it, with a one-line warning, and lm-eval starts a new cache (its answers are
    computed again). Only SQLite's "not a database" and "corrupt" count: a database that another process has locked
    is left alone, and a journal left by an interrupted run is rolled back by the check, as SQLite does on any open."""
    if not database.is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=0)) as connection:
            if [row for (row,) in connection.execute("PRAGMA quick_check")] == ["ok"]:
                return
            reason = "SQLite's quick_check finds it damaged"
    except sqlite3.DatabaseError as error:
        if not (error.sqlite_errorname or "").startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
            return  # locked, busy, ...: not this function's to judge; lm-eval reports it
        reason = str(error)
    suffix = f".corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    for part in (database, *(database.with_name(database.name + journal) for journal in ("-journal", "-wal", "-shm"))):
        if part.exists():
            part.rename(part.with_name(part.name + suffix))
    logger.warning(
        "--cache-dir: %s cannot be used (%s); moved it to %s and starting a new cache, so this model's answers are "
        "computed again", database, reason, database.name + suffix,
    )  # fmt: skip


def check_positive(value: int | None, flag: str, what: str) -> None:
    if value is not None and value < 1:
        raise AttnResError(f"{flag} {value}: must be a positive number of {what}; leave {flag} out for no limit")


def default_device() -> str:
    """The first accelerator available, else the CPU (lm-eval's own default is "cuda", which fails without one)."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def evaluate_model(
    model: str,
    prepared: PreparedTasks,
    *,
    limit: int | None,
    batch_size: str,
    device: str | None,
    dtype: str,
    max_gen_toks: int | None,
    cache_dir: Path | None,
    allow_code_execution: bool,
    label: str,
    loading: dict,
) -> dict | None:
    """lm-eval's full results for one model (`simple_evaluate`'s return value), with its per-document records moved
    to `results["samples"]` in the compact form `sample_records` gives; `None` on the processes of a distributed run
    other than the first."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = device or default_device()
    if device == "cpu":  # accelerate forms a multi-process world on CPUs only when asked (`accelerate launch --cpu`)
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    lm = HFLM(
        pretrained=model,
        backend="causal",
        dtype=dtype,
        batch_size=batch_size,
        device=device,
        **loading,  # passed on to from_pretrained
    )
    split_requests_across_processes(lm)
    cache = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # what runs differently (Hub kernels, a checkpoint's own code) keeps its answers apart
        switches = "".join(f"{option}-" for option, value in sorted(loading.items()) if value)
        cache = str(cache_dir / f"{label}-{switches}{model_fingerprint(model, dtype)}")
        # the file simple_evaluate opens: one per process, numbered as it numbers them
        set_aside_if_corrupt(Path(f"{cache}_rank{lm.rank or int(os.environ.get('LOCAL_RANK', '0'))}.db"))
    logger.info("evaluating %s (%s)", model, label)
    results = simple_evaluate(
        model=lm,
        tasks=list(prepared.names.values()),
        task_manager=TaskManager(include_path=str(prepared.task_dir), include_defaults=False),
        limit=limit,
        use_cache=cache,
        gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
        log_samples=True,
        confirm_run_unsafe_code=allow_code_execution,
    )
    del lm
    if results is None:  # simple_evaluate gathers the results on the first process of a distributed run
        return None
    results["samples"] = sample_records(results.get("samples", {}), results["configs"])
    return json.loads(json.dumps(results, default=_jsonable))


def sample_records(samples: dict[str, list[dict]], configs: dict[str, dict]) -> dict[str, list[dict]]:
    """Per task, one record per document and filter: its id, the filter and the hashes, the model's raw responses
    (`resps`: generated text, or loglikelihoods), the filtered responses and the metric values; lm-eval's copies of the
    document and the prompt arguments are dropped (the hashes identify them). Both models answer the same documents,
    so records pair up by (task, document id, filter).

    Each request keeps the task's `repeats` responses: in a distributed run lm-eval pads a process's last request with
    copies of itself, so that every process runs as many batches, and appends their responses to it."""
    keep = ("doc_id", "filter", "doc_hash", "prompt_hash", "target_hash", "filtered_resps")
    records = {}
    for task, task_samples in samples.items():
        repeats = configs.get(task, {}).get("repeats", 1)
        records[task] = [
            {
                **{key: record[key] for key in keep},
                "resps": [responses[:repeats] for responses in record["resps"]],
                "metrics": {metric: record[metric] for metric in record["metrics"]},
            }
            for record in task_samples
        ]
    return records


def split_requests_across_processes(lm) -> None:
    """Under `accelerate launch` / `torchrun`, give every process its share of lm-eval's requests.

    HFLM (lm-eval 0.4.13) turns data parallelism on only when it counts more than one CUDA device; on CPUs (and MPS)
    every process would evaluate every request, and only the first would report. This sets the rank and world size
    HFLM itself uses for its split and its gathering (`lm.rank`, `lm.world_size`, through its accelerator), on any
    device."""
    accelerator = getattr(lm, "accelerator", None)
    if accelerator is not None and accelerator.num_processes > 1 and lm.world_size == 1:
        lm._rank, lm._world_size = accelerator.process_index, accelerator.num_processes


def task_metrics(results: dict, lm_eval_name: str) -> dict[str, tuple[float, float | None]]:
    """{metric: (value, stderr)} for a task or group; metric names keep lm-eval's filter suffix only if not 'none'."""
    section = results.get("groups", {}).get(lm_eval_name) or results["results"][lm_eval_name]
    metrics = {}
    for key, value in section.items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        stderr = section.get(f"{metric}_stderr,{filter_name}")
        metrics[metric_name(metric, filter_name)] = (
            float(value),
            float(stderr) if isinstance(stderr, (int, float)) else None,
        )
    return metrics


def metric_name(metric: str, filter_name: str) -> str:
    """How the report names lm-eval's (metric, filter) pair."""
    return metric if filter_name == "none" else f"{metric} ({filter_name})"


def comparison_rows(
    tasks: list[BenchmarkTask], names: dict[str, str], attnres: dict, baseline: dict | None
) -> list[ComparisonRow]:
    rows = []
    for task in tasks:
        lm_eval_name = names[task.name]
        ours = task_metrics(attnres, lm_eval_name)
        theirs = task_metrics(baseline, lm_eval_name) if baseline is not None else {}
        samples = attnres.get("n-samples", {})
        count = sum(
            value.get("effective", 0)
            for name, value in samples.items()
            if name == lm_eval_name or name in _leaves(attnres, lm_eval_name)
        )
        leaves = _leaves(attnres, lm_eval_name) or [lm_eval_name]
        for metric, (value, stderr) in ours.items():
            base_value, base_stderr = theirs.get(metric, (None, None))
            row = ComparisonRow(task.name, metric, count or None, base_value, base_stderr, value, stderr)
            if baseline is not None and base_value is not None:
                row.paired = paired_row_statistics(leaves, metric, (attnres, value), (baseline, base_value))
            if baseline is not None:
                row.identical_answers = identical_answers(attnres["samples"], baseline["samples"], leaves, metric)
            rows.append(row)
    return rows


def paired_row_statistics(
    leaves: list[str], metric: str, attnres: tuple[dict, float], baseline: tuple[dict, float]
) -> PairedStatistics | None:
    """Paired statistics of one metric over the documents of `leaves` (a task, or all the subtasks of a group, whose
    documents are pooled), pairing each model's per-document scores by (subtask, document id).

    Only for a metric whose score is the mean of its per-document scores (for a group: the size-weighted mean, as
    lm-eval weighs MMLU and Minerva Math), checked for both models: for any other metric (a corpus-level score, an
    unweighted group) the mean per-document difference would not be the difference of the scores, and `None` says
    that no paired statistics apply."""
    per_document = [item_scores(results["samples"], leaves, metric) for results, _ in (attnres, baseline)]
    ours, theirs = per_document
    if not ours or ours.keys() != theirs.keys():
        return None
    for scores, (_, reported) in zip(per_document, (attnres, baseline)):
        if not math.isclose(sum(scores.values()) / len(scores), reported, rel_tol=1e-9, abs_tol=1e-9):
            return None
    keys = sorted(ours)
    return paired_statistics([theirs[key] for key in keys], [ours[key] for key in keys])


def item_scores(samples: dict[str, list[dict]], leaves: list[str], metric: str) -> dict[tuple[str, int], float]:
    """{(subtask, document id): score} of the report's `metric` (lm-eval's metric and filter) in `sample_records`'
    records; empty where a document's score is not a number (e.g. the inputs of a corpus-level metric)."""
    scores = {}
    for key, (_, value) in metric_records(samples, leaves, metric).items():
        if not isinstance(value, (int, float)):
            return {}
        scores[key] = float(value)
    return scores


def metric_records(
    samples: dict[str, list[dict]], leaves: list[str], metric: str
) -> dict[tuple[str, int], tuple[dict, object]]:
    """{(subtask, document id): (record, its value of `metric`)} for the `sample_records` records of `leaves` that
    score the report's `metric` (lm-eval's metric and filter): the documents of one row of the comparison."""
    found = {}
    for leaf in leaves:
        for record in samples.get(leaf, []):
            for name, value in record["metrics"].items():
                if metric_name(name, record["filter"]) == metric:
                    found[leaf, record["doc_id"]] = (record, value)
    return found


def identical_answers(
    attnres: dict[str, list[dict]], baseline: dict[str, list[dict]], leaves: list[str], metric: str
) -> tuple[int, int] | None:
    """(documents both models answered identically, documents) over the documents of one row (`metric_records`: the
    row's filter, a group's subtasks pooled), from each model's `sample_records`; a document only one model answered
    counts as different. `None` where a record's responses are not an answer `answer` knows (e.g. the rolling
    loglikelihoods of a perplexity task): no count rather than a wrong one."""
    per_model = []
    for samples in (attnres, baseline):
        answers = {key: answer(record) for key, (record, _) in metric_records(samples, leaves, metric).items()}
        if not answers or None in answers.values():
            return None
        per_model.append(answers)
    ours, theirs = per_model
    documents = ours.keys() | theirs.keys()
    return sum(key in ours and key in theirs and ours[key] == theirs[key] for key in documents), len(documents)


def answer(record: dict) -> tuple | None:
    """What a model answered in one `sample_records` record (its raw `resps`: one list per request, of the task's
    `repeats` responses each), as a value that two models' answers compare by equality:

    - generated text (`generate_until`): the texts, exactly, of every request and repeat;
    - several loglikelihoods (`multiple_choice`: one [loglikelihood, is_greedy] request per choice): the pick, the
      index of the choice the model scores highest (per repeat; the first on a tie), which `acc` scores. The
      loglikelihoods themselves are not compared: two computations of the same function (a graft and its source, in
      fp32) differ in their rounding;
    - a single loglikelihood (`loglikelihood`, e.g. LAMBADA): whether the continuation is the model's greedy one
      (is_greedy, per repeat), which `acc` scores; the value itself differs in rounding as above;
    - anything else, a rolling loglikelihood (`loglikelihood_rolling`: a perplexity, a number rather than an answer)
      or a shape this does not know: `None`."""
    requests = record["resps"]
    responses = [response for request in requests for response in request]
    if not responses:
        return None
    if all(isinstance(response, str) for response in responses):
        return tuple(tuple(request) for request in requests)
    if not all(map(_is_loglikelihood, responses)) or len({len(request) for request in requests}) != 1:
        return None
    if len(requests) == 1:
        return tuple(greedy for _, greedy in requests[0])
    choices = range(len(requests))
    return tuple(max(choices, key=lambda c: requests[c][repeat][0]) for repeat in range(len(requests[0])))


def _is_loglikelihood(response) -> bool:
    """lm-eval's loglikelihood response: (loglikelihood, is_greedy); a list once written as JSON."""
    return (
        isinstance(response, (list, tuple))
        and len(response) == 2
        and isinstance(response[0], (int, float))
        and not isinstance(response[0], bool)
        and isinstance(response[1], bool)
    )


def _leaves(results: dict, group: str) -> list[str]:
    return results.get("group_subtasks", {}).get(group, [])


def format_table(rows: list[ComparisonRow], baseline_label: str | None, attnres_label: str) -> str:
    def number(value: float | None, stderr: float | None = None) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None and not math.isnan(stderr) else "")

    if baseline_label is None:
        lines = [f"| task | metric | n | {attnres_label} |", "|---|---|---:|---:|"]
        lines += [
            f"| {r.task} | {r.metric} | {r.samples or '–'} | {number(r.attnres, r.attnres_stderr)} |" for r in rows
        ]
        return "\n".join(lines)
    lines = [
        f"| task | metric | n | baseline: {baseline_label} | AttnRes: {attnres_label} | delta "
        f"| delta, {CONFIDENCE:.0%} CI (paired) | lost / gained | McNemar p | identical answers |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = "–" if r.delta is None else f"{r.delta:+.4f}"
        identical = "–" if r.identical_answers is None else "{}/{}".format(*r.identical_answers)
        lines.append(
            f"| {r.task} | {r.metric} | {r.samples or '–'} | {number(r.baseline, r.baseline_stderr)} "
            f"| {number(r.attnres, r.attnres_stderr)} | {delta} | {paired_cells(r.paired)} | {identical} |"
        )
    return "\n".join(lines)


def paired_cells(paired: PairedStatistics | None) -> str:
    """The table's paired columns: the interval, the flips each way and McNemar's p ("–" where they do not apply)."""
    if paired is None:
        return "– | – | –"
    interval = f"[{paired.ci_low:+.4f}, {paired.ci_high:+.4f}]"
    if paired.mcnemar_p is None:
        return f"{interval} | – | –"
    return f"{interval} | {paired.right_to_wrong} / {paired.wrong_to_right} | {paired.mcnemar_p:.3g}"


def statistics_notes(rows: list[ComparisonRow]) -> list[str]:
    """How to read the paired columns and the identical answers, for results.md and the model card."""
    notes = []
    if any(r.paired is not None for r in rows):
        notes += [
            f"- delta, {CONFIDENCE:.0%} CI: percentile interval of the mean per-document difference (AttnRes - "
            f"baseline), paired bootstrap over the documents both models answered ({BOOTSTRAP_RESAMPLES:,} resamples, "
            f"seed {BOOTSTRAP_SEED}; a group's documents pooled, as its size-weighted score pools them).",
            "- lost / gained: documents the baseline got right and AttnRes wrong / the reverse (right/wrong metrics); "
            "McNemar p: exact two-sided binomial test on those discordant documents.",
        ]
    if any(r.identical_answers is not None for r in rows):
        notes.append(
            "- identical answers: the row's documents to which both models gave the same answer: the same generated "
            "text or, for a multiple-choice question, the same pick (the choice of highest loglikelihood; the "
            "loglikelihoods themselves differ in rounding between two computations of the same function)."
        )
    return notes


def plot_comparison(rows: list[ComparisonRow], path: Path, title: str) -> None:
    """Bar chart of each task's primary-metric scores (baseline vs AttnRes) with stderr error bars and, beside it, the
    paired difference of each with its confidence interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = [r for r in rows if is_primary_metric(r.task, r.metric)] or rows
    paired = [r for r in primary if r.paired is not None]
    figure, axes = plt.subplots(
        1,
        2 if paired else 1,
        figsize=(1.8 + 1.6 * len(primary) + (1.0 + 0.6 * len(paired) if paired else 0), 3.6),
        width_ratios=[1.6 * len(primary) + 1.8, 0.6 * len(paired) + 1.0] if paired else None,
        layout="constrained",
        squeeze=False,
    )
    plot_scores(axes[0][0], primary, title)
    if paired:
        plot_paired_differences(axes[0][1], paired)
    # The plotted numbers travel in the PNG's metadata, so that a reader (or a test) can check the picture.
    plotted = [
        {"task": r.task, "metric": r.metric, "baseline": r.baseline, "attnres": r.attnres, "delta": r.delta}
        | ({"ci_low": r.paired.ci_low, "ci_high": r.paired.ci_high} if r.paired is not None else {})
        for r in primary
    ]
    figure.savefig(path, dpi=150, metadata={"Description": json.dumps(plotted)})
    plt.close(figure)


def plot_scores(axis, rows: list[ComparisonRow], title: str) -> None:
    labels = [f"{r.task}\n{r.metric}" for r in rows]
    positions = range(len(rows))
    width = 0.38
    if any(r.baseline is not None for r in rows):
        axis.bar(
            [p - width / 2 for p in positions],
            [r.baseline or 0.0 for r in rows],
            width,
            yerr=[r.baseline_stderr or 0.0 for r in rows],
            label="baseline",
            color="#9aa5b1",
            capsize=3,
        )
    bars = axis.bar(
        [p + width / 2 for p in positions],
        [r.attnres for r in rows],
        width,
        yerr=[r.attnres_stderr or 0.0 for r in rows],
        label="AttnRes",
        color="#d9480f",
        capsize=3,
    )
    for bar, row in zip(bars, rows):
        if row.delta is not None:
            axis.annotate(
                f"{row.delta:+.3f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 6),
                textcoords="offset points",
            )
    axis.set_xticks(list(positions), labels, fontsize=8)
    axis.set_ylabel("score (± lm-eval stderr)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)


def plot_paired_differences(axis, rows: list[ComparisonRow]) -> None:
    """Each difference AttnRes - baseline with its paired bootstrap interval: the interval, not the two bars' error
    bars, says whether the models differ."""
    positions = range(len(rows))
    differences = [r.paired.mean_difference for r in rows]
    below = [d - r.paired.ci_low for d, r in zip(differences, rows)]
    above = [r.paired.ci_high - d for d, r in zip(differences, rows)]
    axis.axhline(0.0, color="#555555", linewidth=0.8)
    axis.errorbar(positions, differences, yerr=[below, above], fmt="o", color="#d9480f", capsize=4)
    axis.set_xticks(list(positions), [r.task for r in rows], fontsize=8, rotation=30, ha="right")
    axis.set_xlim(-0.6, len(rows) - 0.4)
    axis.set_ylabel(f"AttnRes - baseline ({CONFIDENCE:.0%} paired CI)", fontsize=8)
    axis.set_title("paired difference", fontsize=9)


def settings_summary(tasks: list[BenchmarkTask], num_fewshot: dict[str, int], results: dict, prepared) -> list[str]:
    """What exactly ran: lm-eval task versions, shots and metrics, so a reader can reproduce the numbers."""
    import importlib.metadata

    versions = results.get("versions", {})
    lines = [f"- lm-evaluation-harness {importlib.metadata.version('lm-eval')}"]
    for task in tasks:
        name = prepared.names[task.name]
        shots = num_fewshot[task.name]
        how = task.shots_note if shots == task.num_fewshot else f"{shots}-shot (set with --num-fewshot)"
        source = " with attnres' local pass@k (no `code_eval`)" if task.runs_code else ""
        lines.append(f"- **{task.name}**: lm-eval task `{name}` version {versions.get(name, '?')}{source}; {how}")
    return lines + [f"- {note}" for note in prepared.notes]


def run_eval(
    *,
    model: str,
    baseline: str | None,
    tasks: list[BenchmarkTask],
    num_fewshot: dict[str, int],
    output: Path,
    data_dir: Path | None = None,
    limit: int | None = None,
    batch_size: str = "1",
    device: str | None = None,
    dtype: str = "auto",
    max_gen_toks: int | None = None,
    cache_dir: Path | None = None,
    allow_code_execution: bool = False,
    use_kernels: bool = False,
    trust_remote_code: bool = False,
    force: bool = False,
    update_model_card: bool = False,
    command: str = "",
) -> dict | None:
    """Evaluate `model` (and `baseline`) and write the report into `output`; returns the report, or `None` on the
    processes of a distributed run other than the first (which writes it)."""
    from .code_execution import OPT_IN_VARIABLE, REFUSAL

    check_positive(limit, "--limit", "documents per subtask")
    check_positive(max_gen_toks, "--max-gen-toks", "tokens")
    check_device(device)
    check_batch_size(batch_size)
    check_cache_dir(cache_dir)
    if any(task.runs_code for task in tasks) and not allow_code_execution:
        raise AttnResError(REFUSAL)
    check_requirements(tasks)
    loading = loading_options(use_kernels=use_kernels, trust_remote_code=trust_remote_code)
    models = {"attnres": resolve_model(model, "--model", trust_remote_code)}
    if baseline:
        models = {"baseline": resolve_model(baseline, "--baseline", trust_remote_code), **models}
    output = output.expanduser()
    check_replaceable(output.absolute(), force=force, flag="--output")
    card_path = Path(models["attnres"]) / "README.md"
    card_text = card_path.read_text() if card_path.is_file() else None
    if update_model_card and (card_text is None or RESULTS_START not in card_text):
        raise AttnResError(f"--update-model-card: {card_path} is missing or has no results section ({RESULTS_START})")
    opt_in_before = os.environ.get(OPT_IN_VARIABLE)
    if allow_code_execution:
        os.environ[OPT_IN_VARIABLE] = "1"  # the opt-in that code_eval and attnres.code_execution check
    try:
        with tempfile.TemporaryDirectory(prefix="attnres-lm-eval-tasks-") as task_dir:
            prepared = write_task_configs(tasks, Path(task_dir), num_fewshot=num_fewshot, data_dir=data_dir)
            settings = dict(limit=limit, batch_size=batch_size, device=device, dtype=dtype, max_gen_toks=max_gen_toks,
                            cache_dir=cache_dir, allow_code_execution=allow_code_execution,
                            loading=loading)  # fmt: skip
            outputs = {
                label: evaluate_model(name, prepared, label=label, **settings) for label, name in models.items()
            }
    finally:
        if opt_in_before is None:
            os.environ.pop(OPT_IN_VARIABLE, None)
        else:
            os.environ[OPT_IN_VARIABLE] = opt_in_before
    if any(results is None for results in outputs.values()):  # not the first process of a distributed run
        return None
    rows = comparison_rows(tasks, prepared.names, outputs["attnres"], outputs.get("baseline"))
    report = {
        "command": command,
        "models": models,
        "tasks": {task.name: prepared.names[task.name] for task in tasks},
        "num_fewshot": num_fewshot,
        "limit": limit,
        "notes": prepared.notes,
        "comparison": [row.to_dict() for row in rows],
        "lm_eval": {label: {k: v for k, v in results.items() if k != "samples"} for label, results in outputs.items()},
    }
    with staged_directory(output, force=force, flag="--output") as staging:
        report["table"] = write_report(staging, report, rows, tasks, prepared, outputs, card_text)
    if update_model_card:
        replacement = card_path.with_name(f".{card_path.name}.attnres-tmp")
        shutil.copyfile(output / "model_card.md", replacement)
        os.replace(replacement, card_path)
    return report


def write_report(
    directory: Path,
    report: dict,
    rows: list[ComparisonRow],
    tasks: list[BenchmarkTask],
    prepared: PreparedTasks,
    outputs: dict[str, dict],
    card_text: str | None,
) -> str:
    """results.json, results.md, samples-<model>.jsonl, comparison.png and, for a checkpoint made by `attnres convert`,
    model_card.md; returns the markdown table."""
    labels = {label: Path(name).name for label, name in report["models"].items()}
    table = format_table(rows, labels.get("baseline"), labels["attnres"])
    settings = settings_summary(tasks, report["num_fewshot"], outputs["attnres"], prepared)
    notes = statistics_notes(rows)
    limit = report["limit"]
    markdown = "\n".join(
        [
            f"# attnres eval: {labels['attnres']}" + (f" vs {labels['baseline']}" if "baseline" in labels else ""),
            "",
            table,
            "",
            "Settings:",
            *settings,
            *([f"- limit: first {limit} documents per subtask (not a full-benchmark score)"] if limit else []),
            "- ± is lm-eval's standard error of each score; the two models answer the same questions.",
            *notes,
            "",
            f"Command: `{report['command']}`" if report["command"] else "",
        ]
    )
    (directory / "results.json").write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    (directory / "results.md").write_text(markdown.rstrip() + "\n")
    for label, results in outputs.items():  # per-document responses and scores, one JSON line per document
        lines = [
            json.dumps({"task": task, **record}) for task, records in results["samples"].items() for record in records
        ]
        (directory / f"samples-{label}.jsonl").write_text("".join(line + "\n" for line in lines))
    plot_comparison(rows, directory / "comparison.png", f"{labels['attnres']} vs {labels.get('baseline', '—')}")
    if card_text is not None and RESULTS_START in card_text:  # an AttnRes card made by `attnres convert`
        card = fill_results(card_text, rows, table, settings + notes, labels["attnres"])
        (directory / "model_card.md").write_text(card)
    return table


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)
