"""What AttnRes costs: prefill latency, decode speed, training-step time and memory, against transformers' Llama.

Three models share every weight (the same tensors): transformers' `LlamaForCausalLM` (the PreNorm baseline), Block
AttnRes (N = 8) and Full AttnRes, the AttnRes ones with random non-zero pseudo-queries. Each measurement interleaves
them (llama, block, full, llama, ...) after a warm-up, rotating the order every round, so that machine noise hits all
three alike; a ratio is computed per round (AttnRes / Llama of the same round) and the report gives its median and
interquartile range, and the ratio of the fastest runs, both in wall time and in CPU time (the process's, all
threads): on a shared machine noise only ever adds time, and CPU time is not inflated by waiting for the other
processes' cores. Results go
to `benchmarks/results/overhead-<device>-<dtype>[-<threads>thread].{json,md}`.

    python benchmarks/overhead_benchmark.py                      # CPU, fp32 (the issue's setting)
    python benchmarks/overhead_benchmark.py --device cuda --dtype bfloat16 --compile
"""

import argparse
import inspect
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attnres import AttnResConfig, AttnResForCausalLM
from attnres.diagnostics import step_memory


BASELINE = "llama"
MODES = ("block", "full")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model shape `build_models` reads (the issue-25 setting by default), for every script that builds them."""
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--intermediate-size", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)


def build_models(args) -> dict[str, torch.nn.Module]:
    common = dict(
        vocab_size=32000,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=None,  # decode always runs the requested number of tokens
        pad_token_id=0,
    )
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**common)).to(device=args.device, dtype=DTYPES[args.dtype])
    models = {BASELINE: llama}
    for mode in MODES:
        model = AttnResForCausalLM(AttnResConfig(**common, residual_mode=mode, attn_res_num_blocks=8))
        # The same tensors, not copies (`assign=True`): every shared operator reads the same memory in every model,
        # so that where the allocator placed each model's weights cannot tilt the ratios (with copies, the ratios of
        # the same code moved by up to 2% between processes while the operator profiles did not).
        model.load_state_dict(llama.state_dict(), strict=False, assign=True)
        with torch.no_grad():  # non-zero queries: nothing may take a shortcut on uniform weights
            for name, param in model.attn_res_parameters().items():
                if name.endswith("_proj.weight"):
                    param.normal_(0, 0.02)
        models[mode] = model.to(device=args.device, dtype=DTYPES[args.dtype])
    return {name: model.eval() for name, model in models.items()}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(runs: dict[str, Callable[[], None]], repeats: int, warmup: int, device: str) -> dict[str, list]:
    """(wall seconds, CPU seconds) per call of each run, interleaved round by round; the order rotates every round, so
    that no model always runs first (after the others have warmed or polluted the caches)."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            run = runs[name]
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            synchronize(device)
            times[name].append((time.perf_counter() - start, time.process_time() - start_cpu))
    return times


def summarize(times: dict[str, list[tuple[float, float]]], unit: str = "s") -> dict:
    summary = {}
    for name, values in times.items():
        wall, cpu = zip(*values)
        summary[name] = {"median": statistics.median(wall), "cpu_median": statistics.median(cpu), "unit": unit}
    for mode in MODES:
        if mode not in times:
            continue
        ratios = sorted(a[0] / s[0] for a, s in zip(times[mode], times[BASELINE]))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        summary[mode]["ratio_median"] = statistics.median(ratios)
        summary[mode]["ratio_iqr"] = [quartiles[0], quartiles[2]]
        # the ratio of the fastest runs: noise on a shared machine only ever adds time
        summary[mode]["ratio_of_minima"] = min(t[0] for t in times[mode]) / min(t[0] for t in times[BASELINE])
        summary[mode]["cpu_ratio_of_minima"] = min(t[1] for t in times[mode]) / min(t[1] for t in times[BASELINE])
    return summary


def prefill(models, args, batch: int, seq: int) -> dict:
    ids = torch.randint(2, 32000, (batch, seq), device=args.device)

    def run(model):
        with torch.inference_mode():
            model(ids, use_cache=False, logits_to_keep=1)

    return summarize(interleaved({m: (lambda m=m: run(models[m])) for m in models}, args.repeats, 1, args.device))


