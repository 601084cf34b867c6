"""Data parallel training over torchrun's ranks (:mod:`dsgonnx.distributed`), for QAT and
reconstruction: every rank draws the same batch, trains on its share of it (every ``size``-th
sample from its rank on), and one all-reduce per step sums the ranks' gradients, each rank's
loss weighted by its share of the batch, so every rank takes the step one process takes on
the whole batch (the same to float rounding)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..quant.placement import Placement


def run_digest(model_path: Path, settings: dict, placement: Placement, *extra) -> str:
    """A digest of what shapes a training run: the model file, ``settings``, the activation
    grids and ``extra`` (JSON-able) — what the ranks must agree on, and what a checkpoint is
    made from."""
    digest = hashlib.sha256(Path(model_path).read_bytes())
    grids = sorted((name, g.scale, g.zero_point, g.low, g.high) for name, g in placement.activations.items())
    digest.update(json.dumps([settings, grids, *extra], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def images_digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.float32).tobytes()).hexdigest()


class Ranks:
    """Which samples of each batch are this rank's, and the one all-reduce per step that sums
    the weighted gradients of ``parameters`` and shares the flags. ``flag``: the option that
    sets the batch size, named when a batch is too small to share."""

    def __init__(self, world, parameters: list, batch: int, what: str, flag: str):
        if batch < world.size:
            raise DataError(f"{what}: a batch of {batch} samples cannot be shared by {world.size} ranks; "
                            f"raise {flag} to {world.size} or more")
        self.world, self.parameters, self.batch = world, parameters, batch

    def share(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.world.rank :: self.world.size]

    def weight(self, count: int) -> float:
        """This rank's loss weight: its share of the whole batch."""
        return count / self.batch

    def reduce(self, loss: float = 0.0, failed: bool = False, stop: bool = False) -> tuple[float, bool, bool]:
        """Sum every rank's gradients (in place) and weighted ``loss``; (the whole batch's loss,
        whether any rank's loss was not finite, whether any rank asked to stop)."""
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        flags = torch.tensor([0.0 if failed else loss, float(failed), float(stop)],
                             dtype=grads[0].dtype, device=grads[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [flags])
        dist.all_reduce(flat)
        offset = 0
        for parameter, grad in zip(self.parameters, grads):
            parameter.grad = flat[offset : offset + grad.numel()].view_as(grad)
            offset += grad.numel()
        total, any_failed, any_stop = flat[offset:].tolist()
        return total, any_failed > 0, any_stop > 0
