"""ResNet backbones with frozen batch norm, plus the sine position encoding joiner.

Two block units share the torchvision ResNet layout and names (``conv1``, ``bn1``,
``layer{1..4}.{k}.conv{1,2,3}``, ``downsample.{0,1}``), so facebookresearch/detr checkpoints
load with ``strict=True`` under the prefix ``backbone.0.body.``:

* ``"torchvision"``: torchvision's ``Bottleneck`` (ReLU), as in DETR and the FP SMCA;
* ``"bireal"``: the Bi-Real/ReActNet-style unit of the released Q-DETR checkpoints
  (method.md 5.3): every ReLU becomes ``LearnableBias -> PReLU -> LearnableBias``, the three
  block convs have biases, and the stem is ``conv1 (no bias) -> bn1 -> prelu -> maxpool``.

Only ``layer4`` (stride 32) is returned; there is no ``avgpool``/``fc``. Batch norm is
:class:`torchvision.ops.FrozenBatchNorm2d` (eps 1e-5, no ``num_batches_tracked``).
Constructors never download anything: pretrained backbone weights are optional and
explicit (:func:`load_backbone_weights`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from qdetr.models.position_encoding import PositionEmbeddingSine

__all__ = [
    "ResNetLayout",
    "RESNET_LAYOUTS",
    "LearnableBias",
    "BiRealBottleneck",
    "ResNetBody",
    "Backbone",
    "BackboneWithPositionEncoding",
    "load_backbone_weights",
]

BackboneUnit = Literal["torchvision", "bireal"]


@dataclass(frozen=True)
class ResNetLayout:
    """Depth and width of a bottleneck ResNet.

    Args:
        blocks: bottleneck blocks per stage (layer1..layer4).
        stem_width: channels of the stem conv and width of layer1; stage widths are
            ``stem_width * (1, 2, 4, 8)`` and outputs 4x that.
    """

    blocks: tuple[int, int, int, int]
    stem_width: int = 64

    @property
    def num_channels(self) -> int:
        """Channels of the layer4 output."""
        return self.stem_width * 8 * Bottleneck.expansion


#: Backbone names accepted by the model configs.
RESNET_LAYOUTS: dict[str, ResNetLayout] = {
    "resnet50": ResNetLayout((3, 4, 6, 3), 64),
    "resnet101": ResNetLayout((3, 4, 23, 3), 64),
    # Test-sized: one block per stage, 8-channel stem, 256 output channels.
    "resnet_tiny": ResNetLayout((1, 1, 1, 1), 8),
}


class LearnableBias(nn.Module):
    """Per-channel additive bias, ``x + b`` with b of shape (1, C, 1, 1), initialised to 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class BiRealBottleneck(nn.Module):
    """Bottleneck of the released Q-DETR ResNet-50 (method.md 5.3).

    ``x -> bias11 -> prelu1 -> bias12 -> conv1 -> bn1 -> bias21 -> prelu2 -> bias22 -> conv2
    (stride) -> bn2 -> bias31 -> prelu3 -> bias32 -> conv3 -> bn3``, then ``+ identity`` (x,
    or ``downsample(x)`` on the raw x) and ``bias01 -> prelu0 -> bias02``.

    Args:
        inplanes: input channels C_in.
        planes: bottleneck width W; the output has ``4 * W`` channels.
        stride: stride of conv2.
        downsample: module applied to the raw input for the residual, or None.
        dilation: dilation of conv2.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        out = planes * self.expansion
        # Registration order follows the released state dict.
        self.bias11 = LearnableBias(inplanes)
        self.prelu1 = nn.PReLU(inplanes)
        self.bias12 = LearnableBias(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=True)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.bias21 = LearnableBias(planes)
        self.prelu2 = nn.PReLU(planes)
        self.bias22 = LearnableBias(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=True
        )
        self.bn2 = FrozenBatchNorm2d(planes)
        self.bias31 = LearnableBias(planes)
        self.prelu3 = nn.PReLU(planes)
        self.bias32 = LearnableBias(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=True)
        self.bn3 = FrozenBatchNorm2d(out)
        self.downsample = downsample
        self.bias01 = LearnableBias(out)
        self.prelu0 = nn.PReLU(out)
        self.bias02 = LearnableBias(out)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bias12(self.prelu1(self.bias11(x)))
        out = self.bias22(self.prelu2(self.bias21(self.bn1(self.conv1(out)))))
        out = self.bias32(self.prelu3(self.bias31(self.bn2(self.conv2(out)))))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.bias02(self.prelu0(self.bias01(out + identity)))


class ResNetBody(nn.Module):
    """ResNet trunk up to ``layer4`` with torchvision module names.

    Args:
        layout: depth and width (see :data:`RESNET_LAYOUTS`).
        unit: ``"torchvision"`` (ReLU bottleneck) or ``"bireal"`` (PReLU + LearnableBias).
        dilation: replace the stride of layer4 by dilation (DETR's DC5 variants).

    Shapes:
        input: (B, 3, H, W); output: (B, layout.num_channels, ceil(H/32), ceil(W/32))
        (stride 16 with ``dilation``).

    Raises:
        ValueError: for an unknown ``unit``.

    Examples:
        >>> import torch
        >>> from qdetr.models import ResNetBody
        >>> from qdetr.models.backbone import RESNET_LAYOUTS
        >>> body = ResNetBody(RESNET_LAYOUTS["resnet_tiny"], unit="bireal")
        >>> body(torch.randn(1, 3, 64, 96)).shape
        torch.Size([1, 256, 2, 3])
    """

    def __init__(self, layout: ResNetLayout, unit: BackboneUnit = "torchvision", dilation: bool = False) -> None:
        super().__init__()
        if unit not in ("torchvision", "bireal"):
            raise ValueError(f"unit must be 'torchvision' or 'bireal', got {unit!r}")
        self.unit = unit
        self.inplanes = layout.stem_width
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, layout.stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(layout.stem_width)
        if unit == "bireal":
            self.prelu = nn.PReLU(layout.stem_width)
        else:
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        w = layout.stem_width
        self.layer1 = self._make_layer(w, layout.blocks[0])
        self.layer2 = self._make_layer(2 * w, layout.blocks[1], stride=2)
        self.layer3 = self._make_layer(4 * w, layout.blocks[2], stride=2)
        self.layer4 = self._make_layer(8 * w, layout.blocks[3], stride=2, dilate=dilation)
        self.num_channels = layout.num_channels
        self._init_conv_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        # Same stride/dilation bookkeeping as torchvision.models.resnet.ResNet._make_layer.
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out, kernel_size=1, stride=stride, bias=False),
                FrozenBatchNorm2d(out),
            )
        layers = [self._block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = out
        for _ in range(1, blocks):
            layers.append(self._block(self.inplanes, planes, 1, None, self.dilation))
        return nn.Sequential(*layers)

    def _block(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, dilation: int) -> nn.Module:
        if self.unit == "bireal":
            return BiRealBottleneck(inplanes, planes, stride, downsample, dilation)
        return Bottleneck(inplanes, planes, stride, downsample, dilation=dilation, norm_layer=FrozenBatchNorm2d)

    def _init_conv_weights(self) -> None:
        # torchvision's ResNet initialisation (Kaiming normal, fan_out) for an untrained trunk.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.prelu(x) if self.unit == "bireal" else self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


class Backbone(nn.Module):
    """ResNet trunk plus mask downsampling (facebookresearch/detr ``Backbone``).

    Args:
        name: a key of :data:`RESNET_LAYOUTS`.
        unit: block unit, ``"torchvision"`` or ``"bireal"``.
        train_backbone: if False every trunk parameter is frozen; if True the stem and
            layer1 are frozen and layer2-4 train (the DETR recipe).
        dilation: DC5 variant (dilated layer4).

    Shapes:
        pixel_values: (B, 3, H, W); padding_mask: (B, H, W) bool, True on padding.
        returns ``(features, feature_padding_mask)``: (B, C, h, w) and (B, h, w) bool.

    Raises:
        ValueError: for an unknown ``name``.

    Examples:
        >>> import torch
        >>> from qdetr.models import Backbone
        >>> backbone = Backbone("resnet_tiny")
        >>> padding_mask = torch.zeros(2, 64, 96, dtype=torch.bool)
        >>> features, mask = backbone(torch.randn(2, 3, 64, 96), padding_mask)
        >>> features.shape, mask.shape, backbone.num_channels
        (torch.Size([2, 256, 2, 3]), torch.Size([2, 2, 3]), 256)
    """

    def __init__(
        self,
        name: str = "resnet50",
        unit: BackboneUnit = "torchvision",
        train_backbone: bool = True,
        dilation: bool = False,
    ) -> None:
        super().__init__()
        if name not in RESNET_LAYOUTS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(RESNET_LAYOUTS)}")
        self.body = ResNetBody(RESNET_LAYOUTS[name], unit=unit, dilation=dilation)
        self.num_channels = self.body.num_channels
        self.stride = 16 if dilation else 32
        for pname, parameter in self.body.named_parameters():
            if not train_backbone or not any(s in pname for s in ("layer2", "layer3", "layer4")):
                parameter.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(pixel_values)
        # Nearest-neighbour downsampling of the mask, as in the original.
        mask = F.interpolate(padding_mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return features, mask


class BackboneWithPositionEncoding(nn.Sequential):
    """``[0]`` the :class:`Backbone`, ``[1]`` the position encoding (DETR's ``Joiner``).

    The child names keep the checkpoint prefix ``backbone.0.body.``.

    Shapes:
        returns ``(features, feature_padding_mask, pos)`` with pos (B, d, h, w) cast to the
        feature dtype (computed in float32).
    """

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(  # type: ignore[override]
        self, pixel_values: torch.Tensor, padding_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features, mask = self[0](pixel_values, padding_mask)
        pos = self[1](mask).to(features.dtype)
        return features, mask, pos


def load_backbone_weights(body: ResNetBody, weights: str | os.PathLike | Mapping[str, torch.Tensor]) -> list[str]:
    """Load ImageNet (or other) trunk weights into a :class:`ResNetBody`, strictly.

    Accepts a torchvision ResNet state dict (``conv1.weight``, ..., ``fc.*``), optionally under
    the prefix ``backbone.0.body.`` or ``body.``, or a path to such a file (read with
    ``weights_only=True``). ``fc.*`` and ``num_batches_tracked`` entries are dropped.

    Args:
        body: the trunk to fill (e.g. ``model.backbone[0].body``).
        weights: a state dict or a path to a file holding one (or ``{"model": state_dict}``).

    Returns:
        The names of the dropped entries.

    Raises:
        RuntimeError: on missing or unexpected keys (after the drops above).

    Examples:
        >>> import torch
        >>> from qdetr.models import ResNetBody, load_backbone_weights
        >>> from qdetr.models.backbone import RESNET_LAYOUTS
        >>> body = ResNetBody(RESNET_LAYOUTS["resnet_tiny"])
        >>> source = ResNetBody(RESNET_LAYOUTS["resnet_tiny"]).state_dict()
        >>> state = {"backbone.0.body." + k: v for k, v in source.items()}
        >>> state["fc.weight"] = torch.zeros(10, 256)
        >>> load_backbone_weights(body, state)
        ['fc.weight']
        >>> torch.equal(body.conv1.weight, source["conv1.weight"])
        True
        >>> import torchvision  # doctest: +SKIP
        >>> full = ResNetBody(RESNET_LAYOUTS["resnet50"])  # doctest: +SKIP
        >>> load_backbone_weights(full, torchvision.models.resnet50(weights="IMAGENET1K_V1").state_dict())  # doctest: +SKIP
        ['fc.weight', 'fc.bias']
    """
    if isinstance(weights, (str, os.PathLike)):
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
            state = state["model"]
    else:
        state = weights
    cleaned: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        name = key
        for prefix in ("backbone.0.body.", "body."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name.startswith("fc.") or name.endswith("num_batches_tracked"):
            dropped.append(key)
            continue
        cleaned[name] = value
    body.load_state_dict(cleaned, strict=True)
    return dropped
