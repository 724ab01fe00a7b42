"""Run an exported detector in onnxruntime with the PyTorch model's interface.

:class:`OnnxDetector` wraps an ``onnxruntime.InferenceSession`` of a file exported from a qdetr
detector (float, or QDQ from :func:`qdetr.export_onnx`) and returns the same output dict as the
PyTorch model: ``pred_logits`` (B, Q, C[+1]) and ``pred_boxes`` (B, Q, 4) normalised cxcywh, as
float32 CPU tensors, tagged with the classification head so that
:func:`qdetr.models.post_process_object_detection` dispatches as for the PyTorch model.

It is a parameter-free ``nn.Module`` so that the code written for PyTorch detectors accepts it
unchanged: :func:`qdetr.engine.evaluate_coco`, :func:`qdetr.engine.predict.predict_images`
(``qdetr predict --backend onnxruntime``) and :func:`qdetr.zoo.predict` / ``detector.predict``.

The file's metadata (``metadata_props``) is read when present: ``qdetr.classification``
(``"softmax"`` or ``"sigmoid"``), ``qdetr.id2label`` (JSON) and ``qdetr.preprocessing`` (JSON
of a :class:`qdetr.models.PreprocessingConfig`; the 0.1 names ``eval_size``, ``max_size``, ``mean``, ``std`` are read too).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["OnnxDetector", "load_onnx_for_inference"]

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
_LEVELS = ("disable", "basic", "extended", "all")


class OnnxDetector(nn.Module):
    """An exported qdetr detector run by onnxruntime, called like the PyTorch model.

    Args:
        path: the ``.onnx`` file (inputs ``pixel_values``, ``pixel_mask``; outputs
            ``pred_logits``, ``pred_boxes``).
        providers: onnxruntime execution providers, in order of preference.
        intra_op_threads: onnxruntime intra-op threads (None: onnxruntime's default, all cores).
        classification: ``"softmax"`` or ``"sigmoid"``; default: the file's
            ``qdetr.classification`` metadata.
        optimization_level: ``"disable"``, ``"basic"``, ``"extended"`` or ``"all"`` (default;
            a QDQ file then runs on integer kernels).
        session_config: extra ``SessionOptions.add_session_config_entry`` keys.

    Shapes:
        pixel_values: (B, 3, H, W) float; pixel_mask: (B, H, W), 1 = real pixel (default: all ones).
        returns ``{"pred_logits": (B, Q, C[+1]), "pred_boxes": (B, Q, 4)}`` float32 on CPU.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file lacks the expected inputs/outputs, or inputs do not fit its static shapes.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> import qdetr
        >>> from qdetr.export.onnx_runtime import OnnxDetector
        >>> model = qdetr.create_model("detr_tiny").eval()
        >>> pixel_values = torch.randn(2, 3, 64, 80)
        >>> pixel_mask = torch.ones(2, 64, 80, dtype=torch.int64)
        >>> pixel_mask[1, :, 60:] = 0  # the second image is padded
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = qdetr.export_onnx(model, Path(tmp) / "detr_tiny.onnx")  # doctest: +ELLIPSIS
        ...     detector = OnnxDetector(path, intra_op_threads=1)
        ...     outputs = detector(pixel_values, pixel_mask)
        >>> with torch.no_grad():
        ...     reference = model(pixel_values, pixel_mask)
        >>> sorted(outputs), outputs.classification  # the head comes from the file's metadata
        (['pred_boxes', 'pred_logits'], 'softmax')
        >>> torch.allclose(outputs["pred_boxes"], reference["pred_boxes"], atol=1e-4)
        True
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int | None = None,
        *,
        classification: str | None = None,
        optimization_level: str = "all",
        session_config: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {path}; export one first (qdetr export ...)")
        if optimization_level not in _LEVELS:
            raise ValueError(f"optimization_level must be one of {_LEVELS}; got {optimization_level!r}")
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization_level]
        if intra_op_threads is not None:
            options.intra_op_num_threads = int(intra_op_threads)
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        inputs = {arg.name: arg for arg in self.session.get_inputs()}
        outputs = [arg.name for arg in self.session.get_outputs()]
        if "pixel_values" not in inputs or not {"pred_logits", "pred_boxes"} <= set(outputs):
            raise ValueError(
                f"{path} has inputs {sorted(inputs)} and outputs {outputs}; expected inputs pixel_values "
                "[, pixel_mask] and outputs pred_logits, pred_boxes (export with qdetr export / DetectorForExport)"
            )
        self._inputs = inputs
        head = classification or self.metadata.get("qdetr.classification")
        if head not in ("softmax", "sigmoid"):
            raise ValueError(
                f"cannot tell the classification head of {path} (no qdetr.classification metadata); "
                "pass classification='softmax' (DETR) or 'sigmoid' (SMCA)"
            )
        self.classification = head
        self.id2label: dict[int, str] = {
            int(k): v for k, v in json.loads(self.metadata.get("qdetr.id2label", "{}")).items()
        }
        # Read like a saved model's config.json, so qdetr.zoo.prediction.recorded_preprocessing finds it.
        self.qdetr_pretrained_config: dict[str, Any] = {
            "preprocessing": json.loads(self.metadata.get("qdetr.preprocessing", "{}")) or None
        }

    def _check_static_shape(self, name: str, shape: tuple[int, ...]) -> None:
        expected = self._inputs[name].shape
        if len(expected) != len(shape) or any(
            isinstance(e, int) and e != s for e, s in zip(expected, shape)
        ):
            raise ValueError(
                f"{self.path} was exported for {name} of shape {expected} (names are free sizes); got {tuple(shape)}. "
                "Resize/pad the input to that shape or export with dynamic shapes"
            )

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None):
        """Runs the session; returns a :class:`qdetr.models.DetectionOutput` with float32 CPU tensors."""
        from qdetr.models import DetectionOutput

        feed = {"pixel_values": pixel_values.detach().cpu().numpy().astype(
            _NUMPY_TYPES.get(self._inputs["pixel_values"].type, np.float32), copy=False)}
        if "pixel_mask" in self._inputs:
            if pixel_mask is None:
                pixel_mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.int64)
            feed["pixel_mask"] = pixel_mask.detach().cpu().numpy().astype(
                _NUMPY_TYPES.get(self._inputs["pixel_mask"].type, np.int64), copy=False)
        for name, value in feed.items():
            self._check_static_shape(name, value.shape)
        logits, boxes = self.session.run(["pred_logits", "pred_boxes"], feed)
        return DetectionOutput(
            classification=self.classification,
            pred_logits=torch.from_numpy(np.asarray(logits, dtype=np.float32)),
            pred_boxes=torch.from_numpy(np.asarray(boxes, dtype=np.float32)),
        )

    def predict(self, images: Any, threshold: float = 0.5, **kwargs) -> list[dict[str, torch.Tensor]]:
        """``predict(images, threshold=0.5, *, batch_size=1, preprocessing=None, top_k=None)``; see
        :func:`qdetr.zoo.prediction.predict` (the same preprocessing and post-processing)."""
        from qdetr.zoo.prediction import predict

        return predict(self, images, threshold, **kwargs)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, classification={self.classification!r}"


