# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""Run model-written programs (HumanEval and MBPP candidates) and score them with the unbiased pass@k estimator.

lm-eval's stock HumanEval and MBPP metrics call `evaluate.load("code_eval")`, which fetches a script from the Hub; this
module replaces it so both run offline. Generated code is untrusted: nothing runs unless the user opted in
(`attnres eval --allow-code-execution`, which sets `HF_ALLOW_CODE_EVAL=1`, the variable `code_eval` itself checks).

Each program runs in a fresh `python -I` interpreter, with a clean environment, a wall-clock timeout and limits on CPU
time, memory, file size, open files and core dumps. On Linux, where `unshare` (util-linux) can create namespaces, it
also runs in user, network, IPC, PID and mount namespaces of its own (see `sandbox()` and `_sandbox_supervisor`): no
network, no view of other processes, everything it started killed with it, a read-only filesystem with the
evaluator's home and Hugging Face directories hidden, a private /tmp, /var/tmp and /dev/shm that vanish with it, and
a limit on the processes it starts that other candidates do not share. Where namespaces are unavailable, it runs in a
temporary directory of its own and `sandbox()` logs once what is not contained.

A program passes only if it ran to its end: the sentinel that `run_program` expects is written after the program
returned, so `exit(0)`, `os._exit(0)` or an atexit hook do not pass wrong code (see `_sandbox_supervisor`).
"""

import contextlib
import functools
import json
import logging
import math
import os
import pwd
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


logger = logging.getLogger(__name__)

OPT_IN_VARIABLE = "HF_ALLOW_CODE_EVAL"
REFUSAL = (
    "refusing to execute model-generated code: HumanEval and MBPP score a model by running the programs it writes, "
    "which can do anything your user account can. Re-run with --allow-code-execution (attnres eval) or set "
    f"{OPT_IN_VARIABLE}=1 (Python API) once you accept that, ideally inside a container or VM."
)
DEFAULT_TIMEOUT_S = 10.0
MEMORY_LIMIT_BYTES = 2 * 1024**3
FILE_SIZE_LIMIT_BYTES = 16 * 1024**2
OPEN_FILES_LIMIT = 64
PROCESS_LIMIT = 64  # processes and threads (RLIMIT_NPROC), per candidate
SCRATCH_SPACE_BYTES = 64 * 1024**2  # the private /tmp, /var/tmp and /dev/shm together
SCRATCH_FILES = 16384  # files and directories in them (tmpfs inodes)
STDERR_TAIL_BYTES = 8 * 1024  # enough for the last line of a traceback, however much a program writes
UNPRIVILEGED_ID = 65534  # "nobody", the user and group a root evaluator's candidates run as
SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_supervisor.py")
_PROBE_TIMEOUT_S = 30.0
# Checks what candidates need: the interpreter's own files (imports, a subprocess) and a writable working directory.
_PROBE_PROGRAM = (
    "import decimal, hashlib, math, subprocess, sys\n"
    "subprocess.run([sys.executable, '-c', 'pass'], check=True)\n"
    "open('probe.txt', 'w').write('ok')\n"
)


class CodeExecutionNotAllowed(RuntimeError):
    """Raised instead of running generated code when the user has not opted in."""


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    status: str  # "passed", "failed", "timed out"
    detail: str = ""


@dataclass(frozen=True)
class Sandbox:
    """How candidates are contained on this machine; `sandbox()` picks the strongest that works."""

    description: str
    command: tuple[str, ...] = ()  # the `unshare` prefix that creates the namespaces; empty without isolation
    user: int | None = None  # the uid and gid a root evaluator's candidates switch to

    @property
    def isolated(self) -> bool:
        return bool(self.command)


def code_execution_allowed() -> bool:
    return os.environ.get(OPT_IN_VARIABLE) == "1"


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The unbiased pass@k estimator of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct={num_correct} must lie in [0, num_samples={num_samples}]")
    if k < 1 or k > num_samples:
        raise ValueError(f"k={k} must lie in [1, num_samples={num_samples}]")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / n for n in range(num_samples - num_correct + 1, num_samples + 1))


def _sandboxes_to_try() -> list[Sandbox]:
    """The isolations this machine may allow, strongest first.

    Each candidate gets a user namespace of its own (the supervisor maps one user into it), so that RLIMIT_NPROC,
    which counts per user and user namespace, counts that candidate's processes only. A root evaluator first runs
    the supervisor as root in network, IPC, PID and mount namespaces it creates without a user namespace, and its
    candidates as nobody; a plain user, or root where nobody cannot run the interpreter, runs the supervisor in a user
    namespace too, as root there, and its candidates as itself.
    """
    unshare = shutil.which("unshare")
    if sys.platform != "linux" or unshare is None:
        return []
    # --mount-proc implies a mount namespace, made private (unshare's default), so no mount reaches the host;
    # --kill-child: the PID 1 dies with unshare.
    namespaces = ("--net", "--ipc", "--pid", "--fork", "--mount-proc", "--kill-child")
    sandboxes = []
    if os.geteuid() == 0:
        sandboxes.append(
            Sandbox("user, network, IPC, PID and mount namespaces, as nobody", (unshare, *namespaces), UNPRIVILEGED_ID)
        )
    sandboxes.append(
        Sandbox("user, network, IPC, PID and mount namespaces", (unshare, "--map-root-user", *namespaces))
    )
    return sandboxes


_sandbox_lock = threading.Lock()


def sandbox() -> Sandbox:
    """The isolation candidates run in, probed once per process by running a small program in each option."""
    with _sandbox_lock:
        return _probe_sandbox()


@functools.cache
def _probe_sandbox() -> Sandbox:
    failures = []
    for option in _sandboxes_to_try():
        probe = _run(_PROBE_PROGRAM, _PROBE_TIMEOUT_S, option)
        if probe.passed:
            if os.geteuid() == 0 and option.user is None:
                logger.warning(
                    "Code execution: candidates cannot run as an unprivileged user (%s), so they run as root in their "
                    "own user, network, IPC, PID and mount namespaces: the filesystem is read-only to them, but they "
                    "can read every file root owns outside the hidden home and Hugging Face directories, and the "
                    "number of processes they start is not limited (RLIMIT_NPROC does not apply to root).",
                    "; ".join(failures),
                )
            return option
        failures.append(f"{option.description}: {probe.status}, {probe.detail}")
    user = _user_name()
    logger.warning(
        "Code execution: candidates run WITHOUT namespace isolation (%s). They run as %s, with the network, every "
        "file %s can read or write (its home and Hugging Face token included), each other's files and every "
        "process of %s (this evaluator included: its environment, memory and signals); processes they move out of "
        "their process group can outlive the timeout, and the number of processes they start is not limited. "
        "Evaluate untrusted models in a container or VM.",
        "; ".join(failures) or "unshare (util-linux) on Linux is needed",
        user,
        user,
        user,
    )
    return Sandbox("no isolation")


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


def run_program(program: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> ExecutionResult:
    """Run one complete program (candidate + tests) in a separate interpreter; it passes if it ran to its end."""
    if not code_execution_allowed():
        raise CodeExecutionNotAllowed(REFUSAL)
    return _run(program, timeout_s, sandbox())


def _run(program: str, timeout_s: float, isolation: Sandbox) -> ExecutionResult:
    deadline = time.monotonic() + timeout_s
    nonce = secrets.token_hex(16).encode()
    # The program reaches the supervisor through an unlinked file, out of every other candidate's reach.
    with _working_directory(isolation) as workdir, tempfile.TemporaryFile() as source:
        source.write(program.encode("utf-8"))
        source.flush()
        source.seek(0)
        process, result_reader = _start(isolation, workdir, source.fileno(), nonce, timeout_s)
        with process:
            try:
                stderr_tail, sentinel, finished = _read_until_exit(process, result_reader, deadline)
            finally:
                os.close(result_reader)
                # Before the leader is reaped (on leaving `with process`) its pid still names its process group:
                # whatever is left in it dies, everything on a timeout, and stragglers without isolation.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
    if not finished:
        return ExecutionResult(False, "timed out", f"no exit within {timeout_s:g}s")
    return _verdict(process.returncode, sentinel == nonce, stderr_tail)


@contextlib.contextmanager
def _working_directory(isolation: Sandbox) -> Iterator[str]:
    """Where the supervisor starts. An isolated candidate works in its private /tmp, so nothing is written on the
    host; without isolation it gets a temporary directory, whose removal a candidate may foil (it runs as the same
    user) but never turns into an error of the evaluator's (`TemporaryDirectory(ignore_cleanup_errors=True)` still
    raises on Python 3.11 where resetting a permission fails)."""
    if isolation.isolated:
        yield "/"
        return
    directory = tempfile.mkdtemp(prefix="attnres-exec-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _verdict(returncode: int, ran_to_its_end: bool, stderr_tail: bytes) -> ExecutionResult:
    if returncode == 128 + signal.SIGXCPU:  # the supervisor's code for a candidate that SIGXCPU ended
        return ExecutionResult(False, "timed out", "CPU time limit reached")
    if returncode == 0 and ran_to_its_end:
        return ExecutionResult(True, "passed")
    last_line = stderr_tail.decode("utf-8", "replace").strip().splitlines()[-1:]
    if last_line:
        return ExecutionResult(False, "failed", last_line[0][:200])
    if returncode == 0:
        return ExecutionResult(False, "failed", "exit code 0 before the end of the program")
    return ExecutionResult(False, "failed", f"exit code {returncode}")


def _start(
    isolation: Sandbox, workdir: str, program_fd: int, nonce: bytes, timeout_s: float
) -> tuple[subprocess.Popen, int]:
    """Start the supervisor with the program and the nonce waiting in descriptors and the result pipe's write end;
    returns the result pipe's read end."""
    nonce_reader, nonce_writer = os.pipe()
    result_reader, result_writer = os.pipe()
    os.write(nonce_writer, nonce)
    os.close(nonce_writer)
    config = {
        "program_fd": program_fd,
        "nonce_fd": nonce_reader,
        "result_fd": result_writer,
        "limits": _resource_limits(timeout_s, isolation.isolated),
        "identity": _identity(isolation),
        "filesystem": _filesystem_plan() if isolation.isolated else None,
    }
    try:
        process = subprocess.Popen(
            [*isolation.command, sys.executable, "-I", "-B", SUPERVISOR, json.dumps(config)],
            cwd=workdir,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=(program_fd, nonce_reader, result_writer),
            start_new_session=True,  # its own process group, killed as a whole
        )
    except BaseException:
        os.close(result_reader)
        raise
    finally:
        os.close(nonce_reader)
        os.close(result_writer)
    return process, result_reader


