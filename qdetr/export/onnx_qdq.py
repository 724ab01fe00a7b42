"""``export_onnx``: a qdetr detector (float or quantized) to a standard QDQ ONNX file.

The graph has inputs ``pixel_values`` (B, 3, H, W) float32 and ``pixel_mask`` (B, H, W) int64
and outputs ``pred_logits`` (B, Q, C+1) and ``pred_boxes`` (B, Q, 4) (as the PyTorch output
dict), with dynamic batch and image size. A float model exports as plain ONNX. A quantized one
is first rewritten into its export form (:mod:`qdetr.export.qdq_modules`):

1. every quantized Conv2d/Linear/attention becomes QDQ operators around int8 weight codes;
2. frozen batch norms that directly follow a quantized conv are folded into it, so that the
   conv output reaches the next ``QuantizeLinear`` (the condition for an integer conv); a
   norm's output quantizer (deploy profile, :mod:`qdetr.quant.residual_outputs`) then sits
   right after the conv;
3. in ResNet bottlenecks, the ReLUs in front of ``conv2``/``conv3`` (their only consumers) are
   folded into those convs' per-tensor input quantizers' clip (``Q(relu(x)) = max(Q(x), Q(0))``),
   so ``Conv -> Q`` stays adjacent whatever the zero point; in the stem (deploy profile) the
   ReLU is folded into the stem's output quantizer and the max-pool reads integer codes
   (``DQ -> MaxPool -> Q`` with one scale, which onnxruntime runs as a uint8 ``MaxPool``);
4. for onnxruntime, each quantizer that reads a residual sum gets its own copy of the add
   (:mod:`qdetr.export.integer_adds`), so every residual add runs as an integer ``QLinearAdd``;

then traced with ``torch.onnx.export(dynamo=True)``. Opsets: 18 by default (the dynamo
exporter's native opset; QDQ with per-axis scales needs 13, the 8-bit containers need
nothing newer), up to 21. Sub-8-bit ONNX types (int4 from opset 21, int2 from 25) are not
emitted: onnxruntime 1.32 runs a conv or matmul with an int4 weight and a quantized activation
as a float op, so b-bit codes travel in 8-bit containers with a Clip to their 2^b levels.
See docs/concepts/deploy-profile.md.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from qdetr.atomic_write import atomic_path
from qdetr.export.qdq_modules import (
    ExportActQuantizer,
    ExportConv2d,
    ExportError,
    ExportLinear,
    ExportMultiheadAttention,
    _act,
)
from qdetr.export.qdq_ops import onnx_translations
from qdetr.layers.attention import MultiheadAttention
from qdetr.models.export import DetectorForExport
from qdetr.quant.api import is_quantized
from qdetr.quant.attention import QuantMultiheadAttention
from qdetr.quant.modules import QuantConv2d, QuantLinear
from qdetr.quant.quantizers import LSQActQuantizer, LSQWeightQuantizer
from qdetr.quant.residual_outputs import IdentityQuantizedBottleneck, OutputQuantizedBatchNorm2d

__all__ = ["export_onnx", "export_metadata", "ExportOptions", "to_export_form", "TARGETS", "OPSETS"]

#: Runtimes the export is shaped for, and the activation container each uses.
TARGETS = {"onnxruntime": "uint8", "tensorrt": "int8"}
#: ONNX opsets the exporter writes: 18 (the dynamo exporter's base) to 21.
OPSETS = range(18, 22)
INPUT_NAMES = ("pixel_values", "pixel_mask")
#: Image sides the dynamic-shape graph is traced for (the backbone's stride is 32).
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 32, 8192
OUTPUT_NAMES = ("pred_logits", "pred_boxes")


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """How :func:`export_onnx` writes the graph.

    Attributes:
        opset: ONNX opset (18..21, default 18).
        target: ``"onnxruntime"`` (activation codes in uint8 containers, any integer zero
            point: the form onnxruntime's x86 integer kernels fuse) or ``"tensorrt"`` (int8
            containers, every zero point 0: TensorRT's explicit INT8 quantization; needs a model
            trained with ``QuantConfig(profile="deploy", symmetric_activations=True)``).
        example_size: (H, W) of the example input used for tracing (any size works afterwards).
        fold_batch_norm: fold frozen batch norms into the quantized convs before them.
        fold_relu: fold ReLUs into the per-tensor quantizer that reads them.
        integer_adds: ``"onnxruntime"`` target only: split residual adds read by several
            quantizers so that each runs as an integer ``QLinearAdd`` (see
            :mod:`qdetr.export.integer_adds`; same values, fewer float passes).
        dynamic: dynamic batch and image size (default). ``False`` fixes batch 1 and
            ``example_size``. With static shapes onnxruntime 1.32 first rewrites every
            MatMul + bias Add into a float ``Gemm`` (``MatMulAddFusion``) that its QDQ rules
            then leave float, also with int32 biases; dynamic shapes keep the linears on
            ``MatMulIntegerToFloat``. Convolutions fuse either way.

    Raises:
        ExportError: for an unknown target or an opset outside 18..21.

    Examples:
        >>> ExportOptions(target="tensorrt").container
        'int8'
        >>> ExportOptions(opset=11)
        Traceback (most recent call last):
            ...
        qdetr.export.qdq_modules.ExportError: opset 11 is not supported by the QDQ exporter (per-axis DequantizeLinear needs 13, the dynamo exporter's operator set 18); use an opset from 18 to 21
    """

    opset: int = 18
    target: str = "onnxruntime"
    example_size: tuple[int, int] = (64, 64)
    fold_batch_norm: bool = True
    fold_relu: bool = True
    integer_adds: bool = True
    dynamic: bool = True

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ExportError(f"target must be one of {tuple(TARGETS)}; got {self.target!r}")
        if self.opset not in OPSETS:
            raise ExportError(
                f"opset {self.opset} is not supported by the QDQ exporter (per-axis DequantizeLinear needs 13, "
                f"the dynamo exporter's operator set 18); use an opset from {OPSETS.start} to {OPSETS.stop - 1}"
            )

    @property
    def container(self) -> str:
        """Activation container: ``"uint8"`` or ``"int8"``."""
        return TARGETS[self.target]


def _is_batch_norm(module: nn.Module) -> bool:
    from torchvision.ops import FrozenBatchNorm2d

    return isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d))


def _conv_bn_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) child names where the bn directly follows the conv in ``parent``'s forward."""
    from qdetr.models.backbone import BiRealBottleneck, ResNetBody

    children = dict(parent.named_children())
    if isinstance(parent, nn.Sequential):
        names = list(children)
        return [(a, b) for a, b in zip(names, names[1:]) if isinstance(children[a], ExportConv2d) and _is_batch_norm(children[b])]
    if isinstance(parent, (Bottleneck, BasicBlock, BiRealBottleneck, ResNetBody)):
        pairs = []
        for name, child in children.items():
            bn = name.replace("conv", "bn")
            if isinstance(child, ExportConv2d) and name.startswith("conv") and _is_batch_norm(children.get(bn)):
                pairs.append((name, bn))
        return pairs
    return []


class _ReluFoldedBottleneck(nn.Module):
    """torchvision ``Bottleneck`` whose inner ReLUs are folded into conv2/conv3's input quantizers."""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = block.conv1, block.bn1, block.conv2, block.bn2
        self.conv3, self.bn3, self.relu, self.downsample = block.conv3, block.bn3, block.relu, block.downsample
        self.identity_quantizer = getattr(block, "identity_quantizer", None) or nn.Identity()
        self.fold2 = self._fold(self.conv2)
        self.fold3 = self._fold(self.conv3)

    @staticmethod
    def _fold(conv: nn.Module) -> bool:
        q = getattr(conv, "input_quantizer", None)
        if isinstance(q, ExportActQuantizer) and q.per_tensor:
            q.fold_relu = True
            return True
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        out = out if self.fold2 else self.relu(out)
        out = self.bn2(self.conv2(out))
        out = out if self.fold3 else self.relu(out)
        out = self.bn3(self.conv3(out))
        identity = self.identity_quantizer(x) if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class _ReluFoldedStem(nn.Module):
    """The stem's ``relu -> maxpool`` after a per-tensor output quantizer, on integer codes.

    ``maxpool(relu(DQ(q))) = DQ(maxpool(max(q, z)))``: the ReLU becomes the quantizer's clip
    (``fold_relu``) and a second, identical quantizer after the pool (exact: the pooled values
    are already on its grid) gives onnxruntime ``DQ -> MaxPool -> Q`` with one scale.
    """

    def __init__(self, maxpool: nn.Module, quantizer: ExportActQuantizer) -> None:
        super().__init__()
        self.maxpool = maxpool
        self.requantizer = copy.deepcopy(quantizer)
        self.requantizer.fold_relu = False
        quantizer.fold_relu = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.requantizer(self.maxpool(x))


def _fold_stem_relu(model: nn.Module) -> None:
    from qdetr.models.backbone import ResNetBody

    for body in [m for m in model.modules() if isinstance(m, ResNetBody) and m.unit == "torchvision"]:
        quantizer = body.bn1
        if isinstance(quantizer, ExportActQuantizer) and quantizer.per_tensor and isinstance(body.relu, nn.ReLU):
            body.maxpool = _ReluFoldedStem(body.maxpool, quantizer)
            body.relu = nn.Identity()


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, new)


