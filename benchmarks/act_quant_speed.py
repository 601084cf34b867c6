"""Forward and backward time of one activation quantizer: the library's node against the plain
chain of torch operations it replaces, on a fixed step and on a learned one (LSQ).

Each shape is an activation (N×C×H×W, channels-last as the library runs them on a CPU); each
figure is 10 forward+backward calls, repeated ``--repeats`` times, node and chain alternated
so that both see the same state of the machine.

    python benchmarks/act_quant_speed.py 64x64x56x56 64x8x112x112
    python benchmarks/act_quant_speed.py 64x256x14x14 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from dsgonnx.refine.quantizers import ActQuant, round_ste

SCALE, ZERO, LOW, HIGH = 0.05, 0, 0, 15  # a 4-bit unsigned grid, as after a ReLU


def _chain(x: torch.Tensor, step: torch.Tensor | float) -> torch.Tensor:
    return (torch.clamp(round_ste(x / step) + ZERO, LOW, HIGH) - ZERO) * step


def _timed(call, device: torch.device, calls: int = 10) -> float:
    """Milliseconds per call of ``call`` (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000 / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="+", help="activation shapes, e.g. 64x64x56x56")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    for text in args.shapes:
        shape = tuple(int(v) for v in text.split("x"))
        x = torch.randn(shape, generator=generator).to(device)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn(shape, generator=generator).to(device)
        for learned in (False, True):
            quant = ActQuant(SCALE, ZERO, LOW, HIGH).to(device).train()
            if learned:
                quant.learn_step()

            def node() -> None:
                quant(x.clone().requires_grad_()).backward(grad)

            def chain() -> None:
                step = torch.exp(quant.log_step) if learned else SCALE
                _chain(x.clone().requires_grad_(), step).backward(grad)

            node(), chain()  # warm-up
            times = [(_timed(node, device), _timed(chain, device)) for _ in range(args.repeats)]
            print(f"{text} {'learned' if learned else 'fixed'} step: node "
                  + ", ".join(f"{a:.1f}" for a, _ in times) + " ms; chain "
                  + ", ".join(f"{b:.1f}" for _, b in times) + " ms", flush=True)


if __name__ == "__main__":
    main()
