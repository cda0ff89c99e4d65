"""`attnres eval`: the six tasks end to end through lm-eval on tiny local models and fixture data, the comparison
report with its paired statistics, and bad input."""

import contextlib
import copy
import io
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import attnres
from attnres.cli import main
from tests.conftest import recorded_model_loads
from tests.eval_fixtures import write_benchmark_data, write_model_pair


ALL_TASKS = "mmlu,gpqa_diamond,humaneval,minerva_math,gsm8k,mbpp"


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
    """The report directory; what `attnres eval` printed is kept beside it, in printed.txt."""
    root = workspace[0]
    output = root / "report"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), recorded_model_loads() as loads:
        assert (
            main(eval_args(workspace, output, "--tasks", ALL_TASKS, "--allow-code-execution", "--update-model-card"))
            == 0
        )
    (root / "printed.txt").write_text(printed.getvalue())
    (root / "model-loads.json").write_text(json.dumps(loads))
    return output


def test_both_models_load_without_hub_kernels(report):
    """transformers 5.25 loads with Hub kernels unless told otherwise; `attnres eval` tells it, for both models."""
    loads = json.loads((report.parent / "model-loads.json").read_text())
    assert loads == [{"use_kernels": False, "kernelized": False}] * 2


def test_all_six_tasks_produce_lm_eval_metrics(report):
    results = json.loads((report / "results.json").read_text())
    metrics = {(row["task"], row["metric"]) for row in results["comparison"]}
    assert metrics == {
        ("mmlu", "acc"),
        ("gpqa_diamond", "acc"),
        ("gpqa_diamond", "acc_norm"),
        ("humaneval", "pass@1 (create_test)"),
        ("minerva_math", "exact_match"),
        ("minerva_math", "math_verify"),
        ("gsm8k", "exact_match (strict-match)"),
        ("gsm8k", "exact_match (flexible-extract)"),
        ("mbpp", "pass@1"),
    }
    samples = {row["task"]: row["samples"] for row in results["comparison"]}
    assert samples == {"mmlu": 6, "gpqa_diamond": 3, "humaneval": 2, "minerva_math": 3, "gsm8k": 3, "mbpp": 3}
    lm_eval = results["lm_eval"]["attnres"]
    assert lm_eval["n-shot"]["mmlu_anatomy"] == 5 and lm_eval["n-shot"]["minerva_math_algebra"] == 4
    assert lm_eval["n-shot"]["gsm8k_cot"] == 8 and lm_eval["n-shot"]["mbpp"] == 3
    assert set(lm_eval["group_subtasks"]["mmlu"]) == {"mmlu_anatomy", "mmlu_astronomy"}


def test_graft_scores_exactly_like_its_source_at_step_zero(report):
    """The grafted model computes its source's function, so every score (loglikelihood ranks, greedy text) agrees,
    document by document: the paired interval is [0, 0], no document flips either way, and every document got the
    same answer (generated text, or multiple-choice pick) from both."""
    rows = json.loads((report / "results.json").read_text())["comparison"]
    for row in rows:
        assert row["delta"] == 0.0, row
        assert row["identical_answers"] == [row["samples"], row["samples"]], row
        assert row["paired"] == {
            "items": row["samples"],
            "mean_difference": 0.0,
            "ci_low": 0.0,
            "ci_high": 0.0,
            "right_to_wrong": 0,
            "wrong_to_right": 0,
            "mcnemar_p": 1.0,
        }, row


