"""Hugging Face Accelerate: tilecl's loss in an ``Accelerator`` loop.

::

    accelerate launch --num_processes 2 examples/accelerate_clip.py    # or torchrun --nproc-per-node 2
    python examples/accelerate_clip.py                                  # one process

``accelerator.gather`` carries no gradient, so a CLIP loss built on it
trains only each rank's own rows. tilecl's losses exchange the features
themselves, with gradients to every rank's features: each rank's features
receive ``world_size ×`` the gradient of the global loss, and the average
that Accelerate's DDP takes is the single-process gradient.
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the toy stand-ins beside this file

from toy import TwoTower, gradients, paired_data, recipe_arguments, save_run  # noqa: E402

import tilecl  # noqa: E402


def main(argv: list[str] | None = None) -> list[float]:
    parser = recipe_arguments(__doc__)
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    dtype = torch.float64 if args.float64 else torch.float32
    torch.manual_seed(0)  # the same initial weights on every rank
    model = TwoTower().to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    # no shuffling: Accelerate deals the loader's batches round the ranks (rank r gets batches r,
    # r + world, …), so one process's batch of world × batch holds exactly the ranks' first batches
    loader = DataLoader(paired_data(dtype=dtype), batch_size=args.batch, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.loss == "clip":
        loss_fn: torch.nn.Module = tilecl.ClipLoss(rank=rank, world_size=world)
    else:
        loss_fn = tilecl.SigLipLoss(rank=rank, world_size=world)

    losses: list[float] = []
    first_grads: dict[str, torch.Tensor] = {}
    while len(losses) < args.steps:
        for x, y in loader:
            image, text, scale, bias = model(x, y)
            # ClipLoss takes open_clip's logit_bias and gives it a zero gradient: DDP sees it used
            loss = loss_fn(image, text, scale, bias)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if not first_grads:
                first_grads = gradients(accelerator.unwrap_model(model))
            optimizer.step()
            losses.append(float(loss.detach()))  # the global loss, the same on every rank
            if len(losses) == args.steps:
                break
    if accelerator.is_main_process:
        print(f"{args.loss}: loss {losses[0]:.4f} → {losses[-1]:.4f}, {len(losses)} steps on {world} rank(s)")
    save_run(args.out, losses, first_grads)
    # DDP's reducer must go while the process group is alive, and no rank may tear the group down
    # while another still uses it: an abort at exit otherwise, now and then, on a loaded machine
    model, optimizer, loader = accelerator.free_memory(model, optimizer, loader)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return losses


if __name__ == "__main__":
    main()
