"""A small-scale check of the paper's claim: PreNorm residuals (transformers' Llama) vs Block AttnRes vs Full AttnRes,
trained from scratch.

The three variants share everything but the residual: the same Llama-style architecture and initial weights (the
AttnRes models load the Llama model's initial state; their pseudo-queries start at zero), the same byte-level BPE
tokenizer, the same data in the same order, the same optimizer and schedule, for each of several seeds. The corpus is
the CPython standard library's own source (always on disk, offline): every 10th file is held out for validation.

Reports the validation loss of each variant (mean ± std over seeds) along training, the compute-equivalent ratio
where the curves allow it (how many more steps the baseline needs to reach the AttnRes loss: N / the step at which
AttnRes first reaches the baseline's final loss), and the diagnostics of each variant after training (depth-attention
maps, per-layer output and gradient magnitudes). This is a CPU-minutes experiment, not the paper's scale.

    python benchmarks/reproduce.py --steps 250              # 3 variants x 3 seeds: the README run, ~50 min on 2 cores
    python benchmarks/reproduce.py --steps 60 --seeds 0     # a quick look

Results: benchmarks/results/reproduce.{json,md} and reproduce-*.png.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from stdlib_corpus import stdlib_texts, token_blocks
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainingArguments,
    default_data_collator,
)

from attnres import AttnResConfig, AttnResForCausalLM
from attnres.diagnostics import collect, format_diagnostics, plot_depth_attention, plot_magnitudes
from attnres.training import AttnResTrainer


BASELINE = "llama"  # transformers' LlamaForCausalLM: the PreNorm model the AttnRes variants share their weights with
VARIANTS = (BASELINE, "block", "full")
COLORS = {BASELINE: "gray", "block": "C1", "full": "C0"}


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_models(args, vocab_size: int, seed: int) -> dict:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.block_size,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(**common))
    models = {BASELINE: llama}
    for mode in ("block", "full"):
        model = AttnResForCausalLM(AttnResConfig(**common, residual_mode=mode, attn_res_num_blocks=args.num_blocks))
        model.load_state_dict(llama.state_dict(), strict=False)  # identical shared weights; zero queries
        models[mode] = model
    return models


def train_one(model, train_blocks, val_blocks, args, seed: int, work: Path) -> dict:
    trainer = AttnResTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(work),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=args.steps // 10,
            weight_decay=0.1,
            eval_strategy="steps",
            eval_steps=args.eval_every,
            eval_on_start=True,
            per_device_eval_batch_size=32,
            logging_steps=args.eval_every,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=seed,
            data_seed=seed,
            disable_tqdm=True,
        ),  # fmt: skip
        train_dataset=train_blocks,
        eval_dataset=val_blocks,
        data_collator=default_data_collator,
        attn_res_learning_rate=args.learning_rate,  # from scratch: one learning rate for all (the paper's setting)
    )
    start = time.perf_counter()
    trainer.train()
    curve = [(log["step"], log["eval_loss"]) for log in trainer.state.log_history if "eval_loss" in log]
    return {"curve": curve, "final": curve[-1][1], "seconds": time.perf_counter() - start}


def first_step_reaching(curve: list[tuple[int, float]], target: float) -> float | None:
    """The (linearly interpolated) step at which a loss curve first reaches `target`, or None."""
    for (step0, loss0), (step1, loss1) in zip(curve, curve[1:]):
        if loss1 <= target:
            return step0 + (step1 - step0) * ((loss0 - target) / (loss0 - loss1) if loss0 != loss1 else 1.0)
    return None


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    steps = [step for step, _ in runs[0]["curve"]]
    return [(step, statistics.mean(run["curve"][i][1] for run in runs)) for i, step in enumerate(steps)]


def main(args) -> None:
    work = Path("/tmp/attnres-reproduce")
    train_texts, val_texts = stdlib_texts()
    tokenizer = train_tokenizer(train_texts[: args.tokenizer_files], args.vocab_size)
    train_blocks = token_blocks(train_texts, tokenizer, args.block_size, args.steps * args.batch_size, work)
    val_blocks = token_blocks(val_texts, tokenizer, args.block_size, args.val_blocks, work)
    print(f"{len(train_blocks)} training and {len(val_blocks)} validation blocks of {args.block_size} tokens")

    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    diagnostics = []
    probe = torch.tensor(val_blocks[:4]["input_ids"])  # the diagnostics' batch: 4 validation blocks
    for seed in args.seeds:
        models = build_models(args, len(tokenizer), seed)
        for variant in VARIANTS:
            result = train_one(models[variant], train_blocks, val_blocks, args, seed, work / f"{variant}-{seed}")
            runs[variant].append(result)
            print(f"seed {seed} {variant}: validation loss {result['final']:.4f} ({result['seconds']:.0f}s)")
            if seed == args.seeds[0]:
                diagnostics.append(collect(models[variant], probe, variant))

    baseline_curve = mean_curve(runs[BASELINE])
    summary = {}
    for variant in VARIANTS:
        finals = [run["final"] for run in runs[variant]]
        curve = mean_curve(runs[variant])
        entry = {
            "final_mean": statistics.mean(finals),
            "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "finals": finals,
            "seconds_mean": statistics.mean(run["seconds"] for run in runs[variant]),
            "mean_curve": curve,
        }
        if variant != BASELINE:
            reached = first_step_reaching(curve, baseline_curve[-1][1])
            entry["step_reaching_baseline_final"] = reached
            entry["compute_equivalent_ratio"] = args.steps / reached if reached else None
        summary[variant] = entry

    output = args.output
    output.mkdir(parents=True, exist_ok=True)
    for run in diagnostics[1:]:
        plot_depth_attention(run, output / f"reproduce-depth-{run.label}.png")
    plot_magnitudes(diagnostics, output / "reproduce-magnitudes.png")
    plot_curves(summary, runs, output / "reproduce-loss.png")
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
              "diagnostics": [run.to_dict() for run in diagnostics]}  # fmt: skip
    (output / "reproduce.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(args, summary, diagnostics, len(train_blocks), len(val_blocks))
    (output / "reproduce.md").write_text(text + "\n")
    print(text)


def plot_curves(summary, runs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.5), layout="constrained")
    for variant, entry in summary.items():
        steps = [step for step, _ in entry["mean_curve"]][1:]
        for run in runs[variant]:
            losses = [loss for _, loss in run["curve"]][1:]
            axis.plot(steps, losses, alpha=0.25, linewidth=0.8, color=COLORS[variant])
        mean = [loss for _, loss in entry["mean_curve"]][1:]
        axis.plot(steps, mean, label=variant, linewidth=1.8, color=COLORS[variant])
    axis.set_xlabel("step")
    axis.set_ylabel("validation loss")
    axis.legend()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def markdown(args, summary, diagnostics, train_blocks: int, val_blocks: int) -> str:
    lines = [
        f"Llama-style, hidden {args.hidden_size}, {args.layers} layers, {args.heads} heads, FFN "
        f"{args.intermediate_size}, vocab {args.vocab_size} (byte-level BPE); Block AttnRes, N = {args.num_blocks}. "
        f"{args.steps} steps × {args.batch_size} × {args.block_size} tokens of CPython stdlib source "
        f"({train_blocks:,} blocks), AdamW lr {args.learning_rate} cosine, seeds {', '.join(map(str, args.seeds))}; "
        f"validation on {val_blocks} held-out blocks.",
        "",
        "| variant | validation loss (mean ± std) | per seed | steps to reach the baseline's final loss "
        "| compute-equivalent ratio | s/run |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for variant, entry in summary.items():
        reached = entry.get("step_reaching_baseline_final")
        ratio = entry.get("compute_equivalent_ratio")
        lines.append(
            f"| {variant} | {entry['final_mean']:.4f} ± {entry['final_std']:.4f} | "
            f"{', '.join(f'{f:.4f}' for f in entry['finals'])} | "
            f"{'–' if variant == BASELINE else (f'{reached:.0f}' if reached else 'not reached')} | "
            f"{'–' if variant == BASELINE else (f'{ratio:.2f}×' if ratio else '–')} | {entry['seconds_mean']:.0f} |"
        )
    lines += ["", "Per-layer input RMS and gradient norm after training (seed " + str(args.seeds[0]) + "):", "",
              format_diagnostics(diagnostics)]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--intermediate-size", type=int, default=352)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--num-blocks", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--val-blocks", type=int, default=128)
    parser.add_argument("--tokenizer-files", type=int, default=200)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    main(parser.parse_args())
