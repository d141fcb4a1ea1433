"""Device and torch.distributed plumbing shared by both stages (torchrun, never a home-made one)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from kdcache.cache.errors import KdcacheError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Who we are in a torchrun job (rank 0 of 1 without one) and where we compute."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA when present (one GPU per local rank), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KdcacheError(
            f"unknown --device {name!r}; expected auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(f"--device {name!r} asked for CUDA but no GPU is available")
    return device


def init_runtime(device: str = "auto") -> Runtime:
    """Join the torchrun process group when WORLD_SIZE > 1: gloo on CPU; on CUDA nccl for
    CUDA tensors and gloo for CPU ones (metric sums and flags are small host tensors)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        log.info("rank %d/%d joined the %s process group", rank, world, backend)
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def barrier(rt: Runtime) -> None:
    """Wait for every rank (no-op in a single process)."""
    if rt.distributed and dist.is_initialized():
        dist.barrier()


def broadcast_object(rt: Runtime, obj):
    """Rank 0's object on every rank; used to share an error or a path decided on rank 0."""
    if not rt.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_then_others(rt: Runtime, first, others):
    """`first()` on rank 0 (e.g. create a cache under the writer lock), then, after a
    barrier, `others()` on every other rank; a KdcacheError of rank 0 is raised on every
    rank with the same one-line message (no rank waits forever)."""
    out, err = None, None
    if rt.is_main:
        try:
            out = first()
        except KdcacheError as e:
            err = str(e)
    err = broadcast_object(rt, err)
    if err:
        raise KdcacheError(err)
    barrier(rt)
    return out if rt.is_main else others()


def shutdown(rt: Runtime) -> None:
    """Leave the process group so torchrun exits cleanly."""
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def deterministic_kernels(device: torch.device) -> None:
    """Stage 1 on CUDA: the same kernels for the same shapes in every run (no cudnn.benchmark
    autotuning, which may time a different algorithm each run; deterministic cuBLAS/cuDNN
    algorithms; ops without one warn once). CPU kernels are chosen by shape already."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def forward(model: torch.nn.Module, batch) -> torch.Tensor:
    """Teacher/student call for image tensors and tokenized text alike."""
    if isinstance(batch, dict):
        return model(batch["input_ids"], batch["attention_mask"])
    return model(batch)


def to_device(batch, device: torch.device):
    """Move a view batch (tensor or dict of tensors) to the compute device."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def write_run_config(path, options: dict, command: str) -> None:
    """Write a run's resolved options as YAML (atomically), so that
    `kdcache COMMAND --config PATH` repeats the run. No-op when there are none."""
    if not options:
        return
    from pathlib import Path

    import yaml

    path = Path(path)
    text = (
        f"# kdcache {command}: resolved options of this run (file, flags and defaults).\n"
        f"# Repeat it with: kdcache {command} --config {path}  (flags override it)\n"
        + yaml.safe_dump(options, sort_keys=False, default_flow_style=None)
    )
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
