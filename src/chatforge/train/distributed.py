"""Data parallelism through PyTorch's own engine: DDP and FSDP2, started by `torchrun`.

    torchrun --nproc_per_node 2 -m chatforge pretrain --config configs/demo.toml train.parallel=ddp

torchrun starts one process a rank and sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address;
`setup` joins the process group (gloo on CPU, nccl on CUDA). Every rank holds the model (DDP) or a
shard of it (FSDP), computes the loss of its own slice of the batch, and the backward pass averages the
gradients across ranks, so every rank takes the same optimizer step:

    g = (1/N) Σ_r ∇L_r(θ)          (N ranks, L_r the mean loss of rank r's slice)

`train.batch_size` is the global micro-batch: rank r takes sequences r, r+N, r+2N, ... of it
(`rank_slice`), so a run gives the same numbers on 1 rank or N (for the next-token loss, where every
sequence has the same number of targets; a masked loss averages per rank first).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket

import torch
import torch.distributed as dist

from chatforge.errors import ChatforgeError

PARALLEL = ("none", "ddp", "fsdp")


def rank_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (0, 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def rank_slice(items, rank: int | None = None, world: int | None = None):
    """Rank r's stride of a global batch: items r, r + N, r + 2N, ..."""
    if rank is None or world is None:
        rank, world = rank_world()
    return items[rank::world]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(parallel: str, device: torch.device, timeout_s: float = 300) -> None:
    """Join the process group torchrun described, or make a group of one (so a sharded checkpoint can be
    resumed by a single process). `timeout_s`: a collective that waits longer than this fails instead
    of hanging (a crashed rank)."""
    if parallel not in PARALLEL:
        raise ChatforgeError(f"train.parallel must be one of {', '.join(PARALLEL)}, got '{parallel}'")
    if parallel == "none":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ChatforgeError("started by torchrun with several ranks but train.parallel=none; "
                                 "add train.parallel=ddp or train.parallel=fsdp")
        return
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # not under torchrun: one rank
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def local_device(device: torch.device) -> torch.device:
    """cuda:LOCAL_RANK on a multi-GPU machine; the device as it is otherwise."""
    if device.type == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(model: torch.nn.Module, parallel: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The module the training step calls. DDP: a replica whose backward all-reduces gradients in buckets.
    FSDP2: each transformer block, then the whole model, is sharded (`fully_shard`); parameters are
    all-gathered for a block's forward and backward and freed after, gradients are reduce-scattered.
    With bf16, FSDP2 keeps fp32 master shards and computes in bf16 (MixedPrecisionPolicy)."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in blocks_of(model):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    return model


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a model or of a model with a head (classifier, reward model, value head)."""
    body = getattr(model, "body", model)
    return list(getattr(body, "blocks", []))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, parallel: str, sync: bool):
    """Accumulation: only the last micro-batch of a step communicates. DDP: `no_sync()`; FSDP2:
    `set_requires_gradient_sync(False)` (gradients stay unsharded and local until the last one)."""
    if sync or parallel == "none":
        yield
    elif parallel == "ddp":
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def mean_across_ranks(value: float) -> float:
    """The average of a number over ranks (the logged loss is the global batch's)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(model: torch.nn.Module) -> None:
    """g ← (1/N) Σ_r g_r, by hand, for a stage whose loss does not go through a DDP wrapper (RL)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