def _identity(isolation: Sandbox) -> dict | None:
    """Who the candidate is in its user namespace (`uid`, `gid`), and who that is in the supervisor's (`outer_*`):
    nobody for a root evaluator; otherwise the evaluator's user, which the supervisor's user namespace maps to 0."""
    if not isolation.isolated:
        return None
    if isolation.user is not None:
        user = isolation.user
        return {"uid": user, "gid": user, "outer_uid": user, "outer_gid": user, "clear_groups": True}
    return {"uid": os.getuid(), "gid": os.getgid(), "outer_uid": 0, "outer_gid": 0, "clear_groups": False}


def _resource_limits(timeout_s: float, limit_processes: bool) -> list[tuple[str, int, int]]:
    """The CPU limit is a backstop one second beyond the wall-clock timeout; if a busy loop reaches it first anyway,
    the kernel sends SIGXCPU (then SIGKILL a second later), which `run_program` reports as a timeout. Processes are
    limited only in a user namespace of the candidate's own: elsewhere RLIMIT_NPROC would count every process of
    the user."""
    cpu = math.ceil(timeout_s) + 1
    limits = [
        ("RLIMIT_CPU", cpu, cpu + 1),
        ("RLIMIT_AS", MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES),
        ("RLIMIT_FSIZE", FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES),
        ("RLIMIT_NOFILE", OPEN_FILES_LIMIT, OPEN_FILES_LIMIT),
        ("RLIMIT_CORE", 0, 0),
    ]
    if limit_processes:
        limits.append(("RLIMIT_NPROC", PROCESS_LIMIT, PROCESS_LIMIT))
    return limits


