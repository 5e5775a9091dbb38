"""DDP and FSDP2 training of a converted model on 2 CPU processes (gloo, 127.0.0.1 only)
gives the parameters of one process training on the full batch."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import entskip
from entskip import models

from conftest import assert_close

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLD = 2
STEPS = 3
BATCH = 8  # per step, split evenly over the ranks
LR = 0.5
TIMEOUT_S = 60


def _model(learnable_alpha: bool):
    """A converted ViT with learnable block values and alphas (both sharded by FSDP2: an
    alpha is stored with shape ``(1,)``, as ``fully_shard`` rejects 0-d parameters); the
    layout stays in buffers."""
    torch.manual_seed(0)
    model = models.ViT(image_size=8, patch_size=4, num_classes=5, dim=32, depth=2, num_heads=2)
    return entskip.entangle(
        model, "sparse", density=0.5, block=8, learnable=True, learnable_alpha=learnable_alpha, alpha_min=0.8
    )


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 8, 8, generator=gen), torch.randint(0, 5, (BATCH,), generator=gen)) for _ in range(STEPS)]


def _train(model, params, rank=0, world=1):
    """``STEPS`` SGD steps, rank ``rank`` of ``world`` taking its contiguous slice of each batch."""
    opt = torch.optim.SGD(params, lr=LR)
    per_rank = BATCH // world
    for x, target in _batches():
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        opt.zero_grad()
        F.cross_entropy(model(x[part]), target[part]).backward()
        opt.step()


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor  # torch >= 2.5
    except ImportError:
        from torch.distributed._tensor import DTensor
    return DTensor


def _layout_buffers(model):
    return {n: b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in ("crow_indices", "col_indices", "ccol_indices", "row_indices", "perm")}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(_model(learnable_alpha=True))
        _train(ddp, ddp.parameters(), rank, WORLD)
        ddp_params = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}

        fully_shard, DTensor = _fully_shard(), _dtensor_type()
        model = _model(learnable_alpha=True)
        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        layout = _layout_buffers(model)
        assert len(layout) == 5 * 2 * len(model.blocks)
        for name, buf in layout.items():
            assert type(buf) is torch.Tensor, f"layout buffer {name} is a {type(buf).__name__}"
        assert isinstance(model.blocks[0].skip_attn.mapping.blocks, DTensor), "FSDP2 did not shard the mapping values"
        assert isinstance(model.blocks[0].skip_attn.alpha, DTensor), "FSDP2 did not shard the learnable alpha"
        _train(model, model.parameters(), rank, WORLD)
        for name, buf in _layout_buffers(model).items():
            assert type(buf) is torch.Tensor and torch.equal(buf, layout[name]), f"layout buffer {name} changed"
        fsdp_params = {n: p.full_tensor() for n, p in model.named_parameters()}
        torch.save({"ddp": ddp_params, "fsdp": fsdp_params}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_match_single_process_training(tmp_path):
    workers = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not workers.join(timeout=max(deadline - time.monotonic(), 0.1)):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"the {WORLD} workers did not finish within {TIMEOUT_S} s")

    single = _model(learnable_alpha=True)
    initial = {n: p.detach().clone() for n, p in single.named_parameters()}
    _train(single, single.parameters())
    expected = dict(single.named_parameters())
    moved = {n for n, p in expected.items() if not torch.equal(p, initial[n])}
    assert {"blocks.0.skip_attn.mapping.blocks", "blocks.1.skip_mlp.alpha"} <= moved
    for mode in ("ddp", "fsdp"):
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"rank{rank}.pt")[mode]
            assert got.keys() == expected.keys()
            for name, param in expected.items():
                assert_close(got[name], param, torch.float32, f"rank {rank} {mode} {name}")
