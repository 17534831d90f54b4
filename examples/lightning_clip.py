"""Lightning with ``strategy="ddp"``: tilecl's loss inside a LightningModule.

::

    torchrun --standalone --nproc-per-node 2 examples/lightning_clip.py      # or any Lightning launcher
    python examples/lightning_clip.py                                       # one process

Lightning's ``self.all_gather(..., sync_grads=True)`` would gather every
rank's features and form the ``N x N`` logits on each rank. tilecl's losses do
the exchange themselves (``rank``/``world_size``, or ``process_group=``), tile
by tile: each rank's features receive ``world_size ×`` the gradient of the
global loss, so the gradient DDP averages is the single-process gradient.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the toy stand-ins beside this file

from toy import TwoTower, end_process_group, gradients, paired_data, recipe_arguments, save_run  # noqa: E402

import tilecl  # noqa: E402


class ClipModule(L.LightningModule):
    """A two-tower model trained with the symmetric CLIP loss (or SigLIP's) over all ranks' pairs."""

    def __init__(self, loss: str = "clip", lr: float = 0.05) -> None:
        super().__init__()
        self.model, self.loss_name, self.lr = TwoTower(), loss, lr
        self.losses: list[float] = []
        self.first_grads: dict[str, torch.Tensor] = {}

    def setup(self, stage: str) -> None:
        # the world is known once the trainer has started the processes
        world = self.trainer.world_size
        if self.loss_name == "clip":
            self.loss_fn: torch.nn.Module = tilecl.ClipLoss(rank=self.global_rank, world_size=world)
        else:
            self.loss_fn = tilecl.SigLipLoss(rank=self.global_rank, world_size=world)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        image, text, scale, bias = self.model(x, y)
        # ClipLoss takes open_clip's logit_bias and gives it a zero gradient: DDP sees it used
        loss = self.loss_fn(image, text, scale, bias)
        self.losses.append(float(loss.detach()))  # the global loss, the same on every rank
        return loss

    def on_after_backward(self) -> None:
        if not self.first_grads:  # DDP has averaged the gradients by now
            self.first_grads = gradients(self.model)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> list[float]:
    parser = recipe_arguments(__doc__)
    args = parser.parse_args(argv)

    torch.manual_seed(0)  # the same initial weights on every rank
    module = ClipModule(args.loss)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = L.Trainer(
        accelerator="cpu" if args.cpu else "auto",
        devices=processes,
        strategy="ddp" if processes > 1 else "auto",
        precision="64-true" if args.float64 else "32-true",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    dtype = torch.float64 if args.float64 else torch.float32
    data = paired_data(dtype=dtype)
    # with several processes Lightning puts in a DistributedSampler(shuffle=True, seed=0); one
    # process reads the same order, so its batch of world × batch holds the ranks' first batches
    sampler = (
        DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0) if processes == 1 else None
    )
    trainer.fit(module, DataLoader(data, batch_size=args.batch, sampler=sampler))
    if trainer.global_rank == 0:
        print(
            f"{args.loss}: loss {module.losses[0]:.4f} → {module.losses[-1]:.4f}, {len(module.losses)} steps"
        )
    save_run(args.out, module.losses, module.first_grads)
    del trainer  # its strategy unwrapped DDP at the end of fit: no reducer is left to outlive the group
    end_process_group()
    return module.losses


if __name__ == "__main__":
    main()
