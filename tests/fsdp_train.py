"""Train a tiny AttnRes model with FSDP2 under torchrun (gloo on CPU): `fully_shard` on every decoder layer, then on
the root, as a user sharding per decoder layer does. Rank 0 writes what the test compares with one process training
on the same global batches: the loss of every step, the final parameters (a full state dict gathered from the
shards) and a checkpoint saved from them with `save_pretrained`, with the FSDP model's logits on a probe batch.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_train.py OUT_DIR MODE CHECKPOINTING
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from tests.distributed_setup import PROBE, make_model, run_steps


def main() -> None:
    output, mode, checkpointing = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = make_model(mode, checkpointing)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)

    def all_ranks_mean(loss: torch.Tensor) -> float:
        total = loss.detach().clone()
        dist.all_reduce(total)
        return total.item() / world_size

    losses = run_steps(model, lambda batch: batch[rank::world_size], all_ranks_mean)
    model.eval()
    with torch.no_grad():
        probe_logits = model(PROBE).logits
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        (output / "losses.json").write_text(json.dumps(losses))
        torch.save({"state_dict": state_dict, "probe_logits": probe_logits}, output / "result.pt")
        saved = make_model(mode, checkpointing=False)
        saved.load_state_dict(state_dict)
        saved.save_pretrained(output / "checkpoint")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
