# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""`attnres train`: heal a grafted checkpoint, fine-tune an AttnRes model, or pre-train one from scratch, with Trainer.

Everything is transformers' own machinery: flags are `TrainingArguments` (parsed by `HfArgumentParser`, so every
Trainer option works: `--max_steps`, `--bf16`, `--activation_checkpointing`, `--resume_from_checkpoint`, ...) plus
the dataclasses below; progress bars, logging, checkpointing and distributed training are Trainer's. The same
command runs unchanged under `torchrun` or `accelerate launch` (DDP; FSDP on GPUs through `--fsdp`).

What is trained (`--train`):
- `attnres`: only the AttnRes parameters (pseudo-queries and key norms), the cheapest way to heal a graft;
- `lora`: LoRA adapters on the attention and MLP projections plus the AttnRes parameters in full;
- `all`: every parameter (also what pre-training from scratch uses).
The AttnRes parameters get their own learning rate (`--attn_res_learning_rate`, default 1e-4) and no weight decay.
They start at zero, where a graft equals its PreNorm source, and they are sensitive: a depth logit is a sum over all
`hidden_size` coordinates of the query, and Adam moves every coordinate by about the learning rate per step. On
SmolLM2-135M (hidden 576), 2e-3 made the held-out loss worse within 30 steps, while 1e-4 improved it
(benchmarks/results/smollm2*.md).
"""

import dataclasses
import logging
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Literal

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint

from .configuration_attnres import AttnResConfig
from .errors import AttnResError
from .model_sources import (
    check_available,
    check_model_code,
    check_tokenizer,
    loading_options,
    locate_model,
    locate_tokenizer,
)
from .modeling_attnres import AttnResForCausalLM
from .paths import is_missing_local_path
from .peft_support import attnres_lora_config, is_attn_res_parameter


logger = logging.getLogger(__name__)

# transformers 5.23 renamed Trainer's `--gradient_checkpointing[_kwargs]` to `--activation_checkpointing[_kwargs]` (the
# old names still work there, with a FutureWarning, until v6). Earlier releases know only the old names, and there
# `parse_arguments` passes the new ones on under them, so that one documented command works on every release.
HAS_ACTIVATION_CHECKPOINTING_FLAGS = "activation_checkpointing" in {
    f.name for f in dataclasses.fields(TrainingArguments)
}
NEW_CHECKPOINTING_FLAG = re.compile(r"^--activation([-_])checkpointing")
TRAIN_EPILOG = (
    "Activation checkpointing: --activation_checkpointing, with --activation_checkpointing_kwargs "
    '\'{"every_n_layers": 2, "offload": true}\' for transformers 5.23\'s options (those two need 5.23 or newer). '
    "These are transformers 5.23's names; on earlier releases attnres passes them on as "
    "--gradient_checkpointing[_kwargs], the names those releases know (5.23+ still accept them, deprecated)."
)

TEXT_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainingSetupError(AttnResError):
    """A model, dataset or option that cannot be trained as asked."""


@dataclass
class ModelArguments:
    model: str | None = field(
        default=None, metadata={"help": "AttnRes checkpoint (e.g. made by `attnres convert`) or Hub id to fine-tune"}
    )
    init_config: str | None = field(
        default=None,
        metadata={"help": "pre-train from scratch: an AttnResConfig JSON file (needs --tokenizer; --train all)"},
    )
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer (default: the one saved with --model)"})
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "run the Python code a checkpoint ships (config.json auto_map); AttnRes checkpoints need none"
        },
    )
    use_kernels: bool = field(
        default=False,
        metadata={
            "help": "let transformers replace layers with kernels from the Hugging Face Hub (`use_kernels=True`, the "
            "default of transformers 5.25+ when this flag is absent elsewhere; attnres loads without them)"
        },
    )
    train: Literal["attnres", "lora", "all"] = field(
        default="attnres", metadata={"help": "attnres: AttnRes parameters only; lora: LoRA + AttnRes; all: everything"}
    )
    attn_res_learning_rate: float = field(
        default=1e-4, metadata={"help": "learning rate of the AttnRes parameters (the rest use --learning_rate)"}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    merge_lora: bool = field(
        default=True, metadata={"help": "with --train lora: also save the merged model (the adapter goes to adapter/)"}
    )


@dataclass
class DataArguments:
    dataset: str = field(
        metadata={
            "help": "text data: a .txt/.json/.jsonl/.parquet/.csv file, a directory of them, or a Hub dataset id"
        }
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name"})
    text_column: str = field(default="text", metadata={"help": "column holding the text (.txt files: 'text')"})
    block_size: int = field(default=512, metadata={"help": "tokens per training sequence (texts are concatenated)"})
    validation_fraction: float = field(default=0.05, metadata={"help": "share of blocks held out for evaluation"})
    max_blocks: int | None = field(default=None, metadata={"help": "use at most this many training blocks"})

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(f"--block_size must be at least 2 tokens, got {self.block_size}")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise ValueError(f"--max_blocks must be a positive number of blocks, got {self.max_blocks}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"--validation_fraction must lie in [0, 1), got {self.validation_fraction}")


def load_text_dataset(data: DataArguments):
    """A `datasets.Dataset` of texts from local files (through datasets' builders) or a Hub dataset."""
    import datasets

    path = Path(data.dataset).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_FORMATS)
        formats = {TEXT_FORMATS.get(p.suffix) for p in files}
        if not files or None in formats:
            raise TrainingSetupError(f"--dataset {path}: expected {', '.join(TEXT_FORMATS)} files")
        if len(formats) > 1:
            raise TrainingSetupError(f"--dataset {path}: mixes file formats {sorted(formats)}; use one")
        if all(p.stat().st_size == 0 for p in files):
            raise TrainingSetupError(f"--dataset {path}: empty (0 bytes); nothing to train on")
        builder = formats.pop()
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        load = lambda: datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **kwargs)  # noqa: E731
    elif is_missing_local_path(data.dataset) or Path(data.dataset).suffix in TEXT_FORMATS:
        raise TrainingSetupError(f"--dataset {data.dataset} does not exist (expected a file, directory or Hub id)")
    else:
        load = lambda: datasets.load_dataset(data.dataset, data.dataset_config, split="train")  # noqa: E731
    try:
        dataset = load()
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as error:  # unreadable or unreachable
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainingSetupError(f"--dataset {data.dataset}: cannot be read ({reason})") from None
    if data.text_column not in dataset.column_names:
        raise TrainingSetupError(
            f"--dataset {data.dataset} has no column {data.text_column!r} "
            f"(columns: {', '.join(dataset.column_names)}); pass --text_column"
        )
    feature = dataset.features[data.text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise TrainingSetupError(f"--dataset {data.dataset}: column {data.text_column!r} holds {feature}, not text")
    missing = sum(text is None for text in dataset[data.text_column])
    if missing:
        raise TrainingSetupError(f"--dataset {data.dataset}: {missing} row(s) have no {data.text_column!r}; drop them")
    return dataset


def tokenize_into_blocks(dataset, tokenizer, data: DataArguments, args: TrainingArguments):
    """Tokenize, concatenate (with EOS between documents) and cut into `block_size` blocks, as run_clm.py does;
    returns (train, validation or None)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        return {"input_ids": [ids + eos for ids in tokenizer(batch[data.text_column])["input_ids"]]}

    def group(batch):
        tokens = list(chain.from_iterable(batch["input_ids"]))
        usable = len(tokens) // data.block_size * data.block_size
        blocks = [tokens[i : i + data.block_size] for i in range(0, usable, data.block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    with args.main_process_first(desc="tokenizing"):
        tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenizing")
        blocks = tokenized.map(
            group, batched=True, batch_size=1000, desc=f"grouping into {data.block_size}-token blocks"
        )
    if len(blocks) < 2:
        raise TrainingSetupError(
            f"--dataset {data.dataset} gives {len(blocks)} block(s) of {data.block_size} tokens; use more text or a "
            "smaller --block_size"
        )
    validation = None
    if data.validation_fraction > 0:
        held_out = max(1, math.floor(len(blocks) * data.validation_fraction))
        split = blocks.train_test_split(test_size=held_out, seed=args.seed, shuffle=True)
        blocks, validation = split["train"], split["test"]
    if data.max_blocks is not None:
        blocks = blocks.select(range(min(data.max_blocks, len(blocks))))
    return blocks, validation


def load_model(model_args: ModelArguments, tokenizer):
    """The model to train, in fp32 (`--bf16`/`--fp16` are Trainer's mixed precision), with `requires_grad` set (or
    wrapped by PEFT) according to `--train`."""
    if (model_args.model is None) == (model_args.init_config is None):
        raise TrainingSetupError("give exactly one of --model (fine-tune) and --init_config (pre-train from scratch)")
    if model_args.init_config is not None:
        if model_args.train != "all":
            raise TrainingSetupError("pre-training from scratch (--init_config) trains everything: pass --train all")
        try:
            config = AttnResConfig.from_json_file(model_args.init_config)
        except (OSError, ValueError) as error:
            raise TrainingSetupError(f"--init_config {model_args.init_config}: {error}") from error
        if config.vocab_size < len(tokenizer):
            raise TrainingSetupError(
                f"--init_config vocab_size {config.vocab_size} < the tokenizer's {len(tokenizer)}"
            )
        model = AttnResForCausalLM(config)
    else:
        try:
            config = AutoConfig.from_pretrained(model_args.model, trust_remote_code=model_args.trust_remote_code)
        except (OSError, ValueError) as error:
            raise TrainingSetupError(f"--model {model_args.model}: cannot read its config ({error})") from error
        if config.model_type != "attnres":
            raise TrainingSetupError(
                f"--model {model_args.model} is a {config.model_type!r} model, not AttnRes: graft it first with "
                f"`attnres convert {model_args.model} DST`, then train DST"
            )
        loading = loading_options(use_kernels=model_args.use_kernels, trust_remote_code=model_args.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_args.model, dtype=torch.float32, **loading)
    if model_args.train == "lora":
        from peft import get_peft_model

        config = attnres_lora_config(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=LORA_TARGETS,
        )
        with warnings.catch_warnings():
            # PEFT (0.21.0-0.21.2) reads `model.is_gradient_checkpointing`, which transformers 5.23 deprecated in
            # favour of `is_activation_checkpointing`: a FutureWarning about PEFT's code that nobody running this
            # command can act on.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(model, config)
    for name, param in model.named_parameters():
        param.requires_grad_(model_args.train == "all" or is_attn_res_parameter(name))
    return model


class AttnResTrainer(Trainer):
    """Trainer whose optimizer gives the AttnRes parameters their own learning rate and no weight decay.

    Overriding `create_optimizer` is Trainer's documented extension point; everything else (the optimizer class from
    `--optim`, the scheduler, DeepSpeed/FSDP handling) stays Trainer's."""

    def __init__(self, *args, attn_res_learning_rate: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.attn_res_learning_rate = attn_res_learning_rate

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = model if model is not None else self.model
        decay = set(self.get_decay_parameter_names(model))
        groups = {"attn_res": [], "decay": [], "no_decay": []}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            key = "attn_res" if is_attn_res_parameter(name) else "decay" if name in decay else "no_decay"
            groups[key].append(param)
        parameter_groups = [
            {"params": groups["attn_res"], "lr": self.attn_res_learning_rate, "weight_decay": 0.0},
            {"params": groups["decay"], "weight_decay": self.args.weight_decay},
            {"params": groups["no_decay"], "weight_decay": 0.0},
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls([g for g in parameter_groups if g["params"]], **optimizer_kwargs)
        return self.optimizer


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments), prog="attnres train", epilog=TRAIN_EPILOG
    )
    if not HAS_ACTIVATION_CHECKPOINTING_FLAGS:
        argv = [NEW_CHECKPOINTING_FLAG.sub(r"--gradient\1checkpointing", argument) for argument in argv]
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # the dataclasses' own validation of what the flags say (TrainingArguments' too)
        raise TrainingSetupError(str(error).strip().splitlines()[0]) from None
    if not HAS_ACTIVATION_CHECKPOINTING_FLAGS and {"every_n_layers", "offload"} & set(
        training_args.gradient_checkpointing_kwargs or {}
    ):
        raise TrainingSetupError(
            f"every_n_layers and offload need transformers >= 5.23 (installed: {transformers.__version__}); "
            "upgrade it, or leave them out of --activation_checkpointing_kwargs"
        )
    return model_args, data_args, training_args


