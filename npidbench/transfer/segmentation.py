"""FCN-D8 for the segmentation transfer benchmarks (PROTOCOLS.md "Segmentation"; mmsegmentation's
fcn_r50-d8 as mmselfsup runs it).

The checkpoint's ResNet is dilated in place to output stride 8 (strides (1, 2, 1, 1), dilations
(1, 1, 2, 4), the first block of a dilated stage at half the dilation). torchvision builds this
only for Bottleneck ResNets (it refuses dilation in BasicBlock), so the conversion is done here for
both block types. The heads are the protocol's FCN heads, not torchvision's FCNHead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from npidbench.backbones.resnet import layer_channels


def dilate_resnet(model: nn.Module) -> nn.Module:
    """Turn a torchvision ResNet into its output-stride-8 dilated version (weights unchanged)."""
    for stage, dilation in ((model.layer3, 2), (model.layer4, 4)):
        for index, block in enumerate(stage):
            rate = dilation // 2 if index == 0 else dilation  # contract_dilation, as mmseg
            if isinstance(block, Bottleneck):
                conv = block.conv2
            elif isinstance(block, BasicBlock):
                conv = block.conv1  # mmseg's BasicBlock dilates its first 3x3 conv
            else:
                raise TypeError(f"cannot dilate a {type(block).__name__}")
            # The strided conv of the stage's first block (conv2 in torchvision's v1.5
            # Bottleneck, conv1 in BasicBlock) is the one dilated: its stride goes.
            conv.stride, conv.dilation, conv.padding = (1, 1), (rate, rate), (rate, rate)
            if index == 0 and block.downsample is not None:
                if isinstance(block.downsample[0], nn.AvgPool2d):
                    # ResNet-D's average-pool shortcut: at stride 1 it is mmseg's (ResLayer with
                    # avg_down pools with kernel = stride), an identity; the 1x1 conv follows
                    block.downsample[0] = nn.Identity()
                else:
                    block.downsample[0].stride = (1, 1)
    return model


class ConvBNReLU(nn.Sequential):
    def __init__(self, inputs: int, outputs: int, kernel: int) -> None:
        super().__init__(
            nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(outputs),
            nn.ReLU(inplace=True),
        )


class FCNHead(nn.Module):
    """mmseg's FCNHead: ``convs`` 3x3 conv-BN-ReLU to ``channels``, optionally concatenated with
    the input and fused by one more 3x3 conv, dropout 0.1, 1x1 classifier (init normal 0.01)."""

    def __init__(self, inputs: int, channels: int, classes: int, convs: int, concat_input: bool) -> None:
        super().__init__()
        layers = [ConvBNReLU(inputs, channels, 3)]
        layers += [ConvBNReLU(channels, channels, 3) for _ in range(convs - 1)]
        self.convs = nn.Sequential(*layers)
        self.fuse = ConvBNReLU(inputs + channels, channels, 3) if concat_input else None
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs(x)
        if self.fuse is not None:
            out = self.fuse(torch.cat([x, out], dim=1))
        return self.classifier(self.dropout(out))


class FCNSegmenter(nn.Module):
    """Dilated ResNet -> FCN head on res5 (2 convs, concat input) + auxiliary FCN head on res4
    (1 conv, loss weight 0.4). Returns logits at the input size (bilinear; ``align_corners`` as
    mmseg's heads: False for VOC, True for Cityscapes 769x769)."""

    AUX_WEIGHT = 0.4  # mmseg's fcn_r50-d8 (torchvision's reference uses 0.5)

    def __init__(self, backbone: nn.Module, classes: int, align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.backbone = dilate_resnet(backbone)
        channels = layer_channels(backbone)
        # Head widths are a quarter of their inputs: 2048 -> 512 and 1024 -> 256 for ResNet-50
        # (the protocol), 512 -> 128 and 256 -> 64 for ResNet-18/34 (mmseg's fcn_r18-d8).
        self.head = FCNHead(
            channels["Feature5"], channels["Feature5"] // 4, classes, convs=2, concat_input=True
        )
        self.aux_head = FCNHead(
            channels["Feature4"], channels["Feature4"] // 4, classes, convs=1, concat_input=False
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.backbone
        x = m.maxpool(m.relu(m.bn1(m.conv1(images))))
        res4 = m.layer3(m.layer2(m.layer1(x)))
        res5 = m.layer4(res4)
        size = images.shape[-2:]
        main = F.interpolate(self.head(res5), size=size, mode="bilinear", align_corners=self.align_corners)
        if not self.training:
            return main, None
        aux = F.interpolate(self.aux_head(res4), size=size, mode="bilinear", align_corners=self.align_corners)
        return main, aux


def mmseg_cross_entropy(logits: torch.Tensor, masks: torch.Tensor, ignore: int = 255) -> torch.Tensor:
    """mmseg 0.x CrossEntropyLoss as fcn_r50-d8 configures it (avg_non_ignore=False, its default
    since the flag came in 0.23; the behaviour of the releases before): per-pixel cross-entropy with
    reduction 'none' (``ignore`` pixels give 0), then the mean over ALL pixels, ignored ones
    included (mmseg/models/losses/cross_entropy_loss.py lines 45-60, avg_factor stays None;
    losses/utils.py weight_reduce_loss -> reduce_loss, loss.mean(), line 42). PyTorch's
    F.cross_entropy(ignore_index=...) would divide by the non-ignored count instead."""
    return F.cross_entropy(logits.float(), masks, reduction="none", ignore_index=ignore).mean()


def segmentation_loss(
    model: nn.Module, images: torch.Tensor, masks: torch.Tensor, ignore: int = 255
) -> torch.Tensor:
    """Main + 0.4 x auxiliary cross-entropy, each averaged as mmseg's (``mmseg_cross_entropy``);
    ``model`` may be the DDP wrapper of an FCNSegmenter."""
    main, aux = model(images)
    loss = mmseg_cross_entropy(main, masks, ignore)
    if aux is not None:
        loss = loss + FCNSegmenter.AUX_WEIGHT * mmseg_cross_entropy(aux, masks, ignore)
    return loss


@torch.no_grad()
def sliding_logits(
    model: FCNSegmenter, image: torch.Tensor, crop: int, stride: int, classes: int
) -> torch.Tensor:
    """mmseg's slide inference: windows of ``crop`` every ``stride`` pixels (the last one aligned
    to the border), logits averaged where windows overlap. ``image``: (1, 3, H, W) normalised."""
    _, _, height, width = image.shape
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    total = image.new_zeros((1, classes, height, width))
    count = image.new_zeros((1, 1, height, width))
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * stride, c * stride
            y2, x2 = min(y1 + crop, height), min(x1 + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits, _ = model(image[:, :, y1:y2, x1:x2])
            total[:, :, y1:y2, x1:x2] += logits.float()
            count[:, :, y1:y2, x1:x2] += 1
    return total / count
