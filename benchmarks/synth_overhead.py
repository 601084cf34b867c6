"""Seconds per synthesis iteration vs a plain forward+backward of the same batch.

The hooks and losses of synthesis should be nearly free: the target is a ratio within
1.3× of a plain fwd+bwd (gradient w.r.t. the images only, parameters frozen, same memory
format and device). Prints one line per method: seconds per iteration, samples per second
(samples optimised × iterations / seconds, as the batch is), and the ratio. ``--methods``
takes any iterative method (zeroq, dsg, inversion); on CUDA the loss is read every 16
iterations, so give ``--iters`` of 16 or more there.

    python benchmarks/synth_overhead.py ../shared/models/cifar10_resnet20.onnx --batch 64
    python benchmarks/synth_overhead.py models/efficientnet_lite0.onnx --batch 32 --iters 5
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default="zeroq,dsg")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch

    from dsgonnx.graph.onnx_io import load_model
    from dsgonnx import PRESETS, SynthConfig, synthesize
    from dsgonnx.graph.to_torch import resolve_device, to_torch

    device = resolve_device(args.device)
    model = to_torch(load_model(args.model))
    module = model.module.to(device)
    channels_last = device.type == "cpu"
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    for param in module.parameters():
        param.requires_grad_(False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(args.batch, *model.loaded.input.chw, device=device).contiguous(memory_format=fmt)
    images.requires_grad_(True)

    def step():
        images.grad = None
        output = module(images)
        (output[0] if isinstance(output, (tuple, list)) else output).float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    plain = (time.perf_counter() - start) / args.iters
    print(f"{args.model}: batch {args.batch} on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"plain fwd+bwd      {plain:.4f} s/iter   {args.batch / plain:8.1f} samples/s")
    for method in args.methods.split(","):
        config = SynthConfig(method=method, num_samples=args.batch, batch_size=args.batch, iters=args.iters + 2,
                             device=args.device, preprocess=PRESETS["imagenet"], patience=10**6)
        result = synthesize(model, config, holdout=0)  # one batch of --batch samples, timed
        per_iter = result.meta["seconds_per_iter"]
        similarity = result.meta["diversity"].get("sample_similarity")
        print(f"{method:<18} {per_iter:.4f} s/iter   {args.batch / per_iter:8.1f} samples/s   ratio "
              f"{per_iter / plain:.2f}x" + (f" (sample_similarity {similarity:.4f})" if similarity is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
