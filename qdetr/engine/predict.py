"""Inference on image files: detections drawn on the images (PNG) plus a JSON summary.

Models come from :func:`qdetr.zoo.resolve_model` (a run folder, a ``save_pretrained`` folder,
``model_final.pt``, ``checkpoint.pt``, a release ``.pth``, a zoo name or a Hub id); images are
preprocessed with :func:`qdetr.models.preprocess_images` and the model's recorded
:class:`qdetr.models.PreprocessingConfig`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes

from qdetr.engine.prediction_outputs import prediction_output_paths
from qdetr.image_io import read_rgb_image
from qdetr.models.preprocessing import PreprocessingConfig

__all__ = ["LoadedModel", "load_model_for_inference", "predict_images"]

_PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990")


@dataclass
class LoadedModel:
    """A model ready for inference with its labels and image preprocessing.

    Attributes:
        model: the detector in eval mode.
        categories: category id -> name.
        preprocessing: resize and normalisation the model expects.

    Examples:
        >>> import qdetr
        >>> from qdetr.engine.predict import LoadedModel
        >>> from qdetr.models import PreprocessingConfig
        >>> model = qdetr.create_model("detr_tiny").eval()
        >>> loaded = LoadedModel(model=model, categories={1: "rectangle"},
        ...                      preprocessing=PreprocessingConfig(shortest_edge=64))
        >>> loaded.preprocessing.longest_edge, loaded.preprocessing.image_mean
        (1333, (0.485, 0.456, 0.406))
    """

    model: nn.Module
    categories: dict[int, str]
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)


def load_model_for_inference(
    source: str | Path, map_location: str | torch.device = "cpu", *, backend: str = "pytorch"
) -> LoadedModel:
    """Resolves ``source`` to a model (:func:`qdetr.zoo.resolve_model`) with its labels and preprocessing.

    Args:
        source: a run folder, a ``save_pretrained`` folder, a model or checkpoint file, a
            release ``.pth``, a zoo name or a Hub id; with ``backend="onnxruntime"``, an
            exported ``.onnx`` file.
        map_location: device the model is loaded to.
        backend: ``"pytorch"`` or ``"onnxruntime"`` (the model is a
            :class:`qdetr.export.onnx_runtime.OnnxDetector` run on CPU).

    Returns:
        The model in eval mode with its categories and the preprocessing recorded with it
        (800/1333 and ImageNet normalisation when none is recorded).

    Raises:
        FileNotFoundError: when nothing loadable is at ``source`` (the message says what is missing).
        ValueError: an unknown ``backend``, or an ``.onnx`` file with the PyTorch backend.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.models import PreprocessingConfig, create_model
        >>> from qdetr.engine.predict import load_model_for_inference
        >>> with tempfile.TemporaryDirectory() as run_dir:
        ...     _ = create_model("detr_tiny", num_classes=5).save_pretrained(
        ...         Path(run_dir) / "model", id2label={1: "rectangle"},
        ...         preprocessing=PreprocessingConfig(shortest_edge=64, longest_edge=None))
        ...     loaded = load_model_for_inference(run_dir)  # the run folder is enough
        >>> loaded.preprocessing.shortest_edge, loaded.categories, loaded.model.training
        (64, {1: 'rectangle'}, False)
    """
    if backend == "onnxruntime":
        from qdetr.export.onnx_runtime import load_onnx_for_inference

        return load_onnx_for_inference(source)
    if backend != "pytorch":
        raise ValueError(f"backend must be 'pytorch' or 'onnxruntime'; got {backend!r}")
    if str(source).endswith(".onnx"):
        raise ValueError(f"{source} is an ONNX file: load it with backend='onnxruntime' (CLI: --backend onnxruntime)")
    from qdetr.zoo.prediction import recorded_preprocessing
    from qdetr.zoo.resolve import resolve_model

    model = resolve_model(source, device=map_location)
    return LoadedModel(
        model=model,
        categories={int(k): v for k, v in (getattr(model, "id2label", None) or {}).items()},
        preprocessing=recorded_preprocessing(model),
    )


def _label_text(category_id: int, score: float, categories: dict[int, str]) -> str:
    return f"{categories.get(category_id, str(category_id))} {score:.2f}"


@torch.no_grad()
def predict_images(
    loaded: LoadedModel,
    image_paths: list[str | Path],
    out_dir: str | Path,
    *,
    threshold: float = 0.5,
    device: str | torch.device = "cpu",
    box_width: int = 2,
    display_short_side: int | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """Detects objects in image files and writes ``<stem>.pred.png`` (boxes drawn) and ``predictions.json``.

    Output names follow :func:`qdetr.engine.prediction_outputs.prediction_output_paths`: inputs
    that share a stem get distinct names, an output never replaces an input, and outputs of an
    earlier run are only replaced with ``overwrite=True``. Every file is written atomically.

    Args:
        loaded: the model and its preprocessing.
        image_paths: image files (any PIL-readable format; converted to RGB).
        out_dir: output folder (created).
        threshold: minimum score of drawn/listed detections.
        device: where to run the model.
        box_width: line width of the drawn boxes.
        display_short_side: draw on a copy resized to this short side (small images get
            readable labels); the JSON keeps original-image coordinates.
        overwrite: replace outputs of an earlier run in ``out_dir`` (inputs are never replaced).

    Returns:
        One record per image: ``{"image", "output", "detections": [{"category_id", "label",
        "score", "box_xyxy"}]}`` (boxes in pixels of the original image).

    Raises:
        FileNotFoundError: for a missing image file (named in the message).
        InputImageError: an image file that cannot be read or used (named in the message).
        OutputExistsError: an output would replace an input, or an earlier output without
            ``overwrite``; checked before anything is written. On any failure nothing in
            ``out_dir`` is created or replaced (outputs are staged and moved into place at the end).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import qdetr
        >>> from qdetr.data import SyntheticShapesConfig, render_synthetic_sample
        >>> from qdetr.engine.predict import LoadedModel, predict_images
        >>> from qdetr.models import PreprocessingConfig
        >>> loaded = LoadedModel(model=qdetr.create_model("detr_tiny"), categories={1: "rectangle"},
        ...                      preprocessing=PreprocessingConfig(shortest_edge=64))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     image_path = Path(tmp) / "shapes.png"
        ...     render_synthetic_sample(0, SyntheticShapesConfig(image_size=64)).image.save(image_path)
        ...     records = predict_images(loaded, [image_path], Path(tmp) / "out", threshold=0.0)
        ...     written = sorted(p.name for p in (Path(tmp) / "out").iterdir())
        >>> written
        ['predictions.json', 'shapes.pred.png']
        >>> record = records[0]
        >>> detections = record["detections"]
        >>> len(detections) > 0, sorted(detections[0])
        (True, ['box_xyxy', 'category_id', 'label', 'score'])
    """
    out_dir = Path(out_dir)
    image_paths = [Path(p) for p in image_paths]
    missing = [str(p) for p in image_paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"image not found: {', '.join(missing[:5])}")
    output_paths, summary_path = prediction_output_paths(image_paths, out_dir, overwrite=overwrite)
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    # All or nothing: outputs are written to a hidden staging folder and moved into place at the end, so a
    # failure (an unreadable image, Ctrl-C) leaves the output folder as it was. A killed run leaves only a
    # hidden .qdetr-predict-* folder, which later runs ignore.
    staging = Path(tempfile.mkdtemp(prefix=".qdetr-predict-", dir=out_dir))
    try:
        records = _predict_into(loaded, image_paths, output_paths, staging, threshold=threshold, device=device,
                                box_width=box_width, display_short_side=display_short_side)
        (staging / summary_path.name).write_text(json.dumps(records, indent=1))
        for output in [*output_paths, summary_path]:
            os.replace(staging / output.name, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return records


def _predict_into(loaded: LoadedModel, image_paths: list[Path], output_paths: list[Path], staging: Path, *,
                  threshold: float, device, box_width: int, display_short_side: int | None) -> list[dict]:
    """Run the model on each image and write the drawn copies into ``staging`` (named as their final outputs)."""
    from qdetr.models import post_process_object_detection, preprocess_images

    model = loaded.model.to(device).eval()
    records = []
    for image_path, output in zip(image_paths, output_paths):
        rgb = TF.pil_to_tensor(read_rgb_image(image_path))  # (3, H, W) uint8; 16-bit files scaled
        height, width = rgb.shape[-2:]
        batch = preprocess_images([rgb], loaded.preprocessing)
        outputs = model(batch["pixel_values"].to(device), batch["pixel_mask"].to(device))
        result = post_process_object_detection(
            outputs, threshold=threshold, target_sizes=torch.tensor([[height, width]], device=device)
        )[0]
        boxes_xyxy = result["boxes"].cpu().clamp(min=0)
        boxes_xyxy[:, 0::2] = boxes_xyxy[:, 0::2].clamp(max=width)
        boxes_xyxy[:, 1::2] = boxes_xyxy[:, 1::2].clamp(max=height)
        labels = [int(v) for v in result["labels"].cpu()]
        scores = [float(v) for v in result["scores"].cpu()]
        texts = [_label_text(c, s, loaded.categories) for c, s in zip(labels, scores)]
        colours = [_PALETTE[c % len(_PALETTE)] for c in labels]
        canvas, canvas_boxes = rgb, boxes_xyxy
        if display_short_side is not None and display_short_side != min(height, width):
            factor = display_short_side / min(height, width)
            canvas = TF.resize(rgb, size=display_short_side, antialias=True)
            canvas_boxes = boxes_xyxy * factor
        drawn = (
            draw_bounding_boxes(canvas, canvas_boxes, labels=texts, colors=colours, width=box_width)
            if labels
            else canvas
        )
        TF.to_pil_image(drawn).save(staging / output.name, format="PNG")
        records.append(
            {
                "image": str(image_path),
                "output": str(output),
                "detections": [
                    {
                        "category_id": c,
                        "label": loaded.categories.get(c, str(c)),
                        "score": s,
                        "box_xyxy": [float(v) for v in box],
                    }
                    for c, s, box in zip(labels, scores, boxes_xyxy.tolist())
                ],
            }
        )
    return records
