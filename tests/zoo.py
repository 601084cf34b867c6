"""A test zoo of tiny real classifiers, exported the ways vendors export them.

Each builder writes an ONNX file and returns its path. The torch model behind them has
non-trivial BN statistics, so BN kept vs folded and wrong conversions are visible.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


class TinyNet(nn.Module):
    """Conv-BN-ReLU ×2, global average pool, linear head: 10 classes on 3×16×16."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x.mean((2, 3))
        return self.fc(x.reshape(x.shape[0], -1))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


class TinyResNet(nn.Module):
    """Stem, two residual units (one with a strided 1x1 shortcut), pool, linear: 3×16×16."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def conv_bn(cin, cout, k, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))

        self.stem = conv_bn(3, 8, 3)
        self.a1, self.a2 = conv_bn(8, 8, 3), conv_bn(8, 8, 3)
        self.b1, self.b2, self.short = conv_bn(8, 16, 3, 2), conv_bn(16, 16, 3), conv_bn(8, 16, 1, 2)
        self.fc = nn.Linear(16, classes)

    def features(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.a2(torch.relu(self.a1(x))))
        x = torch.relu(self.short(x) + self.b2(torch.relu(self.b1(x))))
        return x.mean((2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


class TinyMobile(nn.Module):
    """Stem, a depthwise 3x3 and a pointwise 1x1 (MobileNet's unit), pool, linear: 3×16×16."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1, groups=8, bias=False), nn.BatchNorm2d(8))
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, classes)

    def features(self, x):
        return torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.stem(x)))))).mean((2, 3))

    def forward(self, x):
        return self.fc(self.features(x))


def tiny_resnet(seed: int = 0, classes: int = 10) -> TinyResNet:
    torch.manual_seed(seed)
    return _randomized(TinyResNet(classes), seed)


def tiny_mobile(seed: int = 0) -> TinyMobile:
    torch.manual_seed(seed)
    return _randomized(TinyMobile(), seed)


def _randomized(net, seed: int):
    """``net`` with BN statistics and affine parameters drawn at random, its head set to separate samples."""
    with torch.no_grad():
        for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
        # a head that separates samples: a random net's pooled features barely vary, so
        # every input would get the same class; centre and amplify the head on N(0,1) inputs
        net.eval()
        features = net.features(torch.randn(512, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))
        net.fc.weight.mul_(4.0 / (features.std(0) * net.fc.weight.abs()).sum(1, keepdim=True))
        net.fc.bias.copy_(-net.fc.weight @ features.mean(0))
    return net


def _export_bn_kept(net: nn.Module, example: torch.Tensor, path: Path, output: str = "logits",
                    input_axes: dict | None = None) -> Path:
    """``net`` (eval mode) through the TorchScript exporter, opset 13, its BN layers kept, the
    batch dynamic (and the ``input_axes`` given)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(), (example,), str(path), dynamo=False, opset_version=13, input_names=["input"],
            output_names=[output], dynamic_axes={"input": input_axes or {0: "N"}, output: {0: "N"}},
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
        )
    return path


def export_tiny_resnet(path: Path) -> Path:
    """TinyResNet through the TorchScript exporter with its BN layers kept."""
    return _export_bn_kept(tiny_resnet(), _example(), path)


def export_tiny_mobile(path: Path) -> Path:
    """TinyMobile (a depthwise convolution) through the TorchScript exporter with its BN layers kept."""
    return _export_bn_kept(tiny_mobile(), _example(), path)


def decompose_bn(src: Path, dst: Path, style: str) -> Path:
    """Every BatchNormalization of ``src`` written as elementwise ops with per-channel constants:
    ``full`` Sub(μ) Div(√(σ²+ε)) Mul(γ) Add(β); ``mean`` Sub(μ) Mul(γ/√(σ²+ε)) Add(β) (a
    Keras-through-torch writer); ``affine`` Mul(s) Add(b) (dlib-style: no statistics left)."""
    model = onnx.load(str(src))
    values = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer}
    nodes, added = [], []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            nodes.append(node)
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        x, (gamma, beta, mean, var) = node.input[0], (values[n] for n in node.input[1:5])
        root = (node.name or node.output[0]).strip("/").replace("/", "_")
        std = np.sqrt(var + eps)
        consts = {"full": [("Sub", mean), ("Div", std), ("Mul", gamma), ("Add", beta)],
                  "mean": [("Sub", mean), ("Mul", gamma / std), ("Add", beta)],
                  "affine": [("Mul", gamma / std), ("Add", beta - mean * gamma / std)]}[style]
        current = x
        for index, (op, array) in enumerate(consts):
            name = f"{root}_{op.lower()}{index}"
            added.append(numpy_helper.from_array(array.reshape(1, -1, 1, 1).astype(np.float32), f"{name}_c"))
            out = node.output[0] if index == len(consts) - 1 else f"{name}_out"
            nodes.append(helper.make_node(op, [current, f"{name}_c"], [out], name=name))
            current = out
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used] + added
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, str(dst))
    return dst


def export_tiny_binary(path: Path, sigmoid: bool = False) -> Path:
    """TinyResNet with a one-output head (a logit, or its sigmoid), BN kept."""
    net = tiny_resnet(classes=1)
    return _export_bn_kept(nn.Sequential(net, nn.Sigmoid()) if sigmoid else net, _example(), path, output="score")


class ChannelsLast(nn.Module):
    """A net taking N×H×W×C images, as TensorFlow exports do (a Transpose first)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))