def train(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> tuple[Trainer, dict]:
    """Run one training job; returns the trainer and the metrics (train loss, validation loss before and after)."""
    tokenizer_source = model_args.tokenizer or model_args.model
    if tokenizer_source is None:
        raise TrainingSetupError("--init_config needs --tokenizer (a tokenizer directory or Hub id)")
    check_output_dir(Path(training_args.output_dir), model_args.model)
    check_resume_checkpoint(training_args.resume_from_checkpoint)
    if model_args.model is not None:
        located = locate_model(model_args.model, flag="--model")
        check_available(located, flag="--model")
        check_model_code(located, flag="--model", trust_remote_code=model_args.trust_remote_code)
    if model_args.tokenizer is not None:
        located_tokenizer = locate_tokenizer(model_args.tokenizer, flag="--tokenizer")
        check_available(located_tokenizer, flag="--tokenizer")
        check_tokenizer(located_tokenizer, flag="--tokenizer", fix="give a tokenizer directory or Hub id")
    else:
        check_tokenizer(
            located, flag="--model", fix="pass --tokenizer with the one it was trained with (e.g. the checkpoint it "
            "was grafted from), or save that one into it"
        )  # fmt: skip
    if training_args.fsdp and (training_args.use_cpu or not torch.accelerator.is_available()):
        raise TrainingSetupError(fsdp_unavailable("the CPU"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=model_args.trust_remote_code)
    train_blocks, validation_blocks = tokenize_into_blocks(
        load_text_dataset(data_args), tokenizer, data_args, training_args
    )
    model = load_model(model_args, tokenizer)
    trainer = AttnResTrainer(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=validation_blocks,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        attn_res_learning_rate=model_args.attn_res_learning_rate,
    )
    if training_args.fsdp and not trainer.is_fsdp_enabled:
        raise TrainingSetupError(fsdp_unavailable(trainer.accelerator.state.distributed_type.value))
    metrics: dict = {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if validation_blocks is not None:
        # Trainer's own step-0 evaluation. (Calling trainer.evaluate() before train() would be simpler, but in
        # transformers 5.23 it keeps train() from wrapping the model in DDP: ranks then silently diverge.)
        training_args.eval_on_start = True
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics["train_loss"] = result.training_loss
    if validation_blocks is not None:
        first_eval = next((log for log in trainer.state.log_history if "eval_loss" in log), None)
        if first_eval is not None and first_eval.get("step") == 0:
            metrics["validation_loss_before"] = first_eval["eval_loss"]
        metrics["validation_loss_after"] = trainer.evaluate()["eval_loss"]
    save_final(trainer, model_args, training_args)
    trainer.log_metrics("attnres", metrics)
    return trainer, metrics


def fsdp_unavailable(instead: str) -> str:
    return (
        f"--fsdp was given, but Trainer would train on {instead} without it (transformers and accelerate run FSDP "
        "only on accelerators, and fall back to DDP on CPUs); launch on GPUs with torchrun or accelerate, or drop "
        "--fsdp"
    )


def check_resume_checkpoint(checkpoint: str | None) -> None:
    """`--resume_from_checkpoint` must name a checkpoint Trainer saved (a directory with trainer_state.json): Trainer
    finds out only after the model and the data have loaded, and fails with a traceback ("Can't find a valid
    checkpoint", or a missing trainer_state.json for a model directory). Given the directory that holds checkpoints
    (`--output_dir`), the message names its latest."""
    if checkpoint is None:
        return
    path = Path(checkpoint).expanduser()
    if (path / TRAINER_STATE_NAME).is_file():
        return
    expected = f"a checkpoint-N directory that Trainer saved (with {TRAINER_STATE_NAME})"
    if not path.exists():
        raise TrainingSetupError(f"--resume_from_checkpoint {checkpoint} does not exist; expected {expected}")
    latest = get_last_checkpoint(path) if path.is_dir() else None
    hint = f"; did you mean {latest}?" if latest else ""
    raise TrainingSetupError(
        f"--resume_from_checkpoint {checkpoint} is not a Trainer checkpoint: expected {expected}{hint}"
    )


def check_output_dir(output_dir: Path, model: str | None) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingSetupError(f"--output_dir {output_dir} exists and is not a directory")
    if model is not None and Path(model).exists() and output_dir.resolve() == Path(model).resolve():
        raise TrainingSetupError(f"--output_dir {output_dir} is --model: training would overwrite it; choose another")


def save_final(trainer: Trainer, model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """Save the trained model to `--output_dir`: a full checkpoint (with the remote-code files) or, for LoRA, the
    adapter under `adapter/` and, with `--merge_lora`, the merged model beside it."""
    output = Path(training_args.output_dir)
    if model_args.train != "lora":
        trainer.save_model(str(output))
        return
    trainer.save_model(str(output / "adapter"))
    if model_args.merge_lora and trainer.is_world_process_zero():
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(output)
        trainer.processing_class.save_pretrained(output)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    model_args, data_args, training_args = parse_arguments(argv)
    _, metrics = train(model_args, data_args, training_args)
    if "validation_loss_before" in metrics:
        print(
            f"validation loss {metrics['validation_loss_before']:.4f} -> {metrics['validation_loss_after']:.4f} "
            f"({metrics['trainable_parameters']:,} trainable parameters)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
