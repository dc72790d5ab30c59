"""Image decoding: 16-bit PNGs, resize modes."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from npidbench.data.images import EvalTransform, decode_rgb, normalize_batch


def test_16bit_png_is_rescaled_to_8bit(tmp_path):
    grey = np.full((8, 10), 32768, dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    image = decode_rgb(tmp_path / "g16.png")
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 10)
    assert 120 <= int(image.float().mean()) <= 135


def test_transforms_shapes_and_normalisation(tmp_path):
    Image.fromarray(np.zeros((30, 60, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    image = decode_rgb(tmp_path / "x.png")
    assert EvalTransform(20, 16, "center-crop")(image).shape == (3, 16, 16)
    assert EvalTransform(20, 16, "squash")(image).shape == (3, 16, 16)
    batch = normalize_batch(EvalTransform(20, 16)(image)[None])
    torch.testing.assert_close(batch[0, 0, 0, 0], torch.tensor(-0.485 / 0.229))
