"""8-bit quantizers on the ResNet tensors that meet at residual adds (the deploy profile).

An integer conv kernel (onnxruntime's ``QLinearConv``, TensorRT's INT8 conv) writes integer
outputs, so its output must be quantized right after the conv and its batch norm. In a
ResNet bottleneck the outputs of ``conv1`` and ``conv2`` are quantized anyway (by the input
quantizers of ``conv2``/``conv3``, behind a ReLU); those of ``conv3`` and of the ``downsample``
conv go to the residual add, and the stem's goes through ReLU and max-pool to two consumers.
The ``"deploy"`` profile gives these three a per-tensor signed quantizer of
``QuantConfig.residual_bits`` (8) bits, trained with the rest (QAT), so that the exported model
computes exactly what was trained.

The other input of a residual add, the identity of a bottleneck without ``downsample`` (the
previous block's output), gets an unsigned per-tensor quantizer of the same width
(:class:`IdentityQuantizedBottleneck`). With both inputs of the add integer, onnxruntime runs
the add, and the ReLU after it, as one integer ``QLinearAdd`` per consumer, instead of
dequantizing both inputs, adding and rectifying in float and quantizing again (about a third
of the integer model's time at 800 px before this quantizer existed; docs/performance.md).
The next block's ``conv1`` still reads the float sum through its own 4- or 2-bit quantizer, so
the paper's activation bits are unchanged; only the skip path is rounded, to 8 bits.

The quantizer is attached to the frozen batch norm after the conv (the conv's output *after*
batch norm is what the integer kernel produces once the norm is folded into the weights):
:class:`OutputQuantizedBatchNorm2d` is a ``FrozenBatchNorm2d`` with an ``output_quantizer``
child, so the state-dict names of the norm are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from qdetr.quant.config import QuantConfig
from qdetr.quant.quantizers import LSQActQuantizer

__all__ = ["OutputQuantizedBatchNorm2d", "IdentityQuantizedBottleneck", "attach_residual_output_quantizers"]


class OutputQuantizedBatchNorm2d(FrozenBatchNorm2d):
    """Frozen batch norm followed by a per-tensor activation quantizer.

    Build it with :meth:`from_batch_norm`; buffers are shared with the source norm.

    Shapes:
        input and output: (B, C, H, W).

    Examples:
        >>> from qdetr.quant import QuantizerConfig
        >>> bn = OutputQuantizedBatchNorm2d.from_batch_norm(
        ...     FrozenBatchNorm2d(8), bits=8, config=QuantizerConfig(granularity="per_tensor"))
        >>> y = bn.train()(torch.randn(2, 8, 5, 5))             # calibrates on the first batch
        >>> y.shape, bn.output_quantizer.scale.shape
        (torch.Size([2, 8, 5, 5]), torch.Size([1]))
        >>> sorted(bn.state_dict())[:4]
        ['bias', 'output_quantizer.initialized', 'output_quantizer.scale', 'output_quantizer.signed']
    """

    output_quantizer: LSQActQuantizer

    @classmethod
    def from_batch_norm(cls, bn: FrozenBatchNorm2d, bits: int, config) -> "OutputQuantizedBatchNorm2d":
        """Wrap ``bn`` (sharing its buffers) with a ``bits``-bit signed per-tensor output quantizer.

        Raises:
            TypeError: if ``bn`` is not a ``FrozenBatchNorm2d``.
        """
        if not isinstance(bn, FrozenBatchNorm2d):
            raise TypeError(f"expected FrozenBatchNorm2d, got {type(bn).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("weight", "bias", "running_mean", "running_var"):
            new.register_buffer(name, getattr(bn, name))
        new.eps = bn.eps
        channels = bn.weight.numel()
        new.output_quantizer = LSQActQuantizer(bits, channels, axis=1, signed=True, config=config)
        new.to(device=bn.weight.device)
        new.train(bn.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W): batch norm, then fake quantization."""
        return self.output_quantizer(super().forward(x))

    def to_batch_norm(self) -> FrozenBatchNorm2d:
        """A plain ``FrozenBatchNorm2d`` sharing this norm's buffers (the quantizer dropped)."""
        bn = FrozenBatchNorm2d(self.weight.numel(), eps=self.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(bn, name, getattr(self, name))
        return bn


class IdentityQuantizedBottleneck(Bottleneck):
    """torchvision ``Bottleneck`` whose identity path (no ``downsample``) is fake-quantized.

    ``out = relu(bn3(conv3(...)) + identity_quantizer(x))``; everything else is the parent's
    forward. Build it with :meth:`from_bottleneck` (it takes over the block's children, so
    parameter and buffer names are unchanged; the quantizer adds ``identity_quantizer.*``).

    Shapes:
        input and output: (B, C, H, W) with C = ``planes * 4``.

    Examples:
        >>> from qdetr.quant import QuantizerConfig
        >>> block = Bottleneck(16, 4).eval()
        >>> qblock = IdentityQuantizedBottleneck.from_bottleneck(
        ...     block, bits=8, signed=False, config=QuantizerConfig(granularity="per_tensor"))
        >>> x = torch.rand(2, 16, 6, 6)
        >>> y = qblock.train()(x)                                   # calibrates on the first batch
        >>> y.shape, qblock.identity_quantizer.bits, isinstance(qblock, Bottleneck)
        (torch.Size([2, 16, 6, 6]), 8, True)
    """

    identity_quantizer: LSQActQuantizer

    @classmethod
    def from_bottleneck(cls, block: Bottleneck, bits: int, signed: bool, config) -> "IdentityQuantizedBottleneck":
        """The same block (its children shared) with a ``bits``-bit per-tensor identity quantizer.

        Raises:
            ValueError: if the block has a ``downsample`` (its identity is the downsample conv's
                output, quantized by that conv's norm instead).
        """
        if block.downsample is not None:
            raise ValueError("a bottleneck with a downsample path quantizes its identity at the downsample norm")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in block.named_children():
            setattr(new, name, child)
        new.stride, new.downsample = block.stride, None
        channels = block.conv1.in_channels
        new.identity_quantizer = LSQActQuantizer(bits, channels, axis=1, signed=signed, config=config)
        new.to(device=block.conv1.weight.device)
        new.train(block.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W): the bottleneck with a quantized skip path."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.identity_quantizer(x))


def _quantized_conv(module: nn.Module | None) -> bool:
    from qdetr.quant.modules import QuantConv2d

    return isinstance(module, QuantConv2d) and module.weight_quantizer is not None


def attach_residual_output_quantizers(model: nn.Module, config: QuantConfig) -> list[str]:
    """Give the residual-feeding outputs of quantized ResNet convs an output quantizer, in place.

    Targets, for torchvision-style ``Bottleneck`` blocks whose convs are quantized: ``bn3``
    (after ``conv3``) and the batch norm of ``downsample`` (after its conv), or, for a block
    without ``downsample``, its identity path (the block becomes an
    :class:`IdentityQuantizedBottleneck`; unsigned, or signed with ``symmetric_activations``);
    for qdetr's ``ResNetBody``: the stem's ``bn1``. Norms that are not ``FrozenBatchNorm2d``
    are left alone.

    Args:
        model: a model already processed by :func:`qdetr.quantize_model`.
        config: supplies ``residual_bits`` and the activation numerics.

    Returns:
        The qualified names of the norms that got a quantizer.

    Examples:
        >>> import qdetr
        >>> model = qdetr.quantize_model(qdetr.create_model("detr_tiny"), bits=4, profile="deploy")
        >>> type(model.backbone[0].body.layer1[0].bn3).__name__          # attached by the profile
        'OutputQuantizedBatchNorm2d'
        >>> attach_residual_output_quantizers(model, qdetr.QuantConfig(profile="deploy"))   # already there
        []
    """
    from qdetr.models.backbone import ResNetBody

    def attach(parent: nn.Module, child: str, name: str) -> None:
        bn = getattr(parent, child)
        if type(bn) is FrozenBatchNorm2d:
            setattr(parent, child, OutputQuantizedBatchNorm2d.from_batch_norm(bn, config.residual_bits, config.activation))
            attached.append(name)

    attached: list[str] = []
    identity_blocks: list[tuple[str, Bottleneck]] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Bottleneck) and _quantized_conv(module.conv3):
            attach(module, "bn3", f"{prefix}bn3")
            down = module.downsample
            if isinstance(down, nn.Sequential) and len(down) == 2 and _quantized_conv(down[0]):
                attach(down, "1", f"{prefix}downsample.1")
            elif down is None and type(module) is Bottleneck and isinstance(module.bn3, OutputQuantizedBatchNorm2d):
                identity_blocks.append((name, module))
        elif isinstance(module, ResNetBody) and _quantized_conv(module.conv1) and module.unit == "torchvision":
            attach(module, "bn1", f"{prefix}bn1")
    signed = bool(config.symmetric_activations)
    for name, block in identity_blocks:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = IdentityQuantizedBottleneck.from_bottleneck(block, config.residual_bits, signed, config.activation)
        setattr(parent, leaf, new)
        attached.append(f"{name}.identity_quantizer")
    return attached
