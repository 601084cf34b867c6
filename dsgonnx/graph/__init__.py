"""Model front end: load and check ONNX, convert to torch, find BatchNorm layers.

``onnx_io`` needs only onnx/numpy; ``to_torch`` and ``bn_taps`` import torch.
"""
