"""Which layers get which bits: module roles and the ``"paper"`` / ``"seed"`` / ``"deploy"`` profiles.

The tables follow method.md section 4 ("W b / A b / Attn 8"):

============================  =====================  ==================================
role                          ``"seed"``             ``"paper"``
============================  =====================  ==================================
stem conv (3 input channels)  W8 / A8                W8 / A8
conv                          Wb / Ab                Wb / Ab
``downsample`` / shortcut     float                  float (``quantize_downsample``)
``input_proj``                float                  float
heads, ``query_embed``,       float                  float
SMCA ``point1/2/3``
FFN ``linear1`` / ``linear2`` Wb / Ab (A unsigned    Wb / Ab (A unsigned for linear2)
                              for linear2)
self-attention                proj W b, inputs float proj W b / A b, out W b / A b
                              out W b / input float
cross-attention               all projections float  proj W b / A b, out W b / A b
q, k, v, softmax              A8 per head            A8 per head
other Linear                  Wb / Ab                Wb / Ab
============================  =====================  ==================================

The ``"deploy"`` profile selects the paper's layers, except that the residual ``downsample``
convs are quantized at ``stem_bits`` (8) so that every ResNet conv runs on an integer kernel;
its numerics (per-tensor activations, optionally symmetric) come from :class:`QuantConfig`.
With ``symmetric_activations`` every input range, the probabilities' included, is signed.

Roles are decided from module types and qualified names (``downsample``, ``input_proj``,
``class_embed``, ``multihead_attn``/``encoder_attn``, ...), which covers qdetr models,
facebookresearch/detr-style models, torchvision ResNets and the Hugging Face DETR family.

Hugging Face DETR-family layers beyond the classic DETR (see docs/concepts/detr-family.md):

* **deformable attention** (``value_proj``, ``sampling_offsets``, ``attention_weights``,
  ``output_proj`` of a multi-scale deformable attention) is planned like any attention
  module with :func:`plan_attention`: the three input projections take the projection
  bits, ``output_proj`` the output bits, and the per-head value / softmax weights /
  sampled values take the attention bits. The offsets themselves, reference points and
  sampling locations stay float (coordinates; see :mod:`qdetr.quant.deformable_attention`).
* **proposal heads** (role ``head``, float): the two-stage / query-selection scorer
  ``enc_output``, ``enc_score_head``, ``enc_bbox_head`` (RT-DETR family, Deformable DETR),
  ``enc_out_class_embed`` / ``enc_out_bbox_embed`` (LW-/RF-DETR),
  ``encoder_output_bbox_embed`` (Grounding DINO), OmDet-Turbo's ``encoder_*_head`` /
  ``decoder_*_head``, D-FINE's ``pre_bbox_head`` and box-quality ``lqe_layers``. They are
  prediction heads like ``class_embed`` / ``bbox_embed`` (float in the paper); the top-k
  query selection they drive is discrete, so a quantization error flips whole proposals;
  and in RT-DETR / D-FINE the ``enc_bbox_head`` output is added to anchors that hold
  ``torch.finfo(dtype).max`` for invalid positions, where no quantizer may sit.
* **query-position heads** (role ``query_position``, float): MLPs between boxes /
  reference points and positional queries: ``query_pos_head`` (RT-DETR family),
  ``ref_point_head`` / ``query_scale`` (Conditional DETR, DAB-DETR, LW-/RF-DETR),
  ``ref_anchor_head`` (DAB-DETR), ``reference_points_head`` (Grounding DINO),
  ``query_position_head`` (OmDet-Turbo), Deformable DETR's ``reference_points`` and
  ``pos_trans``. Their inputs or outputs are coordinates, which stay float in every
  profile, like ``query_embed``.
* everything else (text projections, gates, backbone and text-encoder Linears) is a
  generic ``linear`` at the layer's bits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from qdetr.quant.config import AttentionQuantSpec, LayerQuantSpec, QuantConfig

__all__ = ["Role", "classify_linear_or_conv", "classify_attention", "plan_layer", "plan_attention", "FloatReason"]

#: Name parts of prediction heads and other layers kept in float by both profiles.
HEAD_NAMES = frozenset(
    {
        "class_embed",
        "bbox_embed",
        "class_labels_classifier",
        "bbox_predictor",
        "fc",
        "classifier",
        "head",
        "query_embed",
        "point1",
        "point2",
        "point3",
        "box_predictor",  # torchvision two-stage detectors (cls_score / bbox_pred)
        # Hugging Face DETR family: proposal scorers and auxiliary box heads
        "enc_output",
        "enc_score_head",
        "enc_bbox_head",
        "enc_out_class_embed",
        "enc_out_bbox_embed",
        "encoder_output_bbox_embed",
        "encoder_output_class_embed",
        "encoder_class_head",
        "encoder_bbox_head",
        "decoder_class_head",
        "decoder_bbox_head",
        "pre_bbox_head",
        "lqe_layers",
    }
)
#: Name parts of MLPs between coordinates and positional queries (float in every profile).
QUERY_POSITION_NAMES = frozenset(
    {
        "query_pos_head",
        "ref_point_head",
        "ref_anchor_head",
        "query_scale",
        "reference_points_head",
        "query_position_head",
        "reference_points",
        "pos_trans",
    }
)
INPUT_PROJ_NAMES = frozenset({"input_proj", "input_projection"})
DOWNSAMPLE_NAMES = frozenset({"downsample", "shortcut"})
CROSS_ATTENTION_NAMES = frozenset(
    {"multihead_attn", "encoder_attn", "cross_attn", "cross_attention", "encoder_attn_text", "fusion_layer"}
)
FFN_IN_NAMES = frozenset({"linear1", "fc1"})
FFN_OUT_NAMES = frozenset({"linear2", "fc2"})

Role = str


@dataclass(frozen=True)
class FloatReason:
    """Why a Conv2d/Linear/attention module stays in float.

    Examples:
        >>> reason = plan_layer("input_proj", QuantConfig(bits=4))
        >>> isinstance(reason, FloatReason), str(reason)
        (True, 'input_proj (float in every profile)')
    """

    reason: str

    def __str__(self) -> str:
        return self.reason


def classify_linear_or_conv(name: str, module: nn.Module, is_stem: bool) -> Role:
    """Role of a Conv2d/Linear: ``stem``, ``downsample``, ``input_proj``, ``head``,
    ``query_position``, ``ffn_in``, ``ffn_out``, ``conv`` or ``linear``.

    Args:
        name: qualified module name, e.g. ``"transformer.decoder.layers.0.linear2"``.
        module: the Conv2d or Linear.
        is_stem: whether this is the first Conv2d reading the 3-channel image.

    Examples:
        >>> classify_linear_or_conv("transformer.encoder.layers.0.linear2", nn.Linear(8, 4), False)
        'ffn_out'
        >>> classify_linear_or_conv("backbone.0.body.layer1.0.downsample.0", nn.Conv2d(8, 16, 1), False)
        'downsample'
        >>> classify_linear_or_conv("class_embed", nn.Linear(8, 4), False)
        'head'
        >>> classify_linear_or_conv("model.decoder.query_pos_head.layers.0", nn.Linear(4, 8), False)
        'query_position'
    """
    parts = set(name.split("."))
    leaf = name.rsplit(".", 1)[-1]
    if parts & HEAD_NAMES:
        return "head"
    if parts & QUERY_POSITION_NAMES:
        return "query_position"
    if parts & INPUT_PROJ_NAMES:
        return "input_proj"
    if isinstance(module, nn.Conv2d):
        if is_stem:
            return "stem"
        if parts & DOWNSAMPLE_NAMES:
            return "downsample"
        return "conv"
    if leaf in FFN_IN_NAMES:
        return "ffn_in"
    if leaf in FFN_OUT_NAMES:
        return "ffn_out"
    return "linear"


def classify_attention(name: str) -> Role:
    """``cross_attn`` when a name part says so (``multihead_attn``, ``encoder_attn``), else ``self_attn``.

    Examples:
        >>> classify_attention("transformer.decoder.layers.0.multihead_attn")
        'cross_attn'
        >>> classify_attention("transformer.encoder.layers.0.self_attn")
        'self_attn'
    """
    return "cross_attn" if set(name.split(".")) & CROSS_ATTENTION_NAMES else "self_attn"


def plan_layer(role: Role, config: QuantConfig, bits_override: int | None = None) -> LayerQuantSpec | FloatReason:
    """Resolve the quantization of a Conv2d/Linear with the given role under ``config``.

    Args:
        role: from :func:`classify_linear_or_conv`.
        config: the model's :class:`QuantConfig`.
        bits_override: bits from a matching ``overrides`` rule, if any.

    Returns:
        A :class:`LayerQuantSpec`, or a :class:`FloatReason` for layers kept in float.

    Examples:
        >>> spec = plan_layer("ffn_out", QuantConfig(bits=2))
        >>> spec.weight_bits, spec.input_bits, spec.input_signed
        (2, 2, False)
        >>> plan_layer("stem", QuantConfig(bits=2)).weight_bits
        8
        >>> plan_layer("downsample", QuantConfig(bits=2, profile="deploy")).weight_bits   # 8-bit shortcut
        8
        >>> plan_layer("ffn_out", QuantConfig(bits=2, profile="deploy", symmetric_activations=True)).input_signed
        True
    """
    b = bits_override if bits_override is not None else config.bits
    a = bits_override if bits_override is not None else config.activation_bits
    common = {"weight": config.weight, "activation": config.activation}
    plan = _plan_layer(role, config, b, a, bits_override, common)
    if isinstance(plan, LayerQuantSpec) and config.symmetric_activations:
        plan = dataclasses.replace(plan, input_signed=True)
    return plan


def _plan_layer(role, config, b, a, bits_override, common) -> LayerQuantSpec | FloatReason:
    if role == "head":
        return FloatReason("prediction head / query / SMCA point predictor (float in every profile)")
    if role == "query_position":
        return FloatReason("query-position head on coordinates (float in every profile)")
    if role == "input_proj":
        return FloatReason("input_proj (float in every profile)")
    if role == "downsample" and config.profile == "deploy" and not config.quantize_downsample:
        db = bits_override if bits_override is not None else config.stem_bits
        return LayerQuantSpec(weight_bits=db, input_bits=db, input_signed="auto", **common)
    if role == "downsample" and not config.quantize_downsample:
        return FloatReason("residual downsample (float; set quantize_downsample=True to quantize)")
    if role == "stem":
        sb = bits_override if bits_override is not None else config.stem_bits
        return LayerQuantSpec(weight_bits=sb, input_bits=sb, input_signed=True, **common)
    if role == "ffn_in":
        return LayerQuantSpec(weight_bits=b, input_bits=a, input_signed=True, **common)
    if role == "ffn_out":
        return LayerQuantSpec(weight_bits=b, input_bits=a, input_signed=False, **common)
    # conv, downsample (opted in), generic linear: signedness detected from data.
    return LayerQuantSpec(weight_bits=b, input_bits=a, input_signed="auto", **common)


def plan_attention(role: Role, config: QuantConfig, bits_override: int | None = None) -> AttentionQuantSpec:
    """Resolve the quantization of an attention module (``self_attn`` or ``cross_attn``).

    Args:
        role: from :func:`classify_attention`.
        config: the model's :class:`QuantConfig`.
        bits_override: bits from a matching ``overrides`` rule, if any.

    Returns:
        An :class:`AttentionQuantSpec`.

    Examples:
        >>> spec = plan_attention("cross_attn", QuantConfig(bits=4, profile="seed"))
        >>> spec.proj_weight_bits, spec.attn_bits
        (None, 8)
        >>> plan_attention("cross_attn", QuantConfig(bits=4)).proj_input_bits
        4
        >>> plan_attention("cross_attn", QuantConfig(bits=4, profile="deploy")).activation.granularity
        'per_tensor'
    """
    b = bits_override if bits_override is not None else config.bits
    a = bits_override if bits_override is not None else config.activation_bits
    common = {
        "weight": config.weight,
        "activation": config.activation,
        "attn_bits": config.attn_bits,
        "prob_signed": config.symmetric_activations,
    }
    if config.profile in ("paper", "deploy"):
        return AttentionQuantSpec(proj_weight_bits=b, proj_input_bits=a, out_weight_bits=b, out_input_bits=a, **common)
    # seed profile
    if role == "cross_attn":
        return AttentionQuantSpec(proj_weight_bits=None, proj_input_bits=None, out_weight_bits=None, out_input_bits=None, **common)
    return AttentionQuantSpec(proj_weight_bits=b, proj_input_bits=None, out_weight_bits=b, out_input_bits=None, **common)
