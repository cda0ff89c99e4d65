"""What a decoding step's extra time is made of: the Block AttnRes step against transformers' Llama (the models and
weights of `overhead_benchmark.py`), with parts of the AttnRes path replaced by stand-ins that compute nothing.

Host overhead (calling an operator, the Python around it) is most of what AttnRes adds to an eager decoding step on a
CPU, and it depends on the machine's state: code that measured 1.004 one day gave 1.04 on another. Profilers see
operator time, not that overhead; removing a part and timing what is left does. Each variant runs interleaved with
Llama, and the ratio of their fastest CPU times is printed:

- `full`: the model as it is;
- `no merge`: each sublayer's input is the partial sum itself, normalized as in the model (phase 2 removed);
- `no merge or norm`: each sublayer reads the partial sum as it is (phase 2 and the PreNorm removed, where Llama
  keeps its RMSNorm: the ratio falls below what the aggregations cost);
- `no AttnRes path`: that, and no phase 1 and no source commits either.

The stand-ins change the model's numbers; only the time means anything. The table is also written to
`benchmarks/results/decode-breakdown-cpu[-<N>thread].md`.

    python benchmarks/decode_breakdown.py --threads 1
"""

import argparse
import contextlib
import time
from pathlib import Path

import torch
from overhead_benchmark import add_model_arguments, build_models, cache_argument
from transformers import DynamicCache

from attnres import modeling_attnres as code


def step(model, prompt: int):
    """One decoding step of `model` after a `prompt`-token prefill, undone after each call (so every step decodes
    the same position)."""
    ids = torch.randint(2, 32000, (1, prompt))
    cache = DynamicCache(config=model.config)
    keyword = cache_argument(model)
    with torch.inference_mode():
        model(ids, **{keyword: cache}, use_cache=True, logits_to_keep=1)

    def run() -> None:
        with torch.inference_mode():
            model(ids[:, -1:], **{keyword: cache}, use_cache=True, logits_to_keep=1)
        cache.crop(-1)

    return run


def normalized_partial_sum(aggregation, implementation, read, partial_sum, norm, **kwargs):
    return norm(read[0] if partial_sum is None else partial_sum)


def partial_sum_only(aggregation, implementation, read, partial_sum, norm, **kwargs):
    return read[0] if partial_sum is None else partial_sum


class FirstSourceOnly(code.TwoPhaseDepthAttention):
    """Phase 1 replaced: every read is the first completed source."""

    @staticmethod
    def read(sources, sources_inv_rms, queries) -> list:
        return [(sources[0],)] * len(queries)


def commit_once(self, source: torch.Tensor, eps: float) -> None:
    """The first commit only (the embedding), so that the stand-in reads have a source."""
    if self.values.shape[0] == 0:
        self.buffer[0] = source
        self.values = self.buffer[:1]


@contextlib.contextmanager
def replaced(variant: str):
    saved = code.normalized_input, code.ATTN_RES_IMPLEMENTATIONS["two_phase"], code.CompletedSources.commit
    if variant == "no merge":
        code.normalized_input = normalized_partial_sum
    elif variant in ("no merge or norm", "no AttnRes path"):
        code.normalized_input = partial_sum_only
    if variant == "no AttnRes path":
        code.ATTN_RES_IMPLEMENTATIONS["two_phase"] = FirstSourceOnly
        code.CompletedSources.commit = commit_once
    try:
        yield
    finally:
        code.normalized_input, code.ATTN_RES_IMPLEMENTATIONS["two_phase"], code.CompletedSources.commit = saved


def fastest_cpu_time_ratio(runs: dict, steps: int, fastest: int) -> tuple[float, float]:
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            start = time.process_time()
            run()
            times[name].append(time.process_time() - start)
    best = {name: sum(sorted(values)[:fastest]) / fastest for name, values in times.items()}
    return best["llama"], best["block"] / best["llama"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=150, help="interleaved steps per variant")
    parser.add_argument("--fastest", type=int, default=10, help="mean of the fastest steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.device, args.dtype = "cpu", "float32"
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build_models(args)
    runs = {"llama": step(models["llama"], args.prompt), "block": step(models["block"], args.prompt)}
    lines = [
        f"decode step after {args.prompt} tokens; hidden {args.hidden_size}, {args.layers} layers, Block N = 8, fp32; "
        f"{torch.get_num_threads()} CPU thread(s), torch {torch.__version__}; mean of the fastest {args.fastest} of "
        f"{args.steps} interleaved steps",
        "",
        "| variant | Llama (ms) | block / Llama, fastest CPU time |",
        "|---|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for variant in ("full", "no merge", "no merge or norm", "no AttnRes path"):
        with replaced(variant):
            llama, ratio = fastest_cpu_time_ratio(runs, args.steps, args.fastest)
        lines.append(f"| {variant} | {1e3 * llama:.1f} | {ratio:.4f} |")
        print(lines[-1], flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = "decode-breakdown-cpu" + (f"-{args.threads}thread" if args.threads else "")
    (args.output / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