def export_tiny_nhwc(path: Path, dynamic_hw: bool = False) -> Path:
    """TinyResNet behind an NHWC input (16×16×3), BN kept, like a tf2onnx export."""
    return _export_bn_kept(ChannelsLast(tiny_resnet()), _example().permute(0, 2, 3, 1), path,
                           input_axes={0: "N", 1: "H", 2: "W"} if dynamic_hw else None)


class Pixels(nn.Module):
    """``net`` behind 8-bit pixels it normalises itself (a Cast, a Sub and a Div first), as
    exports that take images as they are decoded; channels last with ``nhwc``."""

    def __init__(self, net: nn.Module, nhwc: bool = False):
        super().__init__()
        self.net, self.nhwc = net, nhwc

    def forward(self, x):
        x = x.permute(0, 3, 1, 2) if self.nhwc else x
        return self.net((x.float() - 127.5) / 64.0)


def export_tiny_uint8(path: Path, nhwc: bool = False) -> Path:
    """TinyResNet behind a uint8 input (N×3×16×16, or N×16×16×3 with ``nhwc``), BN kept."""
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return _export_bn_kept(Pixels(tiny_resnet(), nhwc), pixels.permute(0, 2, 3, 1) if nhwc else pixels, path)


def _example() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16)


def export_torchscript(path: Path, *, keep_bn: bool, opset: int = 13, dynamic_hw: bool = False) -> Path:
    """TorchScript exporter; ``keep_bn`` = training=PRESERVE without constant folding."""
    axes = {"input": {0: "N", 2: "H", 3: "W"} if dynamic_hw else {0: "N"}, "logits": {0: "N"}}
    kwargs = dict(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False) if keep_bn else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            tiny_net(), (_example(),), str(path), dynamo=False, opset_version=opset,
            input_names=["input"], output_names=["logits"], dynamic_axes=axes, **kwargs,
        )
    return path


def export_dynamo(path: Path, *, opset: int = 18, keep_bn: bool = True) -> Path:
    """torch's dynamo exporter (opset >= 18); optimize=False keeps the BN nodes."""
    batch = torch.export.Dim("batch", min=1, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            tiny_net(), (_example(),), str(path), dynamo=True, opset_version=opset, optimize=not keep_bn,
            input_names=["input"], output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False,
        )
    return path


class TinyViT(nn.Module):
    """A vision transformer in miniature: 4×4 patches of 3×16×16, a class token, two pre-norm
    encoder layers (LayerNorm, attention, GELU), 10 classes. No BatchNorm anywhere."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, width, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, 17, width) * 0.1)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        with torch.no_grad():  # (its layers are copies of one: ORT's optimiser would share their equal weights)
            for parameter in self.encoder.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.encoder(x)[:, 0]))


def export_tiny_vit(path: Path, opset: int = 17, batch: int | None = None) -> Path:
    """TinyViT (seed 0) by the TorchScript exporter: LayerNormalization nodes from opset 17;
    the batch dynamic, or fixed at ``batch`` (as exports without dynamic axes are)."""
    torch.manual_seed(0)
    axes = None if batch else {"input": {0: "N"}, "logits": {0: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyViT().eval(), (_example()[: batch or 2],), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"], dynamic_axes=axes)
    return path


class TinyConvNeXt(nn.Module):
    """A ConvNeXt block in miniature: a 4×4 patch stem, a 7×7 depthwise conv, LayerNorm and a
    GELU MLP over channels last (MatMul + Add on 4-D tensors), a residual, 10 classes."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 4, 4)
        self.depthwise = nn.Conv2d(width, width, 7, padding=3, groups=width)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.mlp(self.norm(self.depthwise(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.head((x + y).mean((2, 3)))


def export_tiny_convnext(path: Path, batch: int = 1) -> Path:
    """TinyConvNeXt (seed 0) by the TorchScript exporter at opset 17, the batch fixed at
    ``batch`` (no dynamic axes, as vendors often export)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyConvNeXt().eval(), (torch.randn(batch, 3, 16, 16),), str(path), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"])
    return path


def with_constant_weights(src: Path, dst: Path) -> Path:
    """Move every initializer into a Constant node (some converters emit weights that way)."""
    model = onnx.load(str(src))
    constants = [
        helper.make_node("Constant", [], [t.name], name=f"const_{i}", value=copy.deepcopy(t))
        for i, t in enumerate(model.graph.initializer)
    ]
    names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in names]
    del model.graph.initializer[:]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(constants + nodes)
    onnx.save(model, str(dst))
    return dst


def with_external_data(src: Path, dst: Path, location: str = "weights.bin") -> Path:
    model = onnx.load(str(src))
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return dst


def reference_logits(images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return tiny_net()(torch.from_numpy(images)).numpy()


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 13, ir_version: int | None = None):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
        if ir_version < 4:  # IR 3 requires initializers to be listed as graph inputs (old exporters)
            graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer)
            model.graph.CopyFrom(graph)
    return model