def test_graft_generates_the_same_continuations_as_its_source(report):
    """lm-eval's HFLM generation path (`generate` with the KV cache) for HumanEval, Minerva Math, GSM8K and MBPP: the
    zero-query graft must produce its source's continuations token for token, not merely the same (here, zero)
    scores."""
    records = {}
    for label in ("baseline", "attnres"):
        lines = (report / f"samples-{label}.jsonl").read_text().splitlines()
        records[label] = {(r["task"], r["doc_id"], r["filter"]): r for r in map(json.loads, lines)}
    assert records["baseline"].keys() == records["attnres"].keys()
    generating = ("humaneval", "minerva_math_algebra", "gsm8k_cot", "mbpp")
    generated = [key for key in records["baseline"] if key[0] in generating]
    assert {key[0] for key in generated} == set(generating)
    assert len(generated) == 2 + 3 + 3 * 2 + 3  # gsm8k_cot: one record per filter (strict-match, flexible-extract)
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
        paired = row["paired"]
        low, high = (float(bound) for bound in cells[6].strip("[]").split(", "))
        assert (low, high) == (pytest.approx(paired["ci_low"], abs=5e-5), pytest.approx(paired["ci_high"], abs=5e-5))
        assert cells[7] == f"{paired['right_to_wrong']} / {paired['wrong_to_right']}"
        assert float(cells[8]) == pytest.approx(paired["mcnemar_p"], rel=1e-3)
        assert cells[9] == "{}/{}".format(*row["identical_answers"]) == f"{row['samples']}/{row['samples']}"
    image = Image.open(report / "comparison.png")
    assert image.size[0] > 300 and image.size[1] > 300
    plotted = json.loads(image.info["Description"])
    by_key = {(row["task"], row["metric"]): row for row in results["comparison"]}
    assert [(p["task"], p["metric"]) for p in plotted] == [
        ("mmlu", "acc"),
        ("gpqa_diamond", "acc"),
        ("humaneval", "pass@1 (create_test)"),
        ("minerva_math", "exact_match"),
        ("gsm8k", "exact_match (strict-match)"),
        ("mbpp", "pass@1"),
    ]
    for point in plotted:
        row = by_key[point["task"], point["metric"]]
        assert (point["baseline"], point["attnres"], point["delta"]) == (row["baseline"], row["attnres"], row["delta"])
        assert (point["ci_low"], point["ci_high"]) == (row["paired"]["ci_low"], row["paired"]["ci_high"])
    markdown = (report / "results.md").read_text()
    assert "lm-eval task `gpqa_diamond_zeroshot` version 2.2" in markdown and "1 of 7 subsets" in markdown
    assert "lm-eval task `gsm8k_cot` version 3.0" in markdown and "paired bootstrap" in markdown
    assert "- identical answers: the row's documents to which both models gave the same answer" in markdown


def test_printed_table_is_the_reports_table(report):
    printed = (report.parent / "printed.txt").read_text()
    table = [line for line in (report / "results.md").read_text().splitlines() if line.startswith("|")]
    assert table[0].endswith("| McNemar p | identical answers |") and len(table) == 2 + 9
    assert "\n".join(table) in printed
    assert "| mmlu | acc | 6 |" in printed and "| 1 | 6/6 |" in printed


def test_model_card_results_and_model_index(report, workspace):
    from huggingface_hub import ModelCard

    card = ModelCard.load(workspace[2] / "README.md")
    assert (report / "model_card.md").read_text() == (workspace[2] / "README.md").read_text()
    assert "| humaneval | pass@1 (create_test) |" in card.text
    assert "- mmlu acc: AttnRes - baseline = +0.0000, 95% CI [+0.0000, +0.0000] over 6 paired documents; 0 lost, " \
        "0 gained (McNemar p = 1); identical answers on 6 of 6 documents" in card.text  # fmt: skip
    assert "identical answers |" in card.text and "| 1 | 2/2 |" in card.text  # the table's column (HumanEval)
    results = {(r.dataset_name, r.metric_name): (r.metric_type, r.metric_value) for r in card.data.eval_results}
    expected = json.loads((report / "results.json").read_text())["comparison"]
    assert results == {
        (row["task"], row["metric"]): (row["metric"].split(" (")[0], round(row["attnres"], 4)) for row in expected
    }


def report_outputs(report: Path) -> tuple[dict, dict[str, dict]]:
    """results.json, and each model's lm-eval results as `comparison_rows` takes them, from the report's files."""
    results = json.loads((report / "results.json").read_text())
    outputs = {}
    for label in ("baseline", "attnres"):
        samples = {}
        for line in (report / f"samples-{label}.jsonl").read_text().splitlines():
            record = json.loads(line)
            samples.setdefault(record.pop("task"), []).append(record)
        outputs[label] = {**results["lm_eval"][label], "samples": samples}
    return results, outputs


