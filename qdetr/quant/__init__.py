"""Quantization core: LSQ/LSQ+ quantizers, quantized layers and ``quantize_model``.

Public API:

* :func:`quantize_model`, :class:`QuantConfig`, :func:`quant_summary`;
* :func:`calibrate`, :func:`calibration`;
* quantizers :class:`LSQWeightQuantizer`, :class:`LSQActQuantizer`;
* layers :class:`QuantConv2d`, :class:`QuantLinear`, :class:`QuantMultiheadAttention`.
"""

from qdetr.quant.api import is_quantized, quantize_model
from qdetr.quant.attention import QuantMultiheadAttention
from qdetr.quant.activation_calibration import calibrate, calibration
from qdetr.quant.config import AttentionQuantSpec, LayerQuantSpec, QuantConfig, QuantizerConfig
from qdetr.quant.modules import QuantConv2d, QuantLinear
from qdetr.quant.quantizers import LSQActQuantizer, LSQWeightQuantizer, UncalibratedQuantizerError
from qdetr.quant.summary import QuantSummary, quant_summary

__all__ = [
    # user API
    "quantize_model",
    "QuantConfig",
    "QuantizerConfig",
    "quant_summary",
    "QuantSummary",
    "calibrate",
    "calibration",
    "is_quantized",
    # quantizers
    "LSQWeightQuantizer",
    "LSQActQuantizer",
    "UncalibratedQuantizerError",
    # layers
    "QuantConv2d",
    "QuantLinear",
    "QuantMultiheadAttention",
    "LayerQuantSpec",
    "AttentionQuantSpec",
]
