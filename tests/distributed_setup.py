"""What the distributed tests train, in one place: the same initial model, global batches and optimizer steps for a
torchrun world and for the single process it is compared with."""

from collections.abc import Callable

import torch

from attnres import AttnResConfig, AttnResForCausalLM
from attnres.families import attnres_config_kwargs
from tests.tiny_models import OTHER_FAMILIES, other_family_source, randomize_, tiny_config


STEPS, GLOBAL_BATCH, SEQ = 4, 8, 16
PROBE = torch.randint(3, 99, (2, SEQ), generator=torch.Generator().manual_seed(123))


def make_model(mode: str, checkpointing: bool) -> AttnResForCausalLM:
    """The same model on every rank: fixed random weights, non-zero pseudo-queries. `mode`: "block" or "full", or a
    family of `tiny_models.OTHER_FAMILIES` (Block AttnRes built from that family's own transformers modules)."""
    if mode in OTHER_FAMILIES:
        config = AttnResConfig(**attnres_config_kwargs(other_family_source(mode).config), attn_res_block_size=2)
    else:
        config = tiny_config(mode)
    model = randomize_(AttnResForCausalLM(config), seed=0, query_std=0.3)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model.train()


def global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    motifs = torch.randint(3, 99, (STEPS, GLOBAL_BATCH, 4), generator=generator)
    return list(motifs.repeat(1, 1, SEQ // 4))  # learnable: each sequence repeats a motif


def run_steps(
    model: torch.nn.Module, local: Callable[[torch.Tensor], torch.Tensor], mean: Callable[[torch.Tensor], float]
) -> list[float]:
    """AdamW steps on `local(batch)` of each global batch; returns `mean(loss)` of every step (the global batch's
    loss: ranks hold equal shares of equal-length sequences)."""
    # The randomised family models turn chaotic at 1e-2 (measured on Gemma 3's soft-capped, scaled-embedding one),
    # where the last bits of differently reduced gradients grow into visible differences after a few steps.
    learning_rate = 1e-2 if model.config.source_model_type is None else 1e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    losses = []
    for batch in global_batches():
        part = local(batch)
        loss = model(part, labels=part).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(mean(loss))
    return losses
