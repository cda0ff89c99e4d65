"""The offline corpus the experiments share: the CPython standard library's own source, split by file."""

import sysconfig
from pathlib import Path

import datasets
from transformers import TrainingArguments

from attnres.training import DataArguments, tokenize_into_blocks


def stdlib_texts() -> tuple[list[str], list[str]]:
    """The standard library's modules (no tests, no site-packages), sorted by path; every 10th file is held out.
    Returns (training texts, held-out texts)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    texts = [p.read_text(errors="replace") for p in files]
    return [t for i, t in enumerate(texts) if i % 10], [t for i, t in enumerate(texts) if i % 10 == 0]


def token_blocks(texts: list[str], tokenizer, block_size: int, limit: int | None, work: Path):
    """`attnres train`'s own tokenize-join-chunk pipeline over `texts`, at most `limit` blocks."""
    data = DataArguments(dataset="stdlib", block_size=block_size, validation_fraction=0.0, max_blocks=limit)
    args = TrainingArguments(output_dir=str(work), report_to="none")
    blocks, _ = tokenize_into_blocks(datasets.Dataset.from_dict({"text": texts}), tokenizer, data, args)
    return blocks


def spread(blocks, count: int):
    """`count` blocks evenly spaced over `blocks` (all of them if there are fewer), so that a small sample covers the
    whole corpus rather than its first files."""
    if count >= len(blocks):
        return blocks
    return blocks.select([index * len(blocks) // count for index in range(count)])