@torch.no_grad()
def to_export_form(model: nn.Module, options: ExportOptions | None = None) -> nn.Module:
    """A copy of a quantized ``model`` whose quantized layers are their QDQ export forms.

    The copy is in eval mode and float32 and computes what ``model`` computes in eval mode (up
    to float rounding where batch norms are folded).

    Args:
        model: a calibrated quantized qdetr model (float layers are kept as they are).
        options: export options (container, foldings).

    Returns:
        The rewritten copy.

    Raises:
        ExportError: for an uncalibrated quantizer, a quantizer in a layer the exporter does not
            know (the message names it), or a zero point the container cannot hold.

    Examples:
        >>> import qdetr
        >>> model = qdetr.quantize_model(qdetr.create_model("detr_tiny"), bits=4, profile="deploy")
        >>> images = torch.randn(1, 3, 64, 64)
        >>> model = qdetr.calibrate(model.eval(), [images])
        >>> export = to_export_form(model)
        >>> type(export.backbone[0].body.layer1[0].conv2).__name__
        'ExportConv2d'
        >>> torch.allclose(export(images)["pred_boxes"], model(images)["pred_boxes"], atol=1e-4)
        True
    """
    options = options or ExportOptions()
    container = options.container
    model = copy.deepcopy(model).float().eval()
    replacements: list[tuple[str, nn.Module]] = []
    handled: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in handled):
            continue
        if isinstance(module, (QuantMultiheadAttention, MultiheadAttention)) and _has_quantizer(module):
            replacements.append((name, ExportMultiheadAttention(module, name, container)))
            handled.append(name)
        elif isinstance(module, QuantConv2d):
            replacements.append((name, ExportConv2d(module, name, container)))
            handled.append(name)
        elif isinstance(module, QuantLinear):
            replacements.append((name, ExportLinear(module, name, container)))
            handled.append(name)
    for name, module in model.named_modules():
        if isinstance(module, IdentityQuantizedBottleneck):
            identity = _act(module.identity_quantizer, f"{name}.identity_quantizer", container)
            replacements.append((f"{name}.identity_quantizer", identity or nn.Identity()))
    for name, new in replacements:
        _replace(model, name, new)
    if options.fold_batch_norm:
        for parent_name, parent in list(model.named_modules()):
            for conv_name, bn_name in _conv_bn_pairs(parent):
                bn = getattr(parent, bn_name)
                getattr(parent, conv_name).fold_batch_norm(bn)
                bn_qualified = f"{parent_name}.{bn_name}" if parent_name else bn_name
                setattr(parent, bn_name, _output_quantizer(bn, bn_qualified, container) or nn.Identity())
    for name, module in list(model.named_modules()):
        if isinstance(module, OutputQuantizedBatchNorm2d):  # not folded: norm, then quantizer
            _replace(model, name, nn.Sequential(module.to_batch_norm(), _output_quantizer(module, name, container)))
    leftovers = [n for n, m in model.named_modules() if isinstance(m, (LSQActQuantizer, LSQWeightQuantizer))]
    if leftovers:
        raise ExportError(
            f"the QDQ exporter does not know the layers holding the quantizers {leftovers[:4]}"
            f"{' ...' if len(leftovers) > 4 else ''}; it exports qdetr QuantConv2d, QuantLinear and "
            "QuantMultiheadAttention (quantize Hugging Face models' attention is not exportable yet): "
            "keep those layers float with QuantConfig(keep_float=...)"
        )
    if options.fold_relu:
        blocks = [(n, m) for n, m in model.named_modules() if type(m) in (Bottleneck, IdentityQuantizedBottleneck)]
        for name, block in blocks:
            if isinstance(block.bn1, nn.Identity) and isinstance(block.bn2, nn.Identity):
                _replace(model, name, _ReluFoldedBottleneck(block))
        _fold_stem_relu(model)
    return model


