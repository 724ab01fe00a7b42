"""ONNX export: float detectors as plain ONNX, quantized ones as standard QDQ ONNX.

Public API:

* :func:`export_onnx` (also ``qdetr.export_onnx``) and its :class:`ExportOptions`;
* :func:`to_export_form`: the rewritten PyTorch model that is traced;
* :class:`ExportError`: what the exporter cannot represent, with what to do about it.

See docs/concepts/deploy-profile.md for the numerics, opsets and runtime constraints.
"""

from qdetr.export.onnx_qdq import ExportOptions, export_onnx, to_export_form
from qdetr.export.qdq_modules import ExportError

__all__ = ["export_onnx", "ExportOptions", "to_export_form", "ExportError"]
