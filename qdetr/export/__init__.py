"""ONNX export: float detectors as plain ONNX, quantized ones as standard QDQ ONNX.

Public API:

* :func:`export_onnx` (also ``qdetr.export_onnx``) and its :class:`ExportOptions`;
* :func:`to_export_form`: the rewritten PyTorch model that is traced;
* :class:`ExportError`: what the exporter cannot represent, with what to do about it;
* :func:`integer_kernel_report`: the share of multiply-adds onnxruntime runs on integer kernels;
* :class:`OnnxDetector`: an exported file run by onnxruntime, called like the PyTorch model.

See docs/concepts/deploy-profile.md for the numerics, opsets and runtime constraints.
"""

from qdetr.export.kernel_report import IntegerKernelReport, KernelMultiplyAdds, integer_kernel_report
from qdetr.export.onnx_qdq import ExportOptions, export_metadata, export_onnx, to_export_form
from qdetr.export.onnx_runtime import OnnxDetector, load_onnx_for_inference
from qdetr.export.qdq_modules import ExportError

__all__ = [
    "export_onnx",
    "ExportOptions",
    "export_metadata",
    "to_export_form",
    "ExportError",
    "integer_kernel_report",
    "IntegerKernelReport",
    "KernelMultiplyAdds",
    "OnnxDetector",
    "load_onnx_for_inference",
]