def _output_quantizer(bn: nn.Module, name: str, container: str) -> ExportActQuantizer | None:
    if not isinstance(bn, OutputQuantizedBatchNorm2d):
        return None
    return ExportActQuantizer(bn.output_quantizer, f"{name}.output_quantizer", container)


def _has_quantizer(module: nn.Module) -> bool:
    return any(isinstance(m, (LSQActQuantizer, LSQWeightQuantizer)) for m in module.modules())


def _dynamic_shapes():
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    height, width = Dim("height", min=MIN_IMAGE_SIDE, max=MAX_IMAGE_SIDE), Dim("width", min=MIN_IMAGE_SIDE, max=MAX_IMAGE_SIDE)
    return {"pixel_values": {0: batch, 2: height, 3: width}, "pixel_mask": {0: batch, 1: height, 2: width}}


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    options: ExportOptions | None = None,
    metadata: dict[str, str] | None = None,
    **option_kwargs,
) -> Path:
    """Write ``model`` (a qdetr DETR / SMCA-DETR, float or quantized) as an ONNX file.

    A quantized model is written as standard QDQ ONNX (see the module docstring); a float model
    as plain ONNX. Inputs ``pixel_values`` (B, 3, H, W) float32 and ``pixel_mask`` (B, H, W)
    int64 (1 = real pixel); outputs ``pred_logits`` (B, Q, C+1) and ``pred_boxes`` (B, Q, 4),
    normalised cxcywh. Batch and image size are dynamic. The file is written atomically.

    Args:
        model: the detector; activation quantizers must be calibrated.
        path: output ``.onnx`` file.
        options: :class:`ExportOptions`; or pass its fields as keywords
            (``opset=``, ``target=``, ``dynamic=``, ...).
        metadata: extra ``metadata_props`` entries (added to :func:`export_metadata`'s).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ExportError: uncalibrated quantizer, unsupported layer, opset or target, or a model that
            is not a detector taking ``(pixel_values, pixel_mask)``.

    Examples:
        >>> import qdetr
        >>> model = qdetr.quantize_model(qdetr.create_model("detr_tiny"), bits=4, profile="deploy")
        >>> model = qdetr.calibrate(model.eval(), [torch.randn(2, 3, 64, 64)])
        >>> path = qdetr.export_onnx(model, "detr_tiny_w4a4.onnx")   # doctest: +SKIP
    """
    if options is None:
        options = ExportOptions(**option_kwargs)
    elif option_kwargs:
        raise TypeError("pass either options= or option keywords, not both")
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be an nn.Module, got {type(model).__name__}")
    if not hasattr(model, "backbone") or not hasattr(model, "transformer"):
        raise ExportError(
            f"{type(model).__name__} is not a qdetr detector (DETR / SMCA-DETR with backbone and transformer); "
            "load one with qdetr.from_pretrained or qdetr.create_model"
        )
    export_model = to_export_form(model, options) if is_quantized(model) else copy.deepcopy(model).float().eval()
    wrapper = DetectorForExport(export_model).eval()
    h, w = options.example_size
    batch = 2 if options.dynamic else 1
    pixel_values = torch.randn(batch, 3, h, w)
    pixel_mask = torch.ones(batch, h, w, dtype=torch.int64)
    pixel_mask[batch - 1, :, w * 3 // 4 :] = 0
    path = Path(path)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (pixel_values, pixel_mask),
            dynamo=True,
            opset_version=options.opset,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=_dynamic_shapes() if options.dynamic else None,
            custom_translation_table=onnx_translations(max(options.opset, 18)),
            verbose=False,
        )
    with atomic_path(path) as tmp:
        program.save(str(tmp))
        _finish_graph(tmp, {**export_metadata(model, options), **(metadata or {})}, options)
    return path


