"""``quant_summary``: per-layer bit widths and coverage of a quantized model."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from qdetr.quant.api import REPORT_ATTR
from qdetr.quant.attention import QuantMultiheadAttention
from qdetr.quant.attention_adapters import find_attention_adapter
from qdetr.quant.modules import QuantConv2d, QuantLinear
from qdetr.quant.quantizers import LSQActQuantizer, LSQWeightQuantizer
from qdetr.quant.residual_outputs import IdentityQuantizedBottleneck, OutputQuantizedBatchNorm2d

__all__ = ["QuantSummary", "LayerSummary", "quant_summary"]


@dataclass(frozen=True)
class LayerSummary:
    """One row: module name, kind (``conv``/``linear``/``attention``), bits and status.

    Examples:
        >>> from qdetr.quant import quantize_model
        >>> row = quant_summary(quantize_model(nn.Sequential(nn.Linear(8, 4)), bits=4)).layers[0]
        >>> row.name, row.kind, row.weight_bits, row.status
        ('0', 'linear', '4', 'quantized (linear)')
    """

    name: str
    kind: str
    weight_bits: str
    input_bits: str
    attn_bits: str
    status: str


@dataclass
class QuantSummary:
    """Per-layer table plus coverage counts ``{kind: (quantized, total)}``.

    ``str(summary)`` renders a readable table.

    Examples:
        >>> from qdetr.quant import quantize_model
        >>> model = quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)), bits=4)
        >>> summary = quant_summary(model)
        >>> summary.coverage
        {'conv': (2, 2), 'linear': (0, 0), 'attention': (0, 0)}
        >>> [(row.name, row.weight_bits) for row in summary.layers]    # the stem conv gets 8 bits
        [('0', '8'), ('2', '4')]
    """

    layers: list[LayerSummary] = field(default_factory=list)

    @property
    def coverage(self) -> dict[str, tuple[int, int]]:
        """``{kind: (quantized, total)}`` for ``conv``, ``linear`` and ``attention``."""
        out: dict[str, tuple[int, int]] = {}
        for kind in ("conv", "linear", "attention"):
            rows = [r for r in self.layers if r.kind == kind]
            out[kind] = (sum(r.status.startswith("quantized") for r in rows), len(rows))
        return out

    @property
    def float_layers(self) -> dict[str, str]:
        """``{name: reason}`` for layers left in float."""
        return {r.name: r.status for r in self.layers if not r.status.startswith("quantized")}

    def __str__(self) -> str:
        head = ("module", "kind", "W", "A", "attn", "status")
        rows = [head] + [(r.name, r.kind, r.weight_bits, r.input_bits, r.attn_bits, r.status) for r in self.layers]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        cov = ", ".join(f"{k}: {q}/{t}" for k, (q, t) in self.coverage.items())
        lines.append("")
        lines.append(f"coverage (quantized/total): {cov}")
        lines.append("A: s/u = signed/unsigned input range, ? = decided from the first calibration batch")
        return "\n".join(lines)


def _bits(q: nn.Module | None) -> str:
    return str(q.bits) if isinstance(q, (LSQWeightQuantizer, LSQActQuantizer)) else "fp"


def _sign(q: nn.Module | None) -> str:
    if not isinstance(q, LSQActQuantizer):
        return ""
    if not q.is_initialized and q.signed_mode == "auto":
        return "?"
    return "s" if q._is_signed else "u"


def quant_summary(model: nn.Module) -> QuantSummary:
    """Describe what :func:`qdetr.quantize_model` did to ``model``.

    Returns:
        A :class:`QuantSummary`; ``print(summary)`` shows one row per Conv2d/Linear/attention
        module (and, in the deploy profile, one ``output`` row per residual output quantizer)
        with weight, input and attention bits (``s``/``u`` = signed/unsigned input,
        ``?`` = not calibrated yet) and, for float layers, why they stayed float.

    Examples:
        >>> import qdetr
        >>> model = qdetr.quantize_model(qdetr.create_model("detr_tiny"), bits=4)
        >>> summary = quant_summary(model)
        >>> summary.coverage["attention"]
        (5, 5)
        >>> summary.float_layers["input_proj"]
        'float: input_proj (float in every profile)'
        >>> print(summary)  # doctest: +ELLIPSIS
        module                                       kind       W        A        attn  status
        ...
        transformer.decoder.layers.0.multihead_attn  attention  4/out 4  4/out 4  8     quantized (cross_attn)
        ...
    """
    report: dict[str, str] = getattr(model, REPORT_ATTR, {})
    summary = QuantSummary()
    inside_attention: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside_attention):
            continue
        adapter = find_attention_adapter(m)
        if adapter is not None:
            inside_attention.append(name)
            inputs, outputs, host = adapter.layers(m)
            if isinstance(m, QuantMultiheadAttention):
                w, a = _bits(m.in_proj_weight_quantizer), _bits(m.q_input_quantizer)
            elif inputs and not isinstance(m, nn.MultiheadAttention):
                w = _bits(getattr(inputs[0], "weight_quantizer", None))
                a = _bits(getattr(inputs[0], "input_quantizer", None))
            else:
                w = a = "fp"
            if outputs and isinstance(outputs[0], QuantLinear):
                w += f"/out {_bits(outputs[0].weight_quantizer)}"
                a += f"/out {_bits(outputs[0].input_quantizer)}"
            attn = _bits(getattr(host, "prob_quantizer", None)) if host is not None else "fp"
            status = report.get(name, "float: not quantized")
            if attn == "fp" and w.startswith("fp") and status.startswith("quantized"):
                status = "float"
            summary.layers.append(LayerSummary(name, "attention", w, a, attn, status))
        elif isinstance(m, OutputQuantizedBatchNorm2d):
            a = _bits(m.output_quantizer) + _sign(m.output_quantizer)
            status = report.get(name, "quantized (output)")
            summary.layers.append(LayerSummary(name, "output", "", a, "", status))
        elif isinstance(m, IdentityQuantizedBottleneck):
            qname = f"{name}.identity_quantizer"
            a = _bits(m.identity_quantizer) + _sign(m.identity_quantizer)
            summary.layers.append(LayerSummary(qname, "output", "", a, "", report.get(qname, "quantized (output)")))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
            if isinstance(m, (QuantConv2d, QuantLinear)):
                w = _bits(m.weight_quantizer)
                a = _bits(m.input_quantizer) + _sign(m.input_quantizer)
                status = report.get(name, "quantized")
            else:
                w = a = "fp"
                status = report.get(name, "float: not quantized")
            summary.layers.append(LayerSummary(name, kind, w, a, "", status))
    return summary
