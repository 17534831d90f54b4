"""Every Python block of the README runs, with the fixtures it names (small tensors, tiny towers, a
one-process group): no snippet can rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tilecl

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
N, D = 8, 128  # the README's MemoryQueue and CrossBatchMemory are 128 wide


class Tower(nn.Module):
    def __init__(self, width: int = 6):
        super().__init__()
        self.proj = nn.Linear(width, D)

    def forward(self, x):
        return F.normalize(self.proj(x), dim=-1)


class TextTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(20, D)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        return F.normalize((self.embedding(input_ids) * mask).sum(1) / mask.sum(1), dim=-1)


class Clip(nn.Module):
    """open_clip's CLIP in miniature: two towers, a log-scale and a bias, features and scale out."""

    def __init__(self):
        super().__init__()
        self.visual, self.text = Tower(), TextTower()
        self.logit_scale = nn.Parameter(torch.tensor(2.66))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, images, texts):
        return self.visual(images), self.text(**texts), self.logit_scale.exp()


def fixtures() -> dict:
    g = torch.Generator().manual_seed(0)

    def unit(n: int = N) -> torch.Tensor:
        return F.normalize(torch.randn(n, D, generator=g), dim=-1).requires_grad_()

    model = Clip()
    ids = torch.arange(N)
    texts = {
        "input_ids": torch.randint(1, 20, (N, 5), generator=g),
        "attention_mask": torch.ones(N, 5).long(),
    }
    names = [
        "image_features", "text_features", "a", "b", "queries", "keys", "z1", "z2", "features", "z",
        "z_v", "z_t", "z_v_aug", "z_t_aug", "zi_v", "zi_t", "zi_v_aug", "zi_t_aug", "embeddings",
    ]  # fmt: skip
    found = {name: unit() for name in names}
    found.update(
        torch=torch, tilecl=tilecl, model=model, hard=unit(3), labels=torch.arange(N) % 3,
        logit_scale=torch.tensor(14.3, requires_grad=True), scale=14.3, ids=ids, dataset=range(32),
        dataset_indices=torch.arange(N), log_u_rows=torch.zeros(N), log_u_cols=torch.zeros(N),
        image_tower=model.visual, text_tower=model.text, images=torch.randn(N, 6, generator=g), texts=texts,
        rank=0, world_size=1, num_samples=32, dp=1, tp=1,
    )  # fmt: skip
    return found


def _one_process_group(tmp_path: Path):
    real_init = dist.init_process_group

    def init_process_group(backend: str = "gloo", **_: object) -> None:
        # the README's torchrun launch, as one CPU process: gloo, a world of one
        real_init("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    def init_device_mesh(device_type: str, shape: tuple, mesh_dim_names: tuple) -> object:
        from torch.distributed.device_mesh import init_device_mesh as real

        return real("cpu", shape, mesh_dim_names=mesh_dim_names)

    return init_process_group, init_device_mesh


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_readme_python_block_runs(index, tmp_path, monkeypatch):
    block = BLOCKS[index]
    namespace = fixtures()
    distributed = "init_process_group" in block
    if distributed:
        init_process_group, init_device_mesh = _one_process_group(tmp_path)
        monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
        namespace["init_device_mesh"] = init_device_mesh
    try:
        exec(compile(block, f"README.md block {index}", "exec"), namespace)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def test_the_readme_has_its_python_blocks():
    assert len(BLOCKS) >= 6


def test_the_readme_links_resolve_on_an_index_page():
    """An index shows the README without the repository around it: every link and image is absolute,
    made from the one repository address (pyproject's ``Repository``), and names a file that exists."""
    import tomllib

    project = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]
    repository = project["urls"]["Repository"]
    raw = repository.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    blob = f"{repository}/blob/main/"
    for text, target in re.findall(r"\[([^\]]*)\]\(([^)\s]+)\)", README.read_text()):
        assert target.startswith(("https://", "#")), f"[{text}]({target}) is relative"
        for base in (blob, raw):
            if target.startswith(base):
                path = target[len(base) :].split("#")[0]
                assert (README.parent / path).exists(), f"[{text}]({target}): no {path} in the repository"
