"""The fused Triton implementation on a GPU: what AttnRes costs with it, against transformers' Llama.

For each hidden size (bf16; 1024, 2048 and 4096 by default), models sharing every weight: transformers'
`LlamaForCausalLM` (the PreNorm baseline), and Block AttnRes (N = 8) on `two_phase` (eager PyTorch) and on `triton`
(the fused kernels), with random non-zero pseudo-queries. Measured, interleaved round by round so that noise hits all
alike (median over rounds): prefill, decoding one token at a time eagerly and compiled (`torch.compile(fullgraph=True)`
into a `StaticCache`, Llama compiled the same way), and a training step (forward and backward, with its peak memory).
Where fla-core is installed, the aggregation operator alone is also timed against its `fused_attnres`, for one block
of aggregations over N completed sources. Results go to `benchmarks/results/overhead-cuda-triton-<dtype>.{json,md}`.

    python benchmarks/triton_benchmark.py                        # on a GPU: the full run
    python benchmarks/triton_benchmark.py --device cpu --dry-run  # every code path on tiny shapes, on a CPU

`--dry-run` runs the kernels under Triton's interpreter and compiles with the aot_eager backend, on tiny shapes and
one round, so that the script is exercised by the test suite (tests/test_triton.py) and cannot rot; its numbers mean
nothing.
"""

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--hidden-sizes", default="1024,2048,4096")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--prefill", default="1x2048,8x512", help="batch x seq shapes")
    parser.add_argument("--decode", default="512+64", help="prompt + new tokens")
    parser.add_argument("--train", default="1x2048", help="batch x seq shapes")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before the timed ones")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes, one round, Triton's interpreter on a CPU (for the tests)"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.hidden_sizes, args.layers, args.repeats, args.warmup = "96", 2, 1, 0
        args.prefill, args.decode, args.train = "1x8", "4+3", "1x8"
        args.compile_backend = "aot_eager"  # traces what Inductor would, without generating code
    return args


