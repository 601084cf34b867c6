"""Fold the BatchNorm layers of the shared BN-kept models into their convolutions, as vendors ship them.

ONNX Runtime's basic graph optimisations (``ORT_ENABLE_BASIC``: constant folding, Conv+BN,
Conv+Add, Conv+Mul fusion, standard ONNX ops only) write the graph a folded vendor export
has: every BatchNormalization gone, each Conv with the folded weight and bias. The script
then proves FP32 parity with the BN-kept file, run with every optimisation off (BN computed
as BN), on real labelled images (top-1 agreement and the largest logit difference) and
refuses to write a twin that disagrees.

Outputs (next to this script unless ``--out-dir``), each from ../shared/models:
  cifar10_resnet20.folded.onnx         from cifar10_resnet20.onnx (19 BN)
  cifar10_resnet56.folded.onnx         from cifar10_resnet56.onnx (55 BN)
  mobilenet_v1_0.25.folded.onnx        from imagenet_mobilenet_v1_0.25.onnx (27 BN)
  mobilenet_v1_0.75.folded.onnx        from imagenet_mobilenet_v1_0.75.onnx (27 BN)
(EfficientNet-Lite0's folded twin comes from its own export, models/export_efficientnet_lite0.py.)

Usage: python models/fold_bn.py [--out-dir DIR] [--skip-existing] [--only NAME[,NAME]]
"""

import argparse
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(os.path.dirname(HERE), "..", "shared")
# twin name -> (BN-kept file under ../shared/models, labelled images, (mean, std) of pixels in [0, 1])
IMAGENET, INCEPTION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
MODELS = {
    "cifar10_resnet20": ("cifar10_resnet20.onnx", "cifar10-test", IMAGENET),
    "cifar10_resnet56": ("cifar10_resnet56.onnx", "cifar10-test", IMAGENET),
    "mobilenet_v1_0.25": ("imagenet_mobilenet_v1_0.25.onnx", "imagenet-samples", INCEPTION),
    "mobilenet_v1_0.75": ("imagenet_mobilenet_v1_0.75.onnx", "imagenet-samples", INCEPTION),
}
PARITY_IMAGES = 200
MAX_LOGIT_DIFF = 1e-3  # relative to the largest |logit|


def fold(source: str, target: str) -> onnx.ModelProto:
    """Write ``source`` with BN folded to ``target`` (through a temporary file) and return it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory() as scratch:
        options.optimized_model_filepath = os.path.join(scratch, "folded.onnx")
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath)
    left = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    if left:
        raise RuntimeError(f"{source}: ORT left {len(left)} BatchNormalization nodes unfolded ({left[:3]}...)")
    onnx.checker.check_model(model)
    return model


def load_images(data: str, count: int, size: int, normalisation) -> np.ndarray:
    """``count`` labelled images spread over the sorted class folders of ``data``: shorter side
    resized to size/0.875 (bilinear), centre crop, (pixels/255 - mean)/std, NCHW float32."""
    from PIL import Image

    files = sorted(os.path.join(root, name) for root, _, names in os.walk(data) for name in names
                   if name.lower().endswith((".jpg", ".jpeg", ".png")))
    chosen = files[:: max(1, len(files) // count)][:count]
    resize = int(size / 0.875) if size > 32 else size
    mean, std = (np.asarray(v, np.float32).reshape(3, 1, 1) for v in normalisation)
    batch = []
    for file in chosen:
        image = Image.open(file).convert("RGB")
        scale = resize / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32).transpose(2, 0, 1) / 255.0
        batch.append((pixels - mean) / std)
    return np.stack(batch).astype(np.float32)


def parity(kept: str, folded: onnx.ModelProto, images: np.ndarray) -> dict:
    """Top-1 agreement and the largest relative logit difference of the folded graph against
    the BN-kept file run with every optimisation off (BN computed as BN)."""
    unfused = ort.SessionOptions()  # ORT would otherwise fuse BN the same way
    unfused.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = ort.InferenceSession(kept, unfused, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    ya = a.run(None, {a.get_inputs()[0].name: images})[0].reshape(len(images), -1)
    yb = b.run(None, {b.get_inputs()[0].name: images})[0].reshape(len(images), -1)
    diff = float(np.abs(ya - yb).max() / np.abs(ya).max())
    return {"images": len(images), "agreement": float((ya.argmax(1) == yb.argmax(1)).mean()), "max_rel_diff": diff}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=HERE)
    parser.add_argument("--skip-existing", action="store_true")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(MODELS)}")
    args = parser.parse_args(argv)

    names = args.only.split(",") if args.only else list(MODELS)
    for name in names:
        if name not in MODELS:
            print(f"fold_bn: unknown model {name!r}; choose from {', '.join(MODELS)}", file=sys.stderr)
            return 2
        file, data, normalisation = MODELS[name]
        source = os.path.join(SHARED, "models", file)
        target = os.path.join(args.out_dir, f"{name}.folded.onnx")
        if args.skip_existing and os.path.exists(target):
            print(f"{target} exists; skipped")
            continue
        if not os.path.exists(source):
            print(f"fold_bn: {source} not found (../shared/models is needed)", file=sys.stderr)
            return 2
        kept_bn = sum(n.op_type == "BatchNormalization" for n in onnx.load(source).graph.node)
        model = fold(source, target)
        size = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
        check = parity(source, model, load_images(os.path.join(SHARED, "datasets", data), PARITY_IMAGES, size,
                                                  normalisation))
        if check["agreement"] < 1.0 or check["max_rel_diff"] > MAX_LOGIT_DIFF:
            print(f"fold_bn: {name}: the folded graph disagrees with {file} ({check}); not written", file=sys.stderr)
            return 1
        with tempfile.NamedTemporaryFile(dir=args.out_dir, suffix=".onnx", delete=False) as handle:
            handle.write(model.SerializeToString())
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, target)
        print(f"{target}: {kept_bn} BN folded; on {check['images']} real images top-1 agreement "
              f"{100 * check['agreement']:.1f}%, largest logit difference {check['max_rel_diff']:.1e} of the largest logit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