def export_metadata(model: nn.Module, options: ExportOptions | None = None) -> dict[str, str]:
    """The ``metadata_props`` written into the ONNX file, so that a runtime needs no side files.

    Keys: ``qdetr.classification`` (``"softmax"``/``"sigmoid"``), ``qdetr.preprocessing`` (JSON:
    the model's recorded :class:`qdetr.models.PreprocessingConfig` as ``to_dict``), ``qdetr.export`` (JSON: target, opset,
    container), and when known ``qdetr.id2label`` (JSON), ``qdetr.model_name``, ``qdetr.bits``,
    ``qdetr.profile``.

    Examples:
        >>> import qdetr
        >>> meta = export_metadata(qdetr.create_model("detr_tiny"))
        >>> meta["qdetr.classification"], "qdetr.bits" in meta
        ('softmax', False)
    """
    from qdetr.quant.api import CONFIG_ATTR
    from qdetr.zoo.prediction import recorded_preprocessing

    options = options or ExportOptions()
    meta = {
        "qdetr.classification": str(getattr(model, "classification", "softmax")),
        "qdetr.preprocessing": json.dumps(recorded_preprocessing(model).to_dict()),
        "qdetr.export": json.dumps({"target": options.target, "opset": options.opset, "container": options.container}),
    }
    id2label = getattr(model, "id2label", None)
    if id2label:
        meta["qdetr.id2label"] = json.dumps({str(k): v for k, v in id2label.items()})
    name = getattr(getattr(model, "config", None), "name", None) or getattr(model, "name_or_path", None)
    if name:
        meta["qdetr.model_name"] = str(name)
    quant = getattr(model, CONFIG_ATTR, None)
    if quant is not None:
        meta["qdetr.bits"] = str(quant.bits)
        meta["qdetr.profile"] = quant.profile + ("-symmetric" if quant.symmetric_activations else "")
    return meta


def _finish_graph(path: Path, metadata: dict[str, str], options: ExportOptions) -> None:
    import onnx

    from qdetr.export.integer_adds import split_shared_integer_adds

    proto = onnx.load(str(path), load_external_data=False)
    if options.integer_adds and options.target == "onnxruntime":
        split_shared_integer_adds(proto)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
