"""Run `attnres train` under torchrun (one process per rank) and record each rank's final parameters.

Used by tests/test_training.py: `python -m torch.distributed.run --nproc_per_node 2 tests/ddp_train.py DIGEST_DIR
[attnres train flags...]`."""

import hashlib
import sys
from pathlib import Path

import torch.distributed as dist

from attnres.training import parse_arguments, train


def main() -> None:
    digest_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    model_args, data_args, training_args = parse_arguments(argv)
    trainer, _ = train(model_args, data_args, training_args)
    # Each rank's own replica after training: DDP must have kept them identical.
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    rank = dist.get_rank() if dist.is_initialized() else 0
    (digest_dir / f"rank{rank}.txt").write_text(
        f"{dist.get_world_size() if dist.is_initialized() else 1} {digest.hexdigest()}"
    )


if __name__ == "__main__":
    main()
