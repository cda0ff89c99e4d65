# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""The functions `attnres_humaneval.yaml` names with `!function` (lm-eval imports this file by path)."""

from attnres.code_execution import code_eval_pass_at_k


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | None = None) -> dict[str, float]:
    return code_eval_pass_at_k(references, predictions, k or [1])


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """A candidate program is the prompt (signature and docstring) followed by the model's completion."""
    return [[doc["prompt"] + response for response in responses] for responses, doc in zip(resps, docs)]