def test_identical_answers_count_differing_texts_and_picks(report):
    """The real run's records, with the graft's answers changed: one HumanEval continuation, one GSM8K continuation
    (both of its filters' records), one MMLU pick, and one MBPP document missing. Every MMLU loglikelihood is also
    shifted, as rounding shifts them, which changes no pick and so no count."""
    from attnres.eval_tasks import SUITE
    from attnres.evaluation import comparison_rows, format_table, statistics_notes
    from attnres.model_card import paired_summary

    results, outputs = report_outputs(report)
    tasks = [SUITE[name] for name in results["tasks"]]
    unchanged = comparison_rows(tasks, results["tasks"], outputs["attnres"], outputs["baseline"])
    assert [[*row.identical_answers] for row in unchanged] == [r["identical_answers"] for r in results["comparison"]]

    attnres = copy.deepcopy(outputs["attnres"])
    samples = attnres["samples"]
    samples["humaneval"][0]["resps"][0][0] += "\n    return None"
    for record in samples["gsm8k_cot"]:
        if record["doc_id"] == 1:
            record["resps"][0][0] += " 7"
    for record in samples["mmlu_anatomy"] + samples["mmlu_astronomy"]:
        for choice in record["resps"]:
            choice[0][0] += 2e-6
    changed = samples["mmlu_astronomy"][2]["resps"]
    scores = [choice[0][0] for choice in changed]
    changed[(scores.index(max(scores)) + 1) % len(scores)][0][0] = max(scores) + 0.5  # another choice is picked
    samples["mbpp"].pop()

    rows = comparison_rows(tasks, results["tasks"], attnres, outputs["baseline"])
    assert {(row.task, row.metric): row.identical_answers for row in rows} == {
        ("mmlu", "acc"): (5, 6),
        ("gpqa_diamond", "acc"): (3, 3),
        ("gpqa_diamond", "acc_norm"): (3, 3),
        ("humaneval", "pass@1 (create_test)"): (1, 2),
        ("minerva_math", "exact_match"): (3, 3),
        ("minerva_math", "math_verify"): (3, 3),
        ("gsm8k", "exact_match (strict-match)"): (2, 3),
        ("gsm8k", "exact_match (flexible-extract)"): (2, 3),
        ("mbpp", "pass@1"): (2, 3),
    }
    table = format_table(rows, "tiny-llama", "tiny-llama-attnres").splitlines()
    assert next(line for line in table if line.startswith("| mmlu | acc |")).endswith("| 5/6 |")
    assert next(line for line in table if line.startswith("| humaneval |")).endswith("| 1/2 |")
    assert any(note.startswith("- identical answers:") for note in statistics_notes(rows))
    assert any(line.endswith("; identical answers on 5 of 6 documents") for line in paired_summary(rows))
    single = format_table(rows, None, "tiny-llama-attnres").splitlines()  # one model: nothing to compare
    assert single[0] == "| task | metric | n | tiny-llama-attnres |" and "/" not in "".join(single[2:])


def test_answer_is_the_generated_text_the_pick_or_the_greedy_flag(report):
    from attnres.evaluation import answer, identical_answers

    samples = report_outputs(report)[1]["attnres"]["samples"]
    generated = samples["humaneval"][0]
    assert answer(generated) == (tuple(generated["resps"][0]),) and generated["resps"][0][0].strip()
    question = samples["mmlu_anatomy"][0]  # one [loglikelihood, is_greedy] request per choice
    scores = [choice[0][0] for choice in question["resps"]]
    assert len(scores) == 4 and answer(question) == (scores.index(max(scores)),)
    assert answer({"resps": [[[-1.0, False]], [[-0.5, False]], [[-0.5, True]]]}) == (1,)  # a tie: the first
    assert answer({"resps": [[[-2.5, True]]]}) == (True,)  # a single loglikelihood: whether it is the greedy one
    assert answer({"resps": [[[-2.5, False], [-2.4, True]]]}) == (False, True)  # per repeat
    assert answer({"resps": [[-42.0]]}) is None  # loglikelihood_rolling: a perplexity, not an answer
    assert answer({"resps": [[{"text": "?"}]]}) is None and answer({"resps": []}) is None
    rolling = {"wikitext": [{"doc_id": 0, "filter": "none", "resps": [[-42.0]], "metrics": {"word_perplexity": 42.0}}]}
    assert identical_answers(rolling, rolling, ["wikitext"], "word_perplexity") is None  # no count, not 1/1


