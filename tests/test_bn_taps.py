"""BN targets and probes: statistics read from both kinds of converted BN, hooks on BN inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from dsgonnx.graph.bn_taps import BNProbe, find_bn_layers
from dsgonnx.graph.onnx_io import load_model
from dsgonnx.graph.to_torch import check_parity, to_torch
from zoo import export_torchscript, tiny_net


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    return export_torchscript(tmp_path_factory.mktemp("bn") / "kept.onnx", keep_bn=True)


def test_layers_carry_names_channels_and_statistics(kept):
    model = to_torch(load_model(kept))
    layers = find_bn_layers(model)
    graph_names = [n.name for n in onnx.load(str(kept)).graph.node if n.op_type == "BatchNormalization"]
    assert [layer.name for layer in layers] == graph_names
    net = tiny_net()
    for layer, bn in zip(layers, (net.bn1, net.bn2)):
        assert isinstance(model.submodule(layer.name), torch.nn.BatchNorm2d)
        assert layer.channels == bn.num_features
        np.testing.assert_allclose(layer.running_mean, bn.running_mean.numpy())
        np.testing.assert_allclose(layer.running_var, bn.running_var.numpy())
        assert layer.eps == pytest.approx(bn.eps)


@pytest.mark.parametrize("slots", [(1,), (3, 4)], ids=["computed-scale", "computed-statistics"])
def test_functional_bn_is_tapped_too(kept, tmp_path, slots):
    """A BN input computed at run time makes onnx2torch build a functional module instead
    of nn.BatchNorm2d; statistics (read from initializers or from a forward pass) and
    hooks must still work. Each routed input is ``value + 0 * max(x)``: same numbers, but
    not foldable into a constant."""
    model = onnx.load(str(kept))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    zero = numpy_helper.from_array(np.zeros((), dtype=np.float32), "zero")
    model.graph.initializer.append(zero)
    nodes = [helper.make_node("ReduceMax", ["input"], ["x_max"], keepdims=0, name="x_max"),
             helper.make_node("Mul", ["x_max", "zero"], ["x_zero"], name="x_zero")]
    for slot in slots:
        routed = bn.input[slot] + "_routed"
        nodes.append(helper.make_node("Add", [bn.input[slot], "x_zero"], [routed], name=f"route{slot}"))
        bn.input[slot] = routed
    for node in reversed(nodes):
        model.graph.node.insert(0, node)
    path = tmp_path / "functional.onnx"
    onnx.save(model, str(path))
    torch_model = to_torch(load_model(path))
    check_parity(torch_model)
    layers = find_bn_layers(torch_model)
    assert not isinstance(torch_model.submodule(layers[0].name), torch.nn.BatchNorm2d)
    assert isinstance(torch_model.submodule(layers[1].name), torch.nn.BatchNorm2d)
    net = tiny_net()
    np.testing.assert_allclose(layers[0].running_mean, net.bn1.running_mean.numpy())
    np.testing.assert_allclose(layers[0].running_var, net.bn1.running_var.numpy())
    assert layers[0].channels == 8
    _assert_probe_sees_bn_inputs(torch_model, layers)


def _assert_probe_sees_bn_inputs(model, layers):
    net = tiny_net()
    images = torch.randn(3, 3, 16, 16)
    seen = {}
    with BNProbe(model, layers, lambda layer, x: seen.__setitem__(layer.name, x.detach().clone())):
        model(images)
    with torch.no_grad():
        first = net.conv1(images)
        second = net.conv2(torch.relu(net.bn1(first)))
    torch.testing.assert_close(seen[layers[0].name], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen[layers[1].name], second, atol=1e-5, rtol=1e-5)
    seen.clear()
    model(images)  # hooks are gone after the context
    assert not seen


def test_probe_sees_bn_inputs_with_gradients(kept):
    model = to_torch(load_model(kept))
    layers = find_bn_layers(model)
    _assert_probe_sees_bn_inputs(model, layers)
    # the probe is differentiable: a loss on BN inputs reaches the images (what synthesis needs)
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    captured = []
    with BNProbe(model, layers, lambda layer, x: captured.append(x)):
        model(images)
    sum(x.mean() for x in captured).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
