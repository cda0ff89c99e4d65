"""`attnres eval`: the four tasks end to end through lm-eval on tiny local models and fixture data, the local pass@k
and its sandbox, the comparison report, and bad input."""

import json
import re
import sqlite3

import pytest
from PIL import Image

from attnres.cli import main
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
    assert (
        main(eval_args(workspace, output, "--tasks", ALL_TASKS, "--allow-code-execution", "--update-model-card")) == 0
    )
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
    table_rows = [
        line
        for line in (report / "results.md").read_text().splitlines()
        if re.match(r"\| \w+ \| [a-z@]", line) and not line.startswith("| task")
    ]
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