def load_onnx_for_inference(
    path: str | os.PathLike, *, intra_op_threads: int | None = None, classification: str | None = None
):
    """An exported file as a :class:`qdetr.engine.predict.LoadedModel` (for ``qdetr predict``).

    Categories and preprocessing sizes come from the file's ``qdetr.id2label`` /
    ``qdetr.preprocessing`` metadata (defaults: no names, 800 / 1333, ImageNet statistics).

    Args:
        path: the ``.onnx`` file.
        intra_op_threads: onnxruntime intra-op threads (None: all cores).
        classification: overrides the file's ``qdetr.classification``.

    Returns:
        A ``LoadedModel`` whose ``model`` is an :class:`OnnxDetector`.

    Examples:
        >>> import json
        >>> import tempfile
        >>> import warnings
        >>> from pathlib import Path
        >>> import onnx
        >>> import torch
        >>> from qdetr.export.onnx_runtime import load_onnx_for_inference
        >>> class Toy(torch.nn.Module):  # 1 query, 2 classes + no-object, from the mean colour
        ...     def forward(self, pixel_values, pixel_mask):
        ...         logits = pixel_values.mean((2, 3))[:, None, :]
        ...         return logits, logits[..., [0, 1, 2, 0]].sigmoid()
        >>> with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     path = Path(tmp) / "toy.onnx"
        ...     torch.onnx.export(Toy(), (torch.rand(1, 3, 8, 8), torch.ones(1, 8, 8, dtype=torch.int64)), path,
        ...                       dynamo=False, input_names=["pixel_values", "pixel_mask"],
        ...                       output_names=["pred_logits", "pred_boxes"])
        ...     proto = onnx.load(path)
        ...     for key, value in {"qdetr.classification": "softmax", "qdetr.id2label": json.dumps({"1": "cat"}),
        ...                        "qdetr.preprocessing": json.dumps({"eval_size": 8, "max_size": None})}.items():
        ...         _ = proto.metadata_props.add(key=key, value=value)
        ...     onnx.save(proto, path)
        ...     loaded = load_onnx_for_inference(path, intra_op_threads=1)
        ...     outputs = loaded.model(torch.rand(1, 3, 8, 8))  # pixel_mask defaults to all ones
        >>> type(loaded.model).__name__, loaded.categories, loaded.preprocessing.shortest_edge, loaded.preprocessing.longest_edge
        ('OnnxDetector', {1: 'cat'}, 8, None)
        >>> outputs["pred_logits"].shape, outputs["pred_boxes"].shape
        (torch.Size([1, 1, 3]), torch.Size([1, 1, 4]))
    """
    from qdetr.engine.predict import LoadedModel
    from qdetr.zoo.prediction import recorded_preprocessing

    detector = OnnxDetector(path, intra_op_threads=intra_op_threads, classification=classification)
    return LoadedModel(model=detector, categories=dict(detector.id2label), preprocessing=recorded_preprocessing(detector))