def build_models(args, hidden: int) -> dict:
    """Llama and Block AttnRes on each implementation, sharing every weight, in `args.dtype` on `args.device`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnres import AttnResConfig, AttnResForCausalLM

    heads = max(1, hidden // 128) if not args.dry_run else 4
    common = dict(
        vocab_size=32000 if not args.dry_run else 128,
        hidden_size=hidden,
        intermediate_size=256 * round(8 * hidden / 3 / 256) if not args.dry_run else 2 * hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    models = {"llama": LlamaForCausalLM(LlamaConfig(**common))}
    for implementation in ("two_phase", "triton"):
        config = AttnResConfig(**common, attn_res_num_blocks=min(8, args.layers))
        config.attn_res_implementation = implementation
        model = AttnResForCausalLM(config)
        model.load_state_dict(models["llama"].state_dict(), strict=False)
        with torch.no_grad():  # non-zero queries: nothing may take a shortcut on uniform weights
            for name, param in model.attn_res_parameters().items():
                if name.endswith("_proj.weight"):
                    param.normal_(0, 0.02)
        models[implementation] = model
    dtype = getattr(torch, args.dtype)
    return {name: model.to(device=args.device, dtype=dtype).eval() for name, model in models.items()}


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(runs: dict[str, Callable[[], None]], args) -> dict[str, float]:
    """Median seconds per call of each run, the runs interleaved and their order rotated every round."""
    for _ in range(args.warmup):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(args.repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(args.device)
            start = time.perf_counter()
            runs[name]()
            synchronize(args.device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def prefill(models: dict, args, batch: int, seq: int) -> dict[str, float]:
    import torch

    ids = torch.randint(2, models["llama"].config.vocab_size, (batch, seq), device=args.device)

    def run(model):
        with torch.inference_mode():
            model(ids, use_cache=False, logits_to_keep=1)

    return interleaved({name: (lambda m=model: run(m)) for name, model in models.items()}, args)


def decode(models: dict, args, prompt: int, new_tokens: int, compiled: bool) -> dict[str, float]:
    """Median seconds per decoded token with the KV cache after an untimed prefill of the prompt; compiled: each model
    decodes into a `StaticCache` through `torch.compile(model, fullgraph=True)` (transformers' recipe)."""
    import torch
    from overhead_benchmark import cache_argument
    from transformers import DynamicCache, StaticCache

    ids = torch.randint(2, models["llama"].config.vocab_size, (1, prompt), device=args.device)
    times = {name: [] for name in models}
    with torch.inference_mode():
        for name, model in models.items():
            step = torch.compile(model, fullgraph=True, backend=args.compile_backend) if compiled else model
            for _ in range(max(1, args.repeats // 5)):
                if compiled:
                    cache = StaticCache(config=model.config, max_cache_len=prompt + new_tokens)
                else:
                    cache = DynamicCache(config=model.config)
                keyword = cache_argument(model)
                output = model(ids, **{keyword: cache}, use_cache=True, logits_to_keep=1)
                token = output.logits[:, -1:].argmax(-1)
                for position in range(prompt, prompt + new_tokens):
                    position_ids = torch.tensor([[position]], device=args.device)
                    synchronize(args.device)
                    start = time.perf_counter()
                    output = step(token, **{keyword: cache}, position_ids=position_ids, use_cache=True)
                    token = output.logits[:, -1:].argmax(-1)
                    synchronize(args.device)
                    if position - prompt >= min(2, new_tokens - 1):  # the first steps warm up (and compile)
                        times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def train_step(models: dict, args, batch: int, seq: int) -> dict[str, dict]:
    """Median seconds of a forward and backward with labels, and each model's peak memory over one step (CUDA)."""
    import torch

    ids = torch.randint(2, models["llama"].config.vocab_size, (batch, seq), device=args.device)

    def run(model):
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    for model in models.values():
        model.train()
    seconds = interleaved({name: (lambda m=model: run(m)) for name, model in models.items()}, args)
    result = {name: {"seconds": value} for name, value in seconds.items()}
    if args.device.startswith("cuda"):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run(model)
            result[name]["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    for model in models.values():
        model.zero_grad(set_to_none=True)
        model.eval()
    return result


def operator(args, hidden: int, num_sources: int = 8, num_queries: int = 8, tokens: int = 8192) -> dict[str, float]:
    """One block's aggregations alone (forward and backward): `num_queries` queries over `num_sources` completed
    sources and a partial sum, each followed by its PreNorm RMSNorm. Ours: one `phase_one` and a `merge` per query;
    fla's `fused_attnres` (installed only): one call per query over all sources (its fused output RMSNorm shares the
    key eps, so the zero-query exactness of AttnRes' ε / n² does not hold there: a cost comparison only)."""
    import torch

    from attnres.modeling_attnres import DepthQueries, TritonDepthAttention, inverse_rms

    if args.dry_run:
        num_sources, num_queries, tokens = 2, 2, 4
    dtype = getattr(torch, args.dtype)
    sources = torch.randn(num_sources, 1, tokens, hidden, device=args.device, dtype=dtype, requires_grad=True)
    partial_sum = torch.randn(1, tokens, hidden, device=args.device, dtype=dtype, requires_grad=True)
    queries = (torch.randn(num_queries, hidden, device=args.device) * 0.02).requires_grad_()
    key_weights = torch.ones(num_queries, hidden, device=args.device, requires_grad=True)
    norm_weight = torch.ones(hidden, device=args.device, dtype=dtype, requires_grad=True)

    def ours():
        depth_queries = DepthQueries(list(queries.split(1)), list(key_weights.unbind()))
        reads = TritonDepthAttention.read(sources, inverse_rms(sources, 1e-6), depth_queries)
        normed = [TritonDepthAttention.merge_norm(r, partial_sum, 1e-6, False, norm_weight, 1e-6)[2] for r in reads]
        sum(n.float().sum() for n in normed).backward()

    runs = {"triton": ours}
    try:
        from fla.ops.attnres import fused_attnres
    except ImportError:
        fused_attnres = None
    if fused_attnres is not None and args.device.startswith("cuda"):
        residuals = [*sources.unbind(0), partial_sum]

        def fla():
            normed = [
                fused_attnres(query, residuals, key_weight, output_rms_weight=norm_weight, rms_eps=1e-6)
                for query, key_weight in zip(queries, key_weights)
            ]
            sum(n.float().sum() for n in normed).backward()

        runs["fla fused_attnres"] = fla
    return interleaved(runs, args)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run and args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read by triton when attnres' kernels are decorated (import)
    import torch

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report = {"device": f"{args.device} ({device_name})", "dtype": args.dtype, "torch": torch.__version__}
    report["layers"], report["results"] = args.layers, {}
    lines = [
        f"device: {report['device']}, {args.dtype}, torch {torch.__version__}; {args.layers} layers, Block AttnRes "
        f"N = {min(8, args.layers)}" + (" (DRY RUN: tiny shapes, interpreter: meaningless numbers)" * args.dry_run),
        "",
        "| hidden | measurement | llama | two_phase / llama | triton / llama | triton / two_phase |",
        "|---|---|---|---|---|---|",
    ]
    for hidden in map(int, args.hidden_sizes.split(",")):
        models = build_models(args, hidden)
        results = report["results"][str(hidden)] = {}
        for batch, seq in (map(int, shape.split("x")) for shape in args.prefill.split(",")):
            results[f"prefill {batch}x{seq}"] = prefill(models, args, batch, seq)
        prompt, new_tokens = map(int, args.decode.split("+"))
        for compiled in (False, True):
            key = f"decode {prompt}+{new_tokens}" + (" (compiled, static cache)" if compiled else "")
            results[key] = decode(models, args, prompt, new_tokens, compiled)
        for batch, seq in (map(int, shape.split("x")) for shape in args.train.split(",")):
            step = train_step(models, args, batch, seq)
            results[f"train step {batch}x{seq}"] = {name: value["seconds"] for name, value in step.items()}
            if "peak_bytes" in step["llama"]:
                results[f"train step {batch}x{seq} peak memory"] = {n: v["peak_bytes"] for n, v in step.items()}
        for key, value in results.items():
            unit = "GiB" if "memory" in key else "ms"
            scale = 2**-30 if "memory" in key else 1e3
            lines.append(
                f"| {hidden} | {key} | {value['llama'] * scale:.3f} {unit} "
                f"| {value['two_phase'] / value['llama']:.3f} | {value['triton'] / value['llama']:.3f} "
                f"| {value['triton'] / value['two_phase']:.3f} |"
            )
        results["operator"] = operator(args, hidden)
        lines.append(
            f"| {hidden} | one block's aggregations, fwd+bwd | "
            + "; ".join(f"{name} {seconds * 1e3:.3f} ms" for name, seconds in results["operator"].items())
            + " | | | |"
        )
        print("\n".join(lines[-len(results) :]), flush=True)
        del models
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"overhead-{'cuda' if args.device.startswith('cuda') else 'cpu'}-triton-{args.dtype}"
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