def _filesystem_plan() -> dict:
    """What the supervisor hides and keeps: the directories to cover with an empty tmpfs, and the interpreter's
    directories (its installation, and where `sys.executable` lies, which candidates run again), which are bound back
    where they lie in a covered directory (or in /tmp, /var/tmp, /dev/shm).

    Hidden: the evaluator's home directories, its Hugging Face home and token directory (tokens, cached models) and
    its runtime directory (session sockets such as D-Bus), except the root directory and any that lies in a needed
    path.
    """
    prefixes = (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    needed = {os.path.realpath(path) for path in (*prefixes, os.path.dirname(os.path.abspath(sys.executable)))}
    needed = {need for need in needed if not any(_within(need, other) for other in needed - {need})}
    home = os.path.expanduser("~")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    directories = [home, os.environ.get("HF_HOME") or os.path.join(cache, "huggingface")]
    directories += [os.environ.get("XDG_RUNTIME_DIR", ""), os.path.dirname(os.environ.get("HF_TOKEN_PATH", ""))]
    with contextlib.suppress(KeyError):
        directories.append(pwd.getpwuid(os.getuid()).pw_dir)
    hidden = {os.path.realpath(path) for path in directories if path and os.path.isdir(path)}
    hidden = {path for path in hidden if path != "/" and not any(_within(path, need) for need in needed)}
    hidden = {path for path in hidden if not any(_within(path, other) for other in hidden - {path})}
    return {
        "hide": sorted(hidden),
        "needed": sorted(needed),
        "scratch_bytes": SCRATCH_SPACE_BYTES,
        "scratch_files": SCRATCH_FILES,
    }


def _within(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def _read_until_exit(process: subprocess.Popen, result_reader: int, deadline: float) -> tuple[bytes, bytes, bool]:
    """Read the program's stderr, keeping only its tail, and the result pipe until both close, which happens once
    everything in the sandbox has exited, or until the deadline passes (then the last value is False)."""
    stderr_reader = process.stderr.fileno()
    stderr_tail, sentinel = b"", b""
    with selectors.DefaultSelector() as selector:
        selector.register(stderr_reader, selectors.EVENT_READ)
        selector.register(result_reader, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return stderr_tail, sentinel, False
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 64 * 1024)
                if not chunk:
                    selector.unregister(key.fd)
                elif key.fd == stderr_reader:
                    stderr_tail = (stderr_tail + chunk)[-STDERR_TAIL_BYTES:]
                else:
                    sentinel = (sentinel + chunk)[:64]  # more than a nonce: anything written besides it spoils it
    return stderr_tail, sentinel, True


def run_programs(programs: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S, workers: int | None = None):
    """Run many programs concurrently (each in its own process); results in input order."""
    if not code_execution_allowed():
        raise CodeExecutionNotAllowed(REFUSAL)
    sandbox()  # probe (and warn) once, before the workers start
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda program: run_program(program, timeout_s), programs))


def code_eval_pass_at_k(
    references: Sequence[str], predictions: Sequence[Sequence[str]], k: Sequence[int] | int = (1,)
) -> dict[str, float]:
    """`code_eval`'s contract: each reference is a test program appended to every candidate of its problem."""
    ks = [k] if isinstance(k, int) else list(k)
    programs = [
        f"{candidate}\n\n{reference}\n"
        for reference, candidates in zip(references, predictions)
        for candidate in candidates
    ]
    results = iter(run_programs(programs))
    correct = [sum(next(results).passed for _ in candidates) for candidates in predictions]
    scores = {}
    for each_k in ks:
        per_problem = [
            pass_at_k(len(cands), c, each_k) for cands, c in zip(predictions, correct) if len(cands) >= each_k
        ]
        scores[f"pass@{each_k}"] = sum(per_problem) / len(per_problem) if per_problem else float("nan")
    return scores
