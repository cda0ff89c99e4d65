"""Where AttnRes spends its time, by operator: a noise-robust complement to `overhead_benchmark.py`.

Wall-clock ratios on a shared machine move by several percent between runs, and so does the time of the big shared
operators (matmuls, attention) from one step to the next. This script profiles interleaved steps of the Llama and
the Block AttnRes model of that benchmark (same weights, random non-zero queries) with Python stacks, and attributes
to AttnRes every aten operator called from its code (phase 1 and 2, the commits, the pseudo-queries) and, in
training, every operator of the backward nodes those recorded. Their self time over the Llama step's is the cost
of the AttnRes path, free of the noise in the rest of the step. (It does not count the Python and dispatch time
between operators, which decides decoding: the calls per step show that part.)

    python benchmarks/overhead_profile.py --mode prefill --batch 1 --seq 2048
    python benchmarks/overhead_profile.py --mode train --batch 1 --seq 512
    python benchmarks/overhead_profile.py --mode decode --seq 512
"""

import argparse
import re
from collections import defaultdict
from collections.abc import Callable

import torch
from overhead_benchmark import BASELINE, add_model_arguments, build_models, cache_argument
from torch.profiler import profile

from attnres import modeling_attnres


def attnres_functions() -> set[tuple[int, str]]:
    """`(first line, name)` of the functions of `modeling_attnres` that make up the AttnRes path, as the profiler's
    Python events name them ("…/modeling_attnres.py(<first line>): <name>")."""
    code = modeling_attnres
    functions = [
        code.phase_one,
        code.phase_two,
        code.fold_queries,
        code.DepthQueries.folded,
        code.host_scalar,
        code.norm_with_eps,
        code.inverse_rms,
        code.cast,
        code.AttnResDecoderLayer.depth_query_parts,
        code.AttnResModel.depth_queries,
    ]
    for cls in (
        code.PhaseOneFunction,
        code.PhaseTwoFunction,
        code.TwoPhaseDepthAttention,
        code.CommitSourceFunction,
        code.CompletedSources,
        code.AttnResPseudoQuery,
        code.AttnResKeyNorm,
        code.AttnResAggregation,
    ):
        members = (getattr(member, "__func__", member) for member in vars(cls).values())
        functions += [member for member in members if hasattr(member, "__code__")]
    return {(function.__code__.co_firstlineno, function.__code__.co_name) for function in functions}


PYTHON_FRAME = re.compile(r"modeling_attnres\.py\((\d+)\): (\w+)$")
BACKWARD_NODE = "autograd::engine::evaluate_function: "


def make_step(model, args) -> Callable[[], None]:
    """One step of `args.mode` on `model`, warmed up."""
    ids = torch.randint(2, 32000, (args.batch, args.seq))
    if args.mode == "train":
        model.train()
        step = lambda: model(ids, labels=ids).loss.backward()  # noqa: E731
    elif args.mode == "prefill":
        model.eval()
        step = lambda: model(ids, logits_to_keep=1)  # noqa: E731
    else:
        model.eval()
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(ids, **{cache_argument(model): cache}, use_cache=True)
        token = ids[:, -1:]
        step = lambda: model(token, **{cache_argument(model): cache}, use_cache=True)  # noqa: E731

    def run() -> None:
        with torch.inference_mode(args.mode != "train"):
            step()

    run()
    return run


def operator_times(step: Callable[[], None], functions: set[tuple[int, str]]) -> tuple[dict, dict]:
    """Self CPU time (ms) and call count of each aten operator in one call of `step`: all of them, and those of the
    AttnRes path (called from `functions`, or run by the backward node of an operation they recorded)."""
    with profile(with_stack=True) as profiler:
        step()
    events = profiler.events()

    def called_from_attnres(event) -> bool:
        while event is not None:
            frame = PYTHON_FRAME.search(event.name)
            if frame and (int(frame[1]), frame[2]) in functions:
                return True
            event = event.cpu_parent
        return False

    forward = {id(event) for event in events if called_from_attnres(event)}
    recorded = {event.sequence_nr for event in events if id(event) in forward and event.sequence_nr >= 0}

    def run_by_attnres_backward(event) -> bool:
        while event is not None:
            if event.name.startswith(BACKWARD_NODE):
                return event.sequence_nr in recorded
            event = event.cpu_parent
        return False

    every, attnres = defaultdict(lambda: [0.0, 0]), defaultdict(lambda: [0.0, 0])
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        for table in (every, attnres) if id(event) in forward or run_by_attnres_backward(event) else (every,):
            table[event.name][0] += event.self_cpu_time_total / 1e3
            table[event.name][1] += 1
    return every, attnres


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["prefill", "decode", "train"], default="prefill")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512, help="sequence length (decode: the prompt)")
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="profiled steps per model, interleaved")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    args.device, args.dtype = "cpu", "float32"

    models = build_models(args)  # the benchmark's models: shared weights, random non-zero queries
    steps = {mode: make_step(models[mode], args) for mode in (BASELINE, "block")}
    functions = attnres_functions()
    # per-step means over interleaved profiled steps (llama, block, llama, ...)
    every = {mode: defaultdict(lambda: [0.0, 0.0]) for mode in steps}
    attnres = defaultdict(lambda: [0.0, 0.0])

    def accumulate(totals, ops) -> None:
        for op, (ms, count) in ops.items():
            totals[op][0] += ms / args.repeats
            totals[op][1] += count / args.repeats

    for _ in range(args.repeats):
        for mode, step in steps.items():
            all_ops, attnres_ops = operator_times(step, functions)
            accumulate(every[mode], all_ops)
            if mode == "block":
                accumulate(attnres, attnres_ops)

    def total(ops, index: int = 0) -> float:
        return sum(value[index] for value in ops.values())

    llama, block, path = total(every[BASELINE]), total(every["block"]), total(attnres)
    print(
        f"{args.mode} {args.batch}x{args.seq}, per step: aten self time llama {llama:.1f} ms, block {block:.1f} ms "
        "(the difference is mostly noise in the shared operators)"
    )
    print(
        f"AttnRes path: {path:.1f} ms = {path / llama:.2%} of the llama step; aten calls per step: llama "
        f"{total(every[BASELINE], 1):.0f}, block {total(every['block'], 1):.0f} (AttnRes path {total(attnres, 1):.0f})"
    )
    print(f"\n{'AttnRes operator':<55} {'ms':>8} {'calls':>7}")
    for op, (ms, count) in sorted(attnres.items(), key=lambda item: -item[1][0])[: args.rows]:
        print(f"{op[:55]:<55} {ms:>8.2f} {count:>7.0f}")


if __name__ == "__main__":
    main()
