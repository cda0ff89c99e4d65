# Copyright 2026 The attnres authors. Licensed under the Apache License, Version 2.0.
"""The functions `attnres_humaneval.yaml` and `attnres_mbpp.yaml` name with `!function` (lm-eval imports this file by
path): `code_eval`'s metric contract, computed locally by attnres.code_execution."""

from attnres.code_execution import code_eval_pass_at_k


def pass_at_k(
    references: list[str], predictions: list[str] | list[list[str]], k: list[int] | None = None
) -> dict[str, float]:
    """pass@k of each problem's candidates against its test program. A task without a filter (MBPP) hands over one
    string per problem, a filtered one (HumanEval's `build_predictions`) a list of candidates per problem."""
    candidates = [[prediction] if isinstance(prediction, str) else prediction for prediction in predictions]
    return code_eval_pass_at_k(references, candidates, k or [1])


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """A HumanEval candidate program is the prompt (signature and docstring) followed by the model's completion."""
    return [[doc["prompt"] + response for response in responses] for responses, doc in zip(resps, docs)]
