"""open_clip-style training with torchrun and DistributedDataParallel (or FSDP2), tilecl's loss
as a drop-in.

::

    torchrun --standalone --nproc-per-node 2 examples/ddp_torchrun.py --loss clip
    torchrun --standalone --nproc-per-node 2 examples/ddp_torchrun.py --loss siglip --fsdp2
    python examples/ddp_torchrun.py --loss siglip            # one process

Each rank embeds its own shard; ``tilecl.ClipLoss(rank=, world_size=)`` (or
``SigLipLoss``) is the global loss over every rank's pairs, computed tile by
tile, and each rank's features receive ``world_size ×`` the gradient of that
global loss, so DDP's gradient average is the single-process gradient of the
loss over the whole global batch (ranks may also hold different numbers of
pairs: a sampler without padding, sequence packing). ``logit_scale`` and
``logit_bias`` live in the model and are averaged with the rest; with
``--fsdp2`` (``fully_shard``) they are ``[1]``-shaped sharded parameters,
gathered inside the model's forward as open_clip's are.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the toy stand-ins beside this file

from toy import TwoTower, end_process_group, gradients, paired_data, recipe_arguments, save_run  # noqa: E402

import tilecl  # noqa: E402


def main(argv: list[str] | None = None) -> list[float]:
    parser = recipe_arguments(__doc__)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--dist-impl", choices=("gather", "ring"), default="gather")
    parser.add_argument("--fsdp2", action="store_true", help="fully_shard instead of DDP")
    args = parser.parse_args(argv)

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    cpu = args.cpu or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    if not cpu:
        torch.cuda.set_device(device)  # one GPU per rank: NCCL and the losses' own tensors use it
    if distributed:
        dist.init_process_group("gloo" if cpu else "nccl")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    dtype = torch.float64 if args.float64 else torch.float32

    torch.manual_seed(0)  # the same initial weights on every rank
    model = TwoTower().to(device, dtype)
    if distributed and args.fsdp2:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        wrapped = fully_shard(model, mesh=init_device_mesh(device.type, (world,)))
    else:
        wrapped = DistributedDataParallel(model) if distributed else model
    data = paired_data(dtype=dtype)
    # one process reads the same shuffled order: its batch of world × batch is the ranks' batches together
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler)
    if args.loss == "clip":
        loss_fn: torch.nn.Module = tilecl.ClipLoss(rank=rank, world_size=world, dist_impl=args.dist_impl)
    else:
        loss_fn = tilecl.SigLipLoss(rank=rank, world_size=world, dist_impl=args.dist_impl)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    losses: list[float] = []
    first_grads: dict[str, torch.Tensor] = {}
    epoch = 0
    while len(losses) < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            image, text, scale, bias = wrapped(x.to(device), y.to(device))
            # ClipLoss takes open_clip's logit_bias and gives it a zero gradient: DDP sees it used
            loss = loss_fn(image, text, scale, bias)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not first_grads:
                first_grads = gradients(model)
            optimizer.step()
            losses.append(float(loss.detach()))  # the global loss: the same on every rank
            if len(losses) == args.steps:
                break
        epoch += 1
    if rank == 0:
        print(f"{args.loss}: loss {losses[0]:.4f} → {losses[-1]:.4f}, {len(losses)} steps on {world} rank(s)")
    save_run(args.out, losses, first_grads)
    if distributed:
        del wrapped  # DDP's reducer goes while the group is alive
        end_process_group()
    return losses


if __name__ == "__main__":
    main()
