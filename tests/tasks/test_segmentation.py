"""The segmentation transfer against mmseg 0.x as mmselfsup ran it (PROTOCOLS.md "Segmentation"):
the loss average, the train pipeline (resize, crop, photometric distortion, padding after
normalisation) and the heads' align_corners. Expected values are worked out by hand in comments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from npidbench.backbones.resnet import build_resnet
from npidbench.data.images import normalize_batch
from npidbench.runner import RunRequest, run_task
from npidbench.tasks import segmentation as seg_task
from npidbench.transfer import seg_data
from npidbench.transfer.seg_data import SegAugment, augment_pair, collate_seg, photometric_distortion
from npidbench.transfer.segmentation import FCNSegmenter, segmentation_loss


class Scripted:
    """A stand-in for the numpy Generator the pipeline draws from: ``random()`` answers the coins
    in order, ``uniform`` one fixed value, ``integers`` the scripted integers in order."""

    def __init__(self, coins=(), uniform: float = 1.0, integers=()) -> None:
        self.coins, self.value, self.ints = list(coins), uniform, list(integers)

    def random(self) -> float:
        return self.coins.pop(0)

    def uniform(self, low: float, high: float) -> float:
        return self.value

    def integers(self, low: int, high: int | None = None) -> int:
        return self.ints.pop(0)


class FixedLogits(nn.Module):
    def __init__(self, main: torch.Tensor, aux: torch.Tensor) -> None:
        super().__init__()
        self.main, self.aux = main, aux

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.main, self.aux


def _mean_over_all_pixels(logits: torch.Tensor, masks: torch.Tensor, ignore: int) -> torch.Tensor:
    """Per-pixel -log softmax at the label, 0 where ignored, averaged over every pixel."""
    logp = torch.log_softmax(logits.double(), dim=1)
    valid = masks != ignore
    picked = logp.gather(1, torch.where(valid, masks, 0)[:, None])[:, 0]
    return torch.where(valid, -picked, 0.0).sum() / masks.numel()


# --- loss: mmseg CrossEntropyLoss, avg_non_ignore=False ------------------------------------


def test_loss_is_averaged_over_all_pixels_ignored_ones_included():
    torch.manual_seed(0)
    main, aux = torch.randn(2, 5, 6, 7), torch.randn(2, 5, 6, 7)
    masks = torch.randint(0, 5, (2, 6, 7))
    masks[0, :3] = 255  # 21 of the 84 pixels ignored
    model = FixedLogits(main, aux)
    loss = segmentation_loss(model, torch.zeros(2, 3, 6, 7), masks, ignore=255)
    expected = _mean_over_all_pixels(main, masks, 255) + 0.4 * _mean_over_all_pixels(aux, masks, 255)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # PyTorch's own mean divides by the 63 labelled pixels: 84/63 larger, not what mmseg trains on.
    torch_mean = F.cross_entropy(main, masks, ignore_index=255) + 0.4 * F.cross_entropy(
        aux, masks, ignore_index=255
    )
    assert torch_mean.item() == pytest.approx(expected.item() * 84 / 63, rel=1e-6)


def test_an_all_ignored_batch_gives_zero_loss_not_nan():
    masks = torch.full((1, 4, 4), 255)
    model = FixedLogits(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4))
    assert segmentation_loss(model, torch.zeros(1, 3, 4, 4), masks).item() == 0.0


# --- train pipeline -------------------------------------------------------------------------


def test_crop_keeps_the_eleventh_window_after_ten_failed_checks():
    # mmseg RandomCrop: bbox drawn, then 10 x (check; on failure draw again): after ten failures
    # the eleventh window is used unchecked. A one-class mask fails every check.
    image = torch.arange(3 * 32 * 64, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 32, 64)
    mask = torch.ones(32, 64, dtype=torch.int64)
    offsets = [v for i in range(11) for v in (i, 2 * i)]  # window i at (top i, left 2i)
    rng = Scripted(coins=[0.9], uniform=1.0, integers=offsets)  # 0.9: no flip
    augment = SegAugment(scale=(64, 32), ratio=(1.0, 1.0), crop=16, photometric=False)
    out = augment_pair(image, mask, augment, rng)
    assert torch.equal(out[0], image[:, 10:26, 20:36])  # the 11th window, not the 10th (9, 18)
    assert rng.ints == []


def test_crop_stops_at_the_first_window_that_passes():
    mask = torch.zeros(32, 64, dtype=torch.int64)
    mask[:, 32:] = 1  # any 16x16 window at left 24 holds both classes half and half
    image = torch.zeros(3, 32, 64, dtype=torch.uint8)
    rng = Scripted(coins=[0.9], uniform=1.0, integers=[3, 24, 0, 0])
    out = augment_pair(
        image, mask, SegAugment(scale=(64, 32), ratio=(1.0, 1.0), crop=16, photometric=False), rng
    )
    assert torch.equal(out[1], mask[3:19, 24:40]) and rng.ints == [0, 0]


def test_crop_is_not_checked_when_cat_max_ratio_is_one():
    # mmseg RandomCrop checks windows only when cat_max_ratio < 1: the first window is kept.
    image = torch.arange(3 * 32 * 64, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 32, 64)
    mask = torch.ones(32, 64, dtype=torch.int64)
    rng = Scripted(coins=[0.9], uniform=1.0, integers=[5, 7] + [0] * 20)
    augment = SegAugment(scale=(64, 32), ratio=(1.0, 1.0), crop=16, cat_max_ratio=1.0, photometric=False)
    out = augment_pair(image, mask, augment, rng)
    assert torch.equal(out[0], image[:, 5:21, 7:23]) and len(rng.ints) == 20


def test_resize_does_not_antialias_as_cv2_bilinear():
    # 64 -> 16 columns (factor 1/4): cv2 INTER_LINEAR samples source x = 4d + 1.5, the mean of
    # columns 4d+1 and 4d+2 (both 0 here); an antialiasing filter would mix in the 255 columns.
    image = torch.zeros(3, 32, 64, dtype=torch.uint8)
    image[:, :, 0::4] = 255
    image[:, :, 3::4] = 255
    mask = torch.zeros(32, 64, dtype=torch.int64)
    rng = Scripted(coins=[0.9], uniform=1.0, integers=[0] * 22)
    out = augment_pair(
        image, mask, SegAugment(scale=(16, 8), ratio=(1.0, 1.0), crop=16, photometric=False), rng
    )
    assert out[0].shape == (3, 16, 16)
    assert int(out[0][:, :8, :16].max()) == 0


def test_hsv_conversion_is_opencvs_8_bit_one():
    # OpenCV 8-bit HSV: V = max, S = 255 (V - min) / V, H = hue in degrees / 2 (range 180).
    colours = [
        ((255, 0, 0), (0, 255, 255)),
        ((0, 255, 0), (60, 255, 255)),
        ((0, 0, 255), (120, 255, 255)),
        ((255, 255, 0), (30, 255, 255)),
        ((0, 255, 255), (90, 255, 255)),
        ((255, 0, 255), (150, 255, 255)),
        ((128, 128, 128), (0, 0, 128)),
        ((200, 100, 50), (10, 191, 200)),  # hue 60 * 50 / 150 = 20 deg; S = 191.25 (fixed point 191)
    ]
    rgb = torch.tensor([c for c, _ in colours], dtype=torch.uint8).T.reshape(3, len(colours), 1)
    hsv = seg_data.rgb_to_hsv_cv(rgb)
    assert hsv[:, :, 0].T.tolist() == [list(h) for _, h in colours]
    back = seg_data.hsv_to_rgb_cv(hsv)[:, :, 0].T.tolist()
    # Hues whose float32 H * (6 / 180) lands exactly on a sector (0, 60, 120, 30 here) come back
    # exactly; OpenCV's float32 path truncates, so others may come back one lower.
    for index in (0, 1, 2, 3, 6):
        assert back[index] == list(colours[index][0])


# coins, in mmseg's order: brightness, contrast-first, [contrast], saturation, hue, [contrast]
def test_photometric_steps_truncate_to_uint8():
    image = torch.full((3, 2, 2), 10, dtype=torch.uint8)
    out = photometric_distortion(image, Scripted(coins=[0.1, 0.9, 0.9, 0.9, 0.9], uniform=0.7))
    assert out.unique().tolist() == [10]  # mmseg: astype(uint8) of 10.7 is 10 (not rounded to 11)


def test_saturation_scales_s_in_hsv_and_keeps_the_value_channel():
    # (200, 100, 50) -> H 10, S 191, V 200; S x 0.5 -> 95 (truncated); back: r = V = 200,
    # b = 200 (1 - 95/255) = 125.5 -> 125, g = 200 (1 - (95/255)(1 - 1/3)) = 150.3 -> 150.
    # (torchvision's grey blend would give (162, 112, 87).)
    image = torch.tensor([200, 100, 50], dtype=torch.uint8).view(3, 1, 1).repeat(1, 2, 2)
    out = photometric_distortion(image, Scripted(coins=[0.9, 0.9, 0.1, 0.9, 0.9], uniform=0.5))
    assert out[:, 0, 0].tolist() == [200, 150, 125]


def test_hue_moves_by_whole_opencv_units_modulo_180():
    # red: H 0; delta -1 -> H 179 = 358 deg: sector 5, b = 255 (1 - 0.9667) = 8.5 -> 8.
    image = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1).repeat(1, 2, 2)
    out = photometric_distortion(image, Scripted(coins=[0.9, 0.9, 0.9, 0.1, 0.9], uniform=0.5, integers=[-1]))
    assert out[:, 0, 0].tolist() == [255, 0, 8]


def test_hue_delta_is_drawn_in_numpy_randint_range():
    rng = np.random.default_rng(0)
    draws = {int(rng.integers(-18, 18)) for _ in range(2000)}
    assert min(draws) == -18 and max(draws) == 17  # mmseg: random.randint(-18, 18), 18 excluded


def test_padding_is_exactly_zero_after_normalisation():
    image = torch.full((3, 20, 30), 7, dtype=torch.uint8)
    mask = torch.zeros(20, 30, dtype=torch.int64)
    mask[:, 15:] = 1
    augment = SegAugment(scale=(30, 20), ratio=(1.0, 1.0), crop=40, photometric=False)
    items = []
    for _ in range(2):
        out = augment_pair(image, mask, augment, Scripted(coins=[0.9], uniform=1.0, integers=[0, 0]))
        items.append((out[0], out[1], torch.tensor(out[2]), None))
    assert tuple(items[0][2].tolist()) == (20, 30)
    pixels, masks, valid, error = collate_seg(items)
    assert error is None and pixels.dtype == torch.uint8 and pixels.shape == (2, 3, 40, 40)
    images = seg_data.normalize_crops(pixels, valid)
    assert torch.equal(images[:, :, :20, :30], normalize_batch(pixels)[:, :, :20, :30])
    assert (images[:, :, 20:, :] == 0).all() and (images[:, :, :, 30:] == 0).all()
    assert (masks[:, 20:, :] == 255).all() and (masks[:, :, 30:] == 255).all()
    assert (masks[:, :20, :30] != 255).all()


def test_the_task_feeds_the_model_zero_padding_after_normalisation(random_checkpoint, tmp_path, monkeypatch):
    # Synthetic VOC images are 96x72; scale (48, 24) x ratio <= 2 gives at most 64x48 before the
    # 80x80 crop, so rows 48-79 and columns 64-79 of every crop are padding.
    seen = []
    real_loss = seg_task.segmentation_loss

    def recording_loss(model, images, masks, ignore=255):
        seen.append((images.detach().float().cpu(), masks.cpu()))
        return real_loss(model, images, masks, ignore)

    monkeypatch.setattr(seg_task, "segmentation_loss", recording_loss)
    path = run_task(
        RunRequest(
            task="seg-voc12aug",
            checkpoint=random_checkpoint,
            set_options=["iterations=1", "window=1", "batch_size=2", "crop=80", "scale=48,24"],
            results=tmp_path / "r",
            cache=tmp_path / "c",
        )
    )
    record = json.loads(Path(path).read_text())
    (images, masks), *_ = seen
    assert images.shape == (2, 3, 80, 80)
    assert (images[:, :, 48:, :] == 0).all() and (images[:, :, :, 64:] == 0).all()
    assert (masks[:, 48:, :] == 255).all() and (masks[:, :, 64:] == 255).all()
    assert (images[:, :, :24, :32] != 0).any()
    assert record["details"]["align_corners"] is False  # VOC: mmseg's heads use align_corners=False


# --- align_corners --------------------------------------------------------------------------


def test_heads_upsample_with_align_corners_as_configured():
    from npidbench.runner import resolve_config
    from npidbench.tasks import get_preset

    assert resolve_config(get_preset("seg-cityscapes"), False, []).align_corners is True
    assert resolve_config(get_preset("seg-voc12aug"), False, []).align_corners is False
    torch.manual_seed(0)
    model = FCNSegmenter(build_resnet("resnet18"), 5, align_corners=True).eval()
    image = torch.randn(1, 3, 40, 48)
    m = model.backbone
    with torch.no_grad():
        res5 = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(image))))))))
        logits = model.head(res5)
        expected = F.interpolate(logits, size=(40, 48), mode="bilinear", align_corners=True)
        assert torch.allclose(model(image)[0], expected)
        assert not torch.allclose(
            model(image)[0], F.interpolate(logits, size=(40, 48), mode="bilinear", align_corners=False)
        )


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("test_mode=tiled", "test_mode='tiled' is not one of whole, slide"),
        ("crop=0", "iterations, window, batch_size, reference_batch, crop and trials must be at least 1"),
        ("window=7", r"iterations \(20000\) must be a multiple of window \(7\)"),
    ],
)
def test_bad_settings_are_one_line_naming_the_key(item, message):
    from npidbench.errors import BadInput
    from npidbench.runner import resolve_config
    from npidbench.tasks import get_preset

    with pytest.raises(BadInput, match=message):
        resolve_config(get_preset("seg-voc12aug"), False, [item])
