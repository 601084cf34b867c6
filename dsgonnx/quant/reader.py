"""Feed calibration images to ONNX Runtime's calibrators."""

from __future__ import annotations

import numpy as np
from onnxruntime.quantization import CalibrationDataReader


class ArrayReader(CalibrationDataReader):
    """Batches of an in-memory NCHW array under the model's input name."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int, dtype=np.float32):
        self.input_name = input_name
        self.images = images.astype(dtype, copy=False)
        self.batch_size = max(1, batch_size)
        self.rewind()

    def rewind(self) -> None:
        self._next = 0

    def get_next(self):
        if self._next >= len(self.images):
            return None
        batch = self.images[self._next : self._next + self.batch_size]
        self._next += self.batch_size
        return {self.input_name: batch}

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.images = self.images[start_index:end_index]
        self.rewind()
