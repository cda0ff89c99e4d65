"""Benchmark `attnres convert` on a multi-GB checkpoint: peak memory against checkpoint size, wall time against `cp`.

The source is a Llama-3.2-1B layout (1.24B parameters, bf16, ~2.5 GB) filled with random tensors and split into
safetensors shards, as `save_pretrained` would write it. Each repetition runs `cp -r` and the conversion in fresh
processes, interleaved (cp, convert, cp, convert, ...), so both see the same page-cache and disk conditions; the
report gives medians and the spread. Both timings include a final `sync`, so they measure durable copies, and
each starts with the page cache flushed of the previous run's writes (otherwise writeback of one run lands in the
next). Peak RSS is the converter process's own maximum resident set, next to the RSS of a process that only imports
attnres (the floor any Python CLI pays). The conversion time is that of `graft()` itself; the process time adds
interpreter start and imports (torch, transformers), about 5 s on the CPU machines.

    python benchmarks/convert_benchmark.py --work-dir /tmp/convert-bench
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM


LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    dtype="bfloat16",
)

# Peak memory, two ways. VmHWM is the high-water RSS of the process's own address space (ru_maxrss would be wrong:
# Linux carries it across exec, so a child would report this benchmark's peak from writing the checkpoint). VmHWM also
# counts the file-backed pages of a shard that safetensors mmaps to read it, which the kernel can drop at any time;
# the anonymous RSS (RssAnon, sampled every 5 ms) is the memory the converter really holds.
MEMORY_PROBE = """
import threading, time
def _status(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024
_peak_anon = [0]
def _sample():
    while True:
        _peak_anon[0] = max(_peak_anon[0], _status('RssAnon:'))
        time.sleep(0.005)
threading.Thread(target=_sample, daemon=True).start()
"""
CONVERT = (
    MEMORY_PROBE
    + """
import os, sys
from attnres.convert import graft
start = time.perf_counter()
graft(sys.argv[1], sys.argv[2], mode="block", num_blocks=8, dtype=sys.argv[3] or None, progress=False)
os.sync()
elapsed = time.perf_counter() - start
print(elapsed, _status('VmHWM:'), max(_peak_anon[0], _status('RssAnon:')))
"""
)
IMPORT_ONLY = (
    MEMORY_PROBE
    + """
import attnres.convert
time.sleep(0.05)
print(_status('VmHWM:'), max(_peak_anon[0], _status('RssAnon:')))
"""
)


def write_random_checkpoint(directory: Path, shard_bytes: int) -> int:
    """A Llama-1B-shaped checkpoint of random bf16 tensors, sharded like save_pretrained; returns its size."""
    config = LlamaConfig(**LLAMA_1B)
    with torch.device("meta"):
        shapes = {
            name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items() if name != "lm_head.weight"
        }
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    shards, current, current_bytes = [], {}, 0
    for name, shape in shapes.items():
        current[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        current_bytes += current[name].numel() * 2
        if current_bytes >= shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, tensors in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        tensors.clear()
    total = sum(2 * torch.Size(shape).numel() for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return sum(path.stat().st_size for path in directory.iterdir())


def timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/attnres-convert-bench"))
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "convert.json")
    args = parser.parse_args()

    shutil.rmtree(args.work_dir, ignore_errors=True)
    source = args.work_dir / "source"
    size = write_random_checkpoint(source, int(args.shard_gb * 2**30))
    print(f"source: {size / 2**30:.2f} GiB in {len(list(source.glob('*.safetensors')))} shards")
    import_rss, import_anon = map(
        int, subprocess.run([sys.executable, "-c", IMPORT_ONLY], capture_output=True, text=True).stdout.split()
    )

    results = {}
    for label, dtype in (("copy (dtype kept)", ""), ("rewrite (--dtype float16)", "float16")):
        cp_times, convert_times, convert_walls, peaks, anon_peaks = [], [], [], [], []
        for _ in range(args.repeats):
            target = args.work_dir / "cp"
            os.sync()
            cp_times.append(timed(["sh", "-c", f"cp -r '{source}' '{target}' && sync"])[0])
            shutil.rmtree(target)
            target = args.work_dir / "grafted"
            os.sync()
            wall, out = timed([sys.executable, "-c", CONVERT, str(source), str(target), dtype])
            seconds, peak, anon_peak = out.split()
            convert_walls.append(wall)
            convert_times.append(float(seconds))
            peaks.append(int(peak))
            anon_peaks.append(int(anon_peak))
            shutil.rmtree(target)
        results[label] = {
            "cp_seconds_median": statistics.median(cp_times),
            "convert_seconds_median": statistics.median(convert_times),
            "convert_process_seconds_median": statistics.median(convert_walls),
            "time_ratio_vs_cp": statistics.median(c / p for c, p in zip(convert_times, cp_times)),
            "time_ratio_vs_cp_range": [
                min(c / p for c, p in zip(convert_times, cp_times)),
                max(c / p for c, p in zip(convert_times, cp_times)),
            ],
            "process_time_ratio_vs_cp": statistics.median(c / p for c, p in zip(convert_walls, cp_times)),
            "peak_rss_bytes_max": max(peaks),
            "peak_rss_fraction_of_checkpoint": max(peaks) / size,
            "peak_rss_above_import_fraction_of_checkpoint": (max(peaks) - import_rss) / size,
            "peak_anon_rss_bytes_max": max(anon_peaks),
            "peak_anon_rss_above_import_fraction_of_checkpoint": (max(anon_peaks) - import_anon) / size,
        }

    report = {
        "checkpoint": "Llama-3.2-1B layout, random bf16 tensors",
        "checkpoint_bytes": size,
        "shards": len(list(source.glob("*.safetensors"))),
        "import_only_rss_bytes": import_rss,
        "import_only_anon_rss_bytes": import_anon,
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"checkpoint: {size / 2**30:.2f} GiB, {report['shards']} shards of at most {args.shard_gb} GiB; "
        f"import-only RSS {import_rss / 2**20:.0f} MiB",
        "| path | graft() / cp (median, range) | whole process / cp | peak RSS / checkpoint "
        "| (peak RSS - import) / checkpoint | (peak anon RSS - import) / checkpoint |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lo, hi = r["time_ratio_vs_cp_range"]
        lines.append(
            f"| {label} | {r['time_ratio_vs_cp']:.2f} ({lo:.2f}-{hi:.2f}) | {r['process_time_ratio_vs_cp']:.2f} | "
            f"{r['peak_rss_fraction_of_checkpoint']:.3f} | {r['peak_rss_above_import_fraction_of_checkpoint']:.3f} | "
            f"{r['peak_anon_rss_above_import_fraction_of_checkpoint']:.3f} |"
        )
    print("\n".join(lines))
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    shutil.rmtree(args.work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
