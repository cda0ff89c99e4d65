"""Where AttnRes spends its time, by operator: a noise-robust complement to `overhead_benchmark.py`.

Wall-clock ratios on a shared machine move by several percent between runs. The profiler's per-operator CPU time
is steadier: this script profiles one step of the standard and the Block AttnRes model of that benchmark (same
weights, random non-zero queries) and prints, per aten operator, the self time and call count of each, sorted by the difference.
Operators the standard model never calls are AttnRes's own cost; their sum over the standard model's total is the
overhead the AttnRes path adds, free of the noise that hits the shared operators (matmuls, attention).

    python benchmarks/overhead_profile.py --mode prefill --batch 1 --seq 2048
    python benchmarks/overhead_profile.py --mode train --batch 1 --seq 512
    python benchmarks/overhead_profile.py --mode decode --seq 512
"""

import argparse
from collections import defaultdict

import torch
from torch.profiler import profile

from overhead_benchmark import build_models


def operator_times(model, args) -> dict[str, list[float]]:
    ids = torch.randint(2, 32000, (args.batch, args.seq))
    if args.mode == "train":
        model.train()
        step = lambda: model(ids, labels=ids).loss.backward()  # noqa: E731
    elif args.mode == "prefill":
        model.eval()
        step = lambda: model(ids, logits_to_keep=1)  # noqa: E731
    else:
        model.eval()
        with torch.inference_mode():
            cache = model(ids, use_cache=True).past_key_values
        token = ids[:, -1:]
        step = lambda: model(token, past_key_values=cache, use_cache=True)  # noqa: E731
    with torch.inference_mode(args.mode != "train"):
        step()  # warm-up
        with profile() as profiler:
            step()
    totals = defaultdict(lambda: [0.0, 0])
    for event in profiler.key_averages():
        totals[event.key][0] += event.self_cpu_time_total / 1e3
        totals[event.key][1] += event.count
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["prefill", "decode", "train"], default="prefill")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512, help="sequence length (decode: the prompt)")
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--intermediate-size", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    args.device, args.dtype = "cpu", "float32"

    models = build_models(args)  # the benchmark's models: shared weights, random non-zero queries
    times = {mode: operator_times(models[mode], args) for mode in ("standard", "block")}
    standard_total = sum(ms for ms, _ in times["standard"].values())
    own = {op: v for op, v in times["block"].items() if op not in times["standard"]}
    own_total = sum(ms for ms, _ in own.values())
    print(f"{args.mode} {args.batch}x{args.seq}: total self time standard {standard_total:.1f} ms, "
          f"block {sum(ms for ms, _ in times['block'].values()):.1f} ms")  # fmt: skip
    print(f"operators only AttnRes calls: {own_total:.1f} ms = {own_total / standard_total:.2%} of the standard step; "
          f"calls per step: standard {sum(n for _, n in times['standard'].values())}, "
          f"block {sum(n for _, n in times['block'].values())}")  # fmt: skip
    print(f"\n{'operator':<55} {'standard ms (calls)':>22} {'block ms (calls)':>22}")
    ops = sorted(set(times["standard"]) | set(times["block"]),
                 key=lambda op: times["standard"].get(op, [0, 0])[0] - times["block"].get(op, [0, 0])[0])  # fmt: skip
    for op in ops[: args.rows]:
        (s_ms, s_n), (b_ms, b_n) = times["standard"].get(op, [0, 0]), times["block"].get(op, [0, 0])
        print(f"{op[:55]:<55} {f'{s_ms:.1f} ({s_n})':>22} {f'{b_ms:.1f} ({b_n})':>22}")


if __name__ == "__main__":
    main()
