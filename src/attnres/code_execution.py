# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""Run model-written programs (HumanEval candidates) and score them with the unbiased pass@k estimator.

lm-eval's stock HumanEval metric calls `evaluate.load("code_eval")`, which fetches a script from the Hub; this module
replaces it so HumanEval runs offline. Generated code is untrusted: nothing runs unless the user opted in
(`attnres eval --allow-code-execution`, which sets `HF_ALLOW_CODE_EVAL=1`, the variable `code_eval` itself checks),
and each program runs in its own isolated interpreter (`python -I`) in a fresh temporary directory, in its own
process group, with a wall-clock timeout and limits on CPU time, memory, file size and open files. This is a
guard against accidents (infinite loops, runaway memory, stray files), not a security sandbox: run untrusted
models' code in a container.
"""

import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


OPT_IN_VARIABLE = "HF_ALLOW_CODE_EVAL"
REFUSAL = (
    "refusing to execute model-generated code: HumanEval scores a model by running the programs it writes, "
    "which can do anything your user account can. Re-run with --allow-code-execution (attnres eval) or set "
    f"{OPT_IN_VARIABLE}=1 (Python API) once you accept that, ideally inside a container or VM."
)
DEFAULT_TIMEOUT_S = 10.0
MEMORY_LIMIT_BYTES = 2 * 1024**3
FILE_SIZE_LIMIT_BYTES = 16 * 1024**2


class CodeExecutionNotAllowed(RuntimeError):
    """Raised instead of running generated code when the user has not opted in."""


@dataclass(frozen=True)
class ExecutionResult:
    passed: bool
    status: str  # "passed", "failed", "timed out"
    detail: str = ""


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


# Runs first in the child interpreter: cap its resources, then execute the candidate as __main__. (Setting limits
# here rather than in a `preexec_fn` keeps process creation safe from the worker threads of `run_programs`.) The CPU
# limit is a backstop one second beyond the wall-clock timeout; if a busy loop reaches it first anyway, the kernel
# sends SIGXCPU (then SIGKILL a second later), which `run_program` reports as a timeout, not a failure.
_BOOTSTRAP = """
import resource, runpy, sys
cpu, memory, file_size = (int(value) for value in sys.argv[2:5])
for limit, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory, memory),
                          (resource.RLIMIT_FSIZE, file_size, file_size), (resource.RLIMIT_NOFILE, 64, 64),
                          (resource.RLIMIT_CORE, 0, 0)):
    ceiling = resource.getrlimit(limit)[1]
    if ceiling != resource.RLIM_INFINITY:
        soft, hard = min(soft, ceiling), min(hard, ceiling)
    resource.setrlimit(limit, (soft, hard))
sys.argv = sys.argv[1:2]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_program(program: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> ExecutionResult:
    """Run one complete program (candidate + tests) in a separate interpreter; it passes if it exits with 0."""
    if not code_execution_allowed():
        raise CodeExecutionNotAllowed(REFUSAL)
    with tempfile.TemporaryDirectory(prefix="attnres-exec-") as workdir:
        script = os.path.join(workdir, "candidate.py")
        with open(script, "w", encoding="utf-8") as handle:
            handle.write(program)
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, script, str(math.ceil(timeout_s) + 1),
             str(MEMORY_LIMIT_BYTES), str(FILE_SIZE_LIMIT_BYTES)],
            cwd=workdir,
            env={"PATH": os.environ.get("PATH", ""), "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so a timeout kills whatever it spawned too
        )
        try:
            _, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return ExecutionResult(False, "timed out", f"no exit within {timeout_s:g}s")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if process.returncode == 0:
        return ExecutionResult(True, "passed")
    if process.returncode == -signal.SIGXCPU:
        return ExecutionResult(False, "timed out", "CPU time limit reached")
    last_line = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit code {process.returncode}"]
    return ExecutionResult(False, "failed", last_line[0][:200])


def run_programs(programs: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S, workers: int | None = None):
    """Run many programs concurrently (each in its own process); results in input order."""
    if not code_execution_allowed():
        raise CodeExecutionNotAllowed(REFUSAL)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda program: run_program(program, timeout_s), programs))


def code_eval_pass_at_k(
    references: Sequence[str], predictions: Sequence[Sequence[str]], k: Sequence[int] | int = (1,)
) -> dict[str, float]:
    """`code_eval`'s contract: each reference is a test program appended to every candidate of its problem."""
    ks = [k] if isinstance(k, int) else list(k)
    programs = [f"{candidate}\n\n{reference}\n" for reference, candidates in zip(references, predictions) for candidate in candidates]
    results = iter(run_programs(programs))
    correct = [sum(next(results).passed for _ in candidates) for candidates in predictions]
    scores = {}
    for each_k in ks:
        per_problem = [pass_at_k(len(cands), c, each_k) for cands, c in zip(predictions, correct) if len(cands) >= each_k]
        scores[f"pass@{each_k}"] = sum(per_problem) / len(per_problem) if per_problem else float("nan")
    return scores