def decode(models, args, prompt: int, new_tokens: int, compiled: bool = False) -> dict:
    """Per-token decode latency with the KV cache: each model prefills the prompt (untimed), then the models take
    their decode steps in turn (llama, block, full, llama, ...), so every step gives a paired ratio.

    With `compiled`, each model decodes into a `StaticCache` through `torch.compile(model, fullgraph=True)`, the
    recipe of transformers' "LLM inference optimization" guide; the prompt is prefilled eagerly."""
    from transformers import DynamicCache, StaticCache

    ids = torch.randint(2, 32000, (1, prompt), device=args.device)
    steps = {name: torch.compile(model, fullgraph=True) if compiled else model for name, model in models.items()}
    static_caches = (
        {  # eager decoding grows a DynamicCache instead
            name: StaticCache(config=model.config, max_cache_len=prompt + new_tokens) for name, model in models.items()
        }
        if compiled
        else {}
    )
    keywords = {name: cache_argument(model) for name, model in models.items()}
    times = {name: [] for name in models}
    repeats = max(2, args.repeats // 3)
    with torch.inference_mode():
        for _ in range(repeats):
            states = {}
            for name, model in models.items():
                cache = static_caches.get(name)
                if cache is not None:
                    cache.reset()
                else:
                    cache = DynamicCache(config=model.config)
                output = model(ids, **{keywords[name]: cache}, use_cache=True, logits_to_keep=1)
                states[name] = (cache, output.logits[:, -1:].argmax(-1))  # the cache is filled in place
            for step in range(new_tokens):
                position = torch.tensor([prompt + step], device=args.device)
                for name in models:
                    cache, token = states[name]
                    synchronize(args.device)
                    start, start_cpu = time.perf_counter(), time.process_time()
                    output = steps[name](token, **{keywords[name]: cache}, use_cache=True, cache_position=position)
                    token = output.logits[:, -1:].argmax(-1)
                    synchronize(args.device)
                    if step >= 2:  # the first steps warm up (and, compiled, compile)
                        times[name].append((time.perf_counter() - start, time.process_time() - start_cpu))
                    states[name] = (cache, token)
    return summarize(times, unit="s/token")


def cache_argument(model) -> str:
    """The KV cache's keyword: `cache` from transformers 5.24 on (AttnRes accepts both), `past_key_values` before
    (passing the old name to 5.24+ models warns on every call, which would be timed)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cuda_step_memory(model, ids) -> tuple[int, int]:
    """`step_memory` from the CUDA allocator's statistics."""
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = model(ids, labels=ids).loss
    held = torch.cuda.memory_allocated() - base
    loss.backward()
    return held, torch.cuda.max_memory_allocated() - base


def train_step(models, args, batch: int, seq: int, checkpointing: bool) -> dict:
    ids = torch.randint(2, 32000, (batch, seq), device=args.device)
    for model in models.values():
        model.train()
        if checkpointing:
            checkpointing_switch(model, "enable")()

    def run(model):
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    result = summarize(interleaved({m: (lambda m=m: run(models[m])) for m in models}, args.repeats, 1, args.device))
    for name, model in models.items():
        model.zero_grad(set_to_none=True)
        memory = cuda_step_memory if args.device.startswith("cuda") else step_memory
        result[name]["held_activation_bytes"], result[name]["peak_step_bytes"] = memory(model, ids)
    for name in MODES:
        for key, ratio in (("held_activation_bytes", "activation_ratio"), ("peak_step_bytes", "peak_ratio")):
            result[name][ratio] = result[name][key] / result[BASELINE][key]
    for model in models.values():
        model.eval()
        if checkpointing:
            checkpointing_switch(model, "disable")()
    return result


def checkpointing_switch(model, action: str):
    """`activation_checkpointing_{action}`, transformers 5.23's name (AttnRes models have it on every release), else
    the `gradient_checkpointing_{action}` that Llama has before 5.23 (deprecated from 5.23 on)."""
    return getattr(model, f"activation_checkpointing_{action}", None) or getattr(
        model, f"gradient_checkpointing_{action}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    add_model_arguments(parser)
    parser.add_argument("--prefill", default="1x512,1x2048,4x512", help="batch x seq shapes")
    parser.add_argument("--decode", default="512+128", help="prompt + new tokens")
    parser.add_argument("--train", default="1x512", help="batch x seq shapes")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd models (prefill, decode)")
    parser.add_argument("--only", default="prefill,decode,train,compile")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    models = build_models(args)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    report = {
        "device": f"{args.device} ({device_name}), {torch.get_num_threads()} threads",
        "dtype": args.dtype,
        "model": f"hidden {args.hidden_size}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
        f"intermediate {args.intermediate_size}, vocab 32000; block: N = 8 (blocks of {args.layers // 8} layers)",
        "torch": torch.__version__,
        "repeats": args.repeats,
        "results": {},
    }
    only = set(args.only.split(","))
    shapes = [tuple(map(int, s.split("x"))) for s in args.prefill.split(",")] if args.prefill else []
    if "prefill" in only:
        for batch, seq in shapes:
            report["results"][f"prefill {batch}x{seq}"] = prefill(models, args, batch, seq)
            print(format_row(f"prefill {batch}x{seq}", report["results"][f"prefill {batch}x{seq}"]), flush=True)
    if "decode" in only and args.decode:
        prompt, new_tokens = map(int, args.decode.split("+"))
        key = f"decode {prompt}+{new_tokens}"
        report["results"][key] = decode(models, args, prompt, new_tokens)
        print(format_row(key, report["results"][key]), flush=True)
    if "train" in only and args.train:
        for batch, seq in (tuple(map(int, s.split("x"))) for s in args.train.split(",")):
            for checkpointing in (False, True):
                key = f"train step {batch}x{seq}" + (" (activation checkpointing)" if checkpointing else "")
                report["results"][key] = train_step(models, args, batch, seq, checkpointing)
                print(format_row(key, report["results"][key]), flush=True)
    if args.compile and "compile" in only:
        compiled = {name: torch.compile(model) for name, model in models.items()}
        for batch, seq in shapes[:1]:
            key = f"prefill {batch}x{seq} (torch.compile)"
            report["results"][key] = prefill(compiled, args, batch, seq)
            print(format_row(key, report["results"][key]), flush=True)
        if args.decode:
            prompt, new_tokens = map(int, args.decode.split("+"))
            key = f"decode {prompt}+{new_tokens} (torch.compile, static cache)"
            report["results"][key] = decode(models, args, prompt, new_tokens, compiled=True)
            print(format_row(key, report["results"][key]), flush=True)

    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"overhead-{'cuda' if args.device.startswith('cuda') else 'cpu'}-{args.dtype}"
    if args.threads is not None:  # a one-thread run must not overwrite the default run's results
        stem += f"-{args.threads}thread"
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"device: {report['device']}, {args.dtype}, torch {torch.__version__}; model: {report['model']}",
        "",
        "| measurement | llama | block / llama: median (IQR); fastest; fastest CPU time | full / llama: the same | "
        "memory held for backward, block / full vs llama (step peak) |",
        "|---|---|---|---|---|",
    ]
    lines += [format_row(key, value) for key, value in report["results"].items()]
    (args.output / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def format_row(key: str, result: dict) -> str:
    baseline = result[BASELINE]
    cells = [f"{baseline['median'] * 1e3:.1f} ms" + (" per token" if "token" in baseline["unit"] else "")]
    for mode in MODES:
        low, high = result[mode]["ratio_iqr"]
        cells.append(
            f"{result[mode]['ratio_median']:.3f} ({low:.3f}-{high:.3f}); {result[mode]['ratio_of_minima']:.3f}; "
            f"{result[mode]['cpu_ratio_of_minima']:.3f}"
        )
    if "activation_ratio" in result["block"]:
        cells.append(
            f"{result['block']['activation_ratio']:.3f} / {result['full']['activation_ratio']:.3f} "
            f"(peak {result['block']['peak_ratio']:.3f} / {result['full']['peak_ratio']:.3f})"
        )
    else:
        cells.append("")
    return f"| {key} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
