"""Inference on image files: detections drawn on the images (PNG) plus a JSON summary.

Models are read from:

* a model file written by the trainer (``model_final.pt``) or a run folder holding one;
* a ``save_pretrained`` folder (``config.json`` + ``model.safetensors``, :mod:`qdetr.zoo`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes

from qdetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["LoadedModel", "load_model_for_inference", "predict_images"]

_PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990")


@dataclass
class LoadedModel:
    """A model ready for inference with its labels and image sizes.

    Attributes:
        model: the detector in eval mode.
        categories: category id -> name.
        eval_size: short side the model expects.
        max_size: cap on the long side (None = no cap).
        mean, std: normalisation.

    Examples:
        >>> import qdetr
        >>> from qdetr.engine.predict import LoadedModel
        >>> model = qdetr.create_model("detr_tiny").eval()
        >>> loaded = LoadedModel(model=model, categories={1: "rectangle"}, eval_size=64)
        >>> loaded.max_size, loaded.mean
        (1333, (0.485, 0.456, 0.406))
    """

    model: nn.Module
    categories: dict[int, str]
    eval_size: int = 800
    max_size: int | None = 1333
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def load_model_for_inference(
    path: str | Path, map_location: str | torch.device = "cpu", *, backend: str = "pytorch"
) -> LoadedModel:
    """Loads a trainer model file, a run folder or a ``save_pretrained`` folder.

    Args:
        path: ``model_final.pt``, a run folder holding one, or a ``save_pretrained`` folder;
            with ``backend="onnxruntime"``, an exported ``.onnx`` file.
        map_location: device the model is loaded to.
        backend: ``"pytorch"`` or ``"onnxruntime"`` (the model is a
            :class:`qdetr.export.onnx_runtime.OnnxDetector` run on CPU).

    Returns:
        The model in eval mode with its categories and preprocessing sizes.

    Raises:
        FileNotFoundError: when nothing loadable is at ``path`` (the message lists what was tried).
        ValueError: an unknown ``backend``, or an ``.onnx`` file with the PyTorch backend.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.engine import save_model_file
        >>> from qdetr.engine.model_files import build_model
        >>> from qdetr.engine.predict import load_model_for_inference
        >>> with tempfile.TemporaryDirectory() as run_dir:
        ...     _ = save_model_file(
        ...         Path(run_dir) / "model_final.pt", build_model("detr_tiny", 5), model_name="detr_tiny",
        ...         model_config={}, num_classes=5, quant=None, alignment=False, categories={1: "rectangle"},
        ...         preprocessing={"eval_size": 64, "max_size": None},
        ...     )
        ...     loaded = load_model_for_inference(run_dir)  # the run folder is enough
        >>> loaded.eval_size, loaded.max_size, loaded.categories, loaded.model.training
        (64, None, {1: 'rectangle'}, False)
    """
    if backend == "onnxruntime":
        from qdetr.export.onnx_runtime import load_onnx_for_inference

        return load_onnx_for_inference(path)
    if backend != "pytorch":
        raise ValueError(f"backend must be 'pytorch' or 'onnxruntime'; got {backend!r}")
    from qdetr.engine.model_files import load_model_file

    path = Path(path)
    if path.suffix == ".onnx":
        raise ValueError(f"{path} is an ONNX file: load it with backend='onnxruntime' (CLI: --backend onnxruntime)")
    if path.is_dir() and (path / "model_final.pt").is_file():
        path = path / "model_final.pt"
    if path.is_file():
        model, meta = load_model_file(path, map_location=map_location)
        pre = meta.get("preprocessing") or {}
        return LoadedModel(
            model=model,
            categories={int(k): v for k, v in meta.get("categories", {}).items()},
            eval_size=int(pre.get("eval_size", 800)),
            max_size=pre.get("max_size", 1333),
            mean=tuple(pre.get("mean", IMAGENET_MEAN)),
            std=tuple(pre.get("std", IMAGENET_STD)),
        )
    if path.is_dir() and (path / "config.json").is_file():
        from qdetr.zoo.hub import load_pretrained_dir

        model = load_pretrained_dir(path, device=map_location)
        config = getattr(model, "qdetr_pretrained_config", {}) or {}
        pre = config.get("preprocessing") or (config.get("provenance") or {}).get("preprocessing") or {}
        return LoadedModel(
            model=model,
            categories={int(k): v for k, v in (getattr(model, "id2label", None) or {}).items()},
            eval_size=int(pre.get("eval_size", 800)),
            max_size=pre.get("max_size", 1333),
            mean=tuple(pre.get("mean", IMAGENET_MEAN)),
            std=tuple(pre.get("std", IMAGENET_STD)),
        )
    raise FileNotFoundError(
        f"no model at {path}: expected a model_final.pt written by `qdetr train`, a run folder holding one, "
        "or a save_pretrained folder with config.json"
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
) -> list[dict]:
    """Detects objects in image files and writes ``<stem>.png`` (boxes drawn) and ``predictions.json``.

    Args:
        loaded: the model and its preprocessing.
        image_paths: image files (any PIL-readable format; converted to RGB).
        out_dir: output folder (created).
        threshold: minimum score of drawn/listed detections.
        device: where to run the model.
        box_width: line width of the drawn boxes.
        display_short_side: draw on a copy resized to this short side (small images get
            readable labels); the JSON keeps original-image coordinates.

    Returns:
        One record per image: ``{"image", "output", "detections": [{"category_id", "label",
        "score", "box_xyxy"}]}`` (boxes in pixels of the original image).

    Raises:
        FileNotFoundError: for a missing image file (named in the message).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import qdetr
        >>> from qdetr.data import SyntheticShapesConfig, render_synthetic_sample
        >>> from qdetr.engine.predict import LoadedModel, predict_images
        >>> loaded = LoadedModel(model=qdetr.create_model("detr_tiny"), categories={1: "rectangle"}, eval_size=64)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     image_path = Path(tmp) / "shapes.png"
        ...     render_synthetic_sample(0, SyntheticShapesConfig(image_size=64)).image.save(image_path)
        ...     records = predict_images(loaded, [image_path], Path(tmp) / "out", threshold=0.0)
        ...     written = sorted(p.name for p in (Path(tmp) / "out").iterdir())
        >>> written
        ['predictions.json', 'shapes.png']
        >>> record = records[0]
        >>> detections = record["detections"]
        >>> len(detections) > 0, sorted(detections[0])
        (True, ['box_xyxy', 'category_id', 'label', 'score'])
    """
    from qdetr.models import post_process_object_detection

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = loaded.model.to(device).eval()
    records = []
    for image_path in image_paths:
        image_path = Path(image_path)
        if not image_path.is_file():
            raise FileNotFoundError(f"image not found: {image_path}")
        with Image.open(image_path) as pil:
            rgb = TF.pil_to_tensor(pil.convert("RGB"))  # (3, H, W) uint8
        height, width = rgb.shape[-2:]
        resized = TF.resize(rgb, size=loaded.eval_size, max_size=loaded.max_size, antialias=True)
        pixel_values = TF.normalize(TF.to_dtype(resized, torch.float32, scale=True), list(loaded.mean), list(loaded.std))
        pixel_values = pixel_values.unsqueeze(0).to(device)
        pixel_mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.int64, device=device)
        outputs = model(pixel_values, pixel_mask)
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
        output = out_dir / f"{image_path.stem}.png"
        TF.to_pil_image(drawn).save(output)
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
    (out_dir / "predictions.json").write_text(json.dumps(records, indent=1))
    return records
