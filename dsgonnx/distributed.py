"""Synthesis over several processes, GPUs or nodes, launched by ``torchrun``.

``torchrun --nproc-per-node N $(which dsgonnx) synthesize MODEL -o set.npz ...`` starts N
copies of the command with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and a rendezvous address
in the environment; ``torchrun --nnodes M --node-rank K --rdzv-endpoint HOST:PORT ...`` does
the same across machines. :func:`join` turns that environment into a process group (NCCL
where the ranks synthesize on CUDA, gloo on CPU); without it (``WORLD_SIZE`` unset or 1)
everything here is a no-op and dsgonnx runs as one process.

The work is split by whole synthesis batches (a batch is the unit DSG's sample correlation
inhibition couples), handed out round-robin; each batch draws its randomness from
``(seed, first sample)`` alone, so the set does not depend on how many ranks made it as long
as the batches are the same (see :func:`dsgonnx.synth.generator.synthesize`). Every rank
ends with the whole set; rank 0 alone writes files.

Failures are collective: a rank's error is exchanged with the others at the next meeting
point (:func:`exchange`), and every rank then stops with one line naming the rank and its
error, so no rank waits forever and nothing is half-written. A rank that dies outright is
torchrun's to handle: it stops the other ranks.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

from .errors import DataError, SynthesisError

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=30)  # a rank that never reaches a meeting point


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    backend: str


_WORLD: Optional[World] = None


def launched() -> bool:
    """True when this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise DataError(f"WORLD_SIZE must be a whole number, got {os.environ['WORLD_SIZE']!r}") from None


def join(cuda: bool) -> Optional[World]:
    """The process group this process belongs to (joined on first call), or None when it runs
    alone. ``cuda``: the ranks synthesize on GPUs (NCCL, one GPU per local rank)."""
    global _WORLD
    if _WORLD is not None or not launched():
        return _WORLD
    import torch
    import torch.distributed as dist

    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise DataError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set: "
                        "launch several ranks with torchrun")
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "nccl" if cuda else "gloo"
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise DataError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                            "give torchrun --nproc-per-node at most the number of GPUs")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    return _WORLD


def join_device(device: str) -> Optional[World]:
    """:func:`join` for a ``device`` setting (``auto``, ``cpu``, ``cuda``): NCCL where it
    resolves to CUDA. Imports torch only when launched."""
    if _WORLD is not None or not launched():
        return _WORLD
    from .graph.to_torch import resolve_device

    return join(resolve_device(device).type == "cuda")


def world() -> Optional[World]:
    """The joined process group, or None."""
    return _WORLD


def is_writer() -> bool:
    """True on the process that writes files: rank 0, or the only process."""
    return _WORLD is None or _WORLD.rank == 0


def exchange(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` when alone."""
    if _WORLD is None:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * _WORLD.size
    dist.all_gather_object(gathered, value)
    return gathered


def together(work: Callable[[], T]) -> T:
    """Run ``work`` on every rank and return this rank's result. An error on any rank stops
    every rank: the failing rank raises its own error, the others a SynthesisError that names
    it (only the error messages travel between ranks)."""
    try:
        mine, error = work(), None
    except Exception as exc:  # noqa: BLE001 - carried to the other ranks, then raised again here
        mine, error = None, exc
    if _WORLD is not None:
        messages = exchange(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if failed and error is None:
            rank, message = failed[0]
            raise SynthesisError(f"rank {rank} of {_WORLD.size} failed ({message}); every rank stops")
    if error is not None:
        raise error
    return mine


def agree(what: str, value: Any) -> None:
    """Every rank must hold the same ``value`` (its settings, its model); else every rank
    stops with a DataError naming the first rank that differs from rank 0."""
    values = exchange(value)
    differing = [rank for rank, other in enumerate(values) if other != values[0]]
    if differing:
        raise DataError(f"the ranks disagree on {what}: rank {differing[0]} differs from rank 0; "
                        "launch every rank with the same command and files")


__all__ = ["World", "agree", "exchange", "is_writer", "join", "join_device", "launched", "together", "world"]