def test_responses_are_cached_for_resuming(report, workspace):
    databases = list((workspace[0] / "cache").glob("*.db"))
    assert {path.name.split("-")[0] for path in databases} == {"baseline", "attnres"}
    for database in databases:
        with sqlite3.connect(database) as connection:
            tables = [name for (name,) in connection.execute("select name from sqlite_master where type='table'")]
            assert sum(connection.execute(f"select count(*) from {t}").fetchone()[0] for t in tables) > 0


def test_cached_responses_are_not_reused_for_changed_weights_or_code(workspace, tmp_path):
    """The response cache is keyed by the model's fingerprint: new weights or new remote code (a re-graft with a
    fixed `modeling_attnres.py` keeps every weight) must not be answered from the old model's responses."""
    from attnres.evaluation import model_fingerprint

    directory = Path(shutil.copytree(workspace[2], tmp_path / "attnres"))
    model = str(directory)
    fingerprint = model_fingerprint(model, "float32")
    assert model_fingerprint(model, "float32") == fingerprint
    assert model_fingerprint(model, "bfloat16") != fingerprint
    code = directory / "modeling_attnres.py"
    original = code.read_text()
    code.write_text(original + "\n# changed\n")
    assert model_fingerprint(model, "float32") != fingerprint
    code.write_text(original)
    assert model_fingerprint(model, "float32") == fingerprint
    weights = next(directory.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert model_fingerprint(model, "float32") != fingerprint


def test_mbpp_is_lm_evals_config_with_the_local_metric():
    """attnres_mbpp.yaml keeps lm-eval's prompt, target, shots, exemplars and generation settings; only the metric
    (local pass@k instead of `code_eval` from the Hub) and where the exemplars are written differ."""
    import ast

    import lm_eval
    import yaml

    from attnres.eval_tasks import SUITE, _ConfigLoader, package_task_config

    lm_eval_mbpp = Path(lm_eval.__file__).parent / "tasks" / "mbpp"
    theirs = yaml.load((lm_eval_mbpp / "mbpp.yaml").read_text(), Loader=_ConfigLoader)
    ours = package_task_config(SUITE["mbpp"])
    assert {key for key in theirs if ours.get(key) != theirs[key]} == {"metric_list", "fewshot_config"}
    utils = ast.parse((lm_eval_mbpp / "utils.py").read_text())
    samples = next(node for node in utils.body if getattr(node, "name", None) == "list_fewshot_samples")
    assert ours["fewshot_config"] == {"sampler": "first_n", "samples": ast.literal_eval(samples.body[0].value)}
    assert ours["metric_list"] == [
        {"metric": "code_eval_metric.pass_at_k", "aggregation": "mean", "higher_is_better": True, "k": [1]}
    ]


# ---------------------------------------------------------------------------------------------------- pass@k, sandbox


def test_cli_refuses_humaneval_without_opt_in(workspace, tmp_path, capsys):
    assert main(eval_args(workspace, tmp_path / "out", "--tasks", "humaneval")) == 1
    assert "--allow-code-execution" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------- bad input


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
MMLU_ROW_WITHOUT_CHOICES = json.dumps({"question": "q?", "subject": "anatomy", "answer": 0}) + "\n"


@pytest.mark.parametrize(
    "change, bad_files, message",
    [
        (["--tasks", "mmlu,hellaswag"], {}, "unknown task(s) hellaswag"),
        (["--tasks", "mmlu", "--model", "/no/such/model"], {}, "does not exist"),
        (["--tasks", "gpqa_diamond", "--data-dir", "{root}/empty"], {}, "gpqa_diamond_zeroshot: no train split in"),
        (["--tasks", "mmlu", "--data-dir", "{root}/empty"], {}, "mmlu: no data under"),
        (["--tasks", "mbpp", "--data-dir", "{root}/empty", "--allow-code-execution"], {}, "mbpp: no test split in"),
        (["--tasks", "mmlu", "--num-fewshot", "gpqa_diamond=1"], {}, "not among --tasks"),
        (["--tasks", "mmlu", "--output", "{root}/data"], {}, "exists and is not empty"),
        # Each of these was a traceback from inside datasets, lm-eval or torch, or a silent run (--num-fewshot -3):
        (["--tasks", "mmlu"], {"mmlu/anatomy/test.jsonl": ""}, "anatomy/test.jsonl is empty; expected cais/mmlu rows"),
        (["--tasks", "mmlu"], {"mmlu/anatomy/test.jsonl": "no json here\n"}, "test.jsonl: line 1 is not JSON"),
        (["--tasks", "mmlu"], {"mmlu/astronomy/dev.jsonl": "[1, 2]\n"}, "dev.jsonl: line 1 is not a JSON object"),
        (["--tasks", "mmlu"], {"mmlu/anatomy/test.jsonl": MMLU_ROW_WITHOUT_CHOICES}, "line 1 has no 'choices'"),
        (["--tasks", "gsm8k"], {"gsm8k/test.jsonl": '{"question": "1 + 1?"}\n'}, "line 1 has no 'answer'"),
        (["--tasks", "mmlu", "--num-fewshot", "-3"], {}, "--num-fewshot -3: the number of examples must not be neg"),
        pytest.param(["--tasks", "mmlu", "--device", "cuda"], {}, "this machine has no CUDA device", marks=NO_GPU),
        (["--tasks", "mmlu", "--device", "gpu7"], {}, "--device 'gpu7' is not a torch device"),
        (["--tasks", "mmlu", "--limit", "0"], {}, "--limit 0: must be a positive number of documents"),
        (["--tasks", "mmlu", "--max-gen-toks", "-1"], {}, "--max-gen-toks -1: must be a positive number of tokens"),
        (["--tasks", "mmlu", "--data-dir", "{root}/data/gsm8k/test.jsonl"], {}, "gsm8k/test.jsonl is not a directory"),
        # lm-eval's own failures, after the model had loaded; a Hub id offline failed inside transformers:
        (["--tasks", "mmlu", "--batch-size", "abc"], {}, "--batch-size 'abc': must be a positive integer, 'auto' or"),
        (["--tasks", "mmlu", "--batch-size", "0"], {}, "--batch-size '0': must be a positive integer"),
        (
            ["--tasks", "mmlu", "--cache-dir", "{root}/data/gsm8k/test.jsonl"],
            {},
            "--cache-dir {root}/data/gsm8k/test.jsonl is not a directory; choose another --cache-dir, or pass --no-",
        ),
        (
            ["--tasks", "mmlu", "--cache-dir", "{root}/data/gsm8k/test.jsonl/cache"],
            {},
            "--cache-dir {root}/data/gsm8k/test.jsonl/cache: {root}/data/gsm8k/test.jsonl is not a directory",
        ),
        (
            ["--tasks", "mmlu", "--model", "some-org/not-there"],
            {},
            "--model 'some-org/not-there' is not a local path and could not be downloaded from the Hub",
        ),
        (
            ["--tasks", "mmlu", "--baseline", "{root}/no-tokenizer"],
            {},
            "--baseline '{root}/no-tokenizer' has no tokenizer files",
        ),
    ],
)
def test_bad_input_is_one_clear_line(workspace, tmp_path, capsys, change, bad_files, message):
    """Exit code 1, one line that names the problem, and nothing written: checked before any model loads."""
    root = workspace[0]
    (root / "empty" / "gpqa_diamond").mkdir(parents=True, exist_ok=True)
    if not (root / "no-tokenizer").exists():
        shutil.copytree(workspace[1], root / "no-tokenizer", ignore=shutil.ignore_patterns("tokenizer*"))
    args = eval_args(workspace, tmp_path / "out") + [item.format(root=root) for item in change]
    if bad_files:  # a copy of the fixture data with some files replaced
        shutil.copytree(workspace[3], tmp_path / "data")
        for name, text in bad_files.items():
            (tmp_path / "data" / name).write_text(text)
        args += ["--data-dir", str(tmp_path / "data")]
    assert main(args) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("attnres: error:") and message.format(root=root) in error and "\n" not in error, error
    assert sorted(path.name for path in tmp_path.iterdir()) == (["data"] if bad_files else [])


def run_as_without_root_powers(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run `command` as this user; as root, without the capabilities that let root write where permissions forbid it
    (`setpriv` drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), so that a read-only directory is one for it too."""
    if os.geteuid() == 0:
        probe = ["setpriv", "--bounding-set=-dac_override", "true"]
        if shutil.which("setpriv") is None or subprocess.run(probe).returncode:
            pytest.skip("running as root, which writes into read-only directories, and setpriv cannot drop that power")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def test_read_only_cache_dir_is_one_clear_line(workspace, tmp_path):
    """lm-eval failed on a --cache-dir it cannot write only after loading the model, with a traceback. Really
    read-only: the command runs in a process that cannot write there (see `run_as_without_root_powers`)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    command = [sys.executable, "-m", "attnres", *eval_args(workspace, tmp_path / "out", "--tasks", "mmlu")]
    env = {**os.environ, "PYTHONPATH": str(Path(attnres.__file__).parents[1])}  # this attnres, in the child too
    result = run_as_without_root_powers([*command, "--cache-dir", str(cache)], env=env, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"attnres: error: --cache-dir {cache}: cannot write in {cache} (Permission denied); choose another "
        "--cache-dir, or pass --no-cache to run without one\n"
    )
    assert list(cache.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_a_corrupt_response_cache_is_set_aside_and_rebuilt(workspace, tmp_path, caplog):
    """A cache file that is not a SQLite database failed every later run (sqlite3.DatabaseError inside lm-eval):
    it is moved aside with a one-line warning, and the run answers afresh and caches its answers anew."""
    from attnres.evaluation import model_fingerprint

    root, _, attnres_model, data = workspace
    cache = tmp_path / "cache"
    cache.mkdir()
    database = cache / f"attnres-{model_fingerprint(str(attnres_model), 'float32')}_rank0.db"
    garbage = b"not a database, " * 256
    database.write_bytes(garbage)
    args = ["eval", "--model", str(attnres_model), "--data-dir", str(data), "--tasks", "mmlu", "--limit", "1",
            "--output", str(tmp_path / "out"), "--cache-dir", str(cache), "--dtype", "float32"]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="attnres.evaluation"), contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
    (set_aside,) = cache.glob(f"{database.name}.corrupt-*")
    assert set_aside.read_bytes() == garbage
    (warning,) = [record.getMessage() for record in caplog.records if record.name == "attnres.evaluation"]
    assert "\n" not in warning and f"{database} cannot be used (file is not a database); moved it to " in warning
    with contextlib.closing(sqlite3.connect(database)) as connection:  # the new cache holds this run's answers
        assert connection.execute("select count(*) from unnamed").fetchone()[0] == 8  # 2 subjects x 1 doc x 4 choices
    assert (tmp_path / "out" / "results.json").is_file()


def sqlite_file(path: Path, rows: int = 500) -> Path:
    """A SQLite database as sqlitedict writes it, large enough to have interior pages."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("create table unnamed (key text primary key, value blob)")
        connection.executemany("insert into unnamed values (?, ?)", [(f"k{i}", b"x" * 300) for i in range(rows)])
        connection.commit()
    return path


@pytest.mark.parametrize(
    "damage, set_aside",
    [
        (None, False),
        ("locked", False),  # another process is writing it: not this run's to move
        ("garbage", True),  # SQLITE_NOTADB
        ("truncated", True),  # SQLITE_CORRUPT when read
        ("pages overwritten", True),  # opens, but SQLite's quick_check reports the damage
    ],
)
def test_only_a_damaged_cache_file_is_set_aside(tmp_path, caplog, damage, set_aside):
    from attnres.evaluation import set_aside_if_corrupt

    database = sqlite_file(tmp_path / "cache.db")
    content = database.read_bytes()
    if damage == "garbage":
        database.write_bytes(bytes(range(256)) * 64)
    elif damage == "truncated":
        database.write_bytes(content[: len(content) // 2])
    elif damage == "pages overwritten":
        middle = len(content) // 2
        database.write_bytes(content[:middle] + bytes(range(256)) * 12 + content[middle + 3072 :])
    damaged = database.read_bytes()
    with contextlib.ExitStack() as stack:
        if damage == "locked":
            writer = stack.enter_context(contextlib.closing(sqlite3.connect(database, isolation_level=None)))
            writer.execute("begin exclusive")
        with caplog.at_level(logging.WARNING, logger="attnres.evaluation"):
            set_aside_if_corrupt(database)
    moved = list(tmp_path.glob("cache.db.corrupt-*"))
    assert [path.read_bytes() for path in moved] == ([damaged] if set_aside else [])
    assert database.exists() is not set_aside and len(caplog.records) == int(set_aside)
