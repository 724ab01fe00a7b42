"""COCO-format detection dataset producing DETR targets.

Built on :class:`torchvision.datasets.CocoDetection` (which reads the annotation file with
pycocotools) and transforms v2: boxes travel as ``tv_tensors.BoundingBoxes`` through the
augmentation, then become DETR targets.

DETR target of one image (all tensors):

==============  ===========  ====================================================
key             shape        content
==============  ===========  ====================================================
``boxes``       (N, 4)       normalised cxcywh in [0, 1], relative to ``size``
``labels``      (N,)         raw COCO ``category_id`` (int64)
``image_id``    ()           COCO image id (int64)
``orig_size``   (2,)         (H, W) of the file on disk
``size``        (2,)         (H, W) after the transform (before batch padding)
==============  ===========  ====================================================

Bad input is handled explicitly:

* images listed in the annotation file but missing on disk raise ``FileNotFoundError``
  naming the files at construction, or are dropped with a warning with
  ``missing_images="skip"``;
* images without annotations are kept (negatives);
* crowd annotations (``iscrowd=1``) are ignored for training targets, as in DETR;
* boxes with width or height <= 0 are dropped and counted in one warning;
* boxes reaching outside the image are clipped to it (also counted);
* grayscale, palette, RGBA and CMYK images are converted to RGB; 16-bit images are scaled;
* malformed records (missing or mistyped ``id``, ``image_id``, ``category_id``, ``bbox``,
  ``file_name``, ``categories``; NaN boxes; unknown category ids; file names leaving the image
  folder) raise a :class:`~qdetr.errors.DataError` naming the file and the record;
* unreadable images raise an :class:`~qdetr.errors.InputImageError` naming the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from PIL import Image
from torchvision import tv_tensors
from pycocotools.coco import COCO
from torchvision.datasets import CocoDetection
from torchvision.datasets.vision import VisionDataset
from torchvision.transforms.v2 import functional as TF

from qdetr.data.coco_validation import read_coco_json, validate_coco_annotations
from qdetr.image_io import read_rgb_image

__all__ = ["CocoDetectionDataset", "AnnotationReport", "boxes_xyxy_to_cxcywh_normalized"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnotationReport:
    """What the dataset found wrong in its annotation file (counted once at construction).

    Attributes:
        num_images: images kept.
        num_missing_images: images listed but absent on disk (skipped).
        num_images_without_annotations: images kept as negatives.
        num_degenerate_boxes: boxes with w or h <= 0 (dropped).
        num_clipped_boxes: boxes reaching outside their image (clipped).
        num_crowd_boxes: crowd boxes (not used as training targets).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.data import CocoDetectionDataset, make_synthetic_coco
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     ann_file = make_synthetic_coco(tmp, num_images=2, image_size=64)
        ...     report = CocoDetectionDataset(Path(tmp) / "images", ann_file).report
        >>> report.num_images, report.num_missing_images, report.num_degenerate_boxes
        (2, 0, 0)
    """

    num_images: int
    num_missing_images: int
    num_images_without_annotations: int
    num_degenerate_boxes: int
    num_clipped_boxes: int
    num_crowd_boxes: int


def boxes_xyxy_to_cxcywh_normalized(boxes_xyxy: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Converts absolute xyxy boxes (N, 4) to normalised cxcywh (N, 4) for an image of (height, width).

    Args:
        boxes_xyxy: (N, 4) absolute xyxy boxes in pixels (x0, y0, x1, y1).
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        (N, 4) normalised cxcywh boxes (centre x, centre y, width, height as fractions of the
        image; in [0, 1] for boxes inside the image), in the dtype of ``boxes_xyxy``.

    Examples:
        >>> import torch
        >>> from qdetr.data import boxes_xyxy_to_cxcywh_normalized
        >>> boxes_xyxy = torch.tensor([[0.0, 0.0, 50.0, 100.0]])
        >>> boxes_xyxy_to_cxcywh_normalized(boxes_xyxy, height=100, width=200)
        tensor([[0.1250, 0.5000, 0.2500, 1.0000]])
    """
    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    boxes_cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
    scale = torch.tensor([width, height, width, height], dtype=boxes_cxcywh.dtype)
    return boxes_cxcywh / scale


class CocoDetectionDataset(CocoDetection):
    """A COCO-format dataset that returns ``(image, target)`` with DETR targets.

    Each item is ``(image, target)``: ``image`` is a (3, H, W) float32 tensor (normalised by
    the transforms, or in [0, 1] without them) and ``target`` the DETR target of the module
    table: ``boxes`` (N, 4) normalised cxcywh, ``labels`` (N,) int64 category ids,
    ``image_id`` (), ``orig_size`` (2,) and ``size`` (2,) as (H, W).

    Args:
        image_dir: folder holding the images named by ``file_name`` in the annotation file.
        ann_file: COCO ``instances`` JSON.
        transforms: a transforms v2 callable taking and returning ``(image, target)`` with
            ``target["boxes"]`` a ``BoundingBoxes`` (XYXY, absolute) and ``target["labels"]``;
            ``None`` returns the float image in [0, 1] unnormalised.
        missing_images: ``"error"`` (default) raises at construction if any listed image is
            missing; ``"skip"`` drops those images with a warning.

    Indexing with an int gives a sample; indexing with ``(index, seed)`` runs the random
    transforms under ``torch.manual_seed(seed)`` without touching the global RNG state, which
    makes augmentation independent of worker count and exactly resumable.

    Raises:
        FileNotFoundError: when ``ann_file`` or ``image_dir`` does not exist, or images are missing.
        DataError: a malformed annotation file; the message names the file and the record
            (see :mod:`qdetr.data.coco_validation`).
        ValueError: for an unknown ``missing_images`` option.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> from qdetr.data import CocoDetectionDataset, TransformConfig, make_eval_transforms, make_synthetic_coco
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     ann_file = make_synthetic_coco(tmp, num_images=2, image_size=64)
        ...     transforms = make_eval_transforms(TransformConfig.small(64))
        ...     dataset = CocoDetectionDataset(Path(tmp) / "images", ann_file, transforms)
        ...     image, target = dataset[0]
        ...     first, _ = dataset[(1, 7)]  # an (index, seed) key: reproducible augmentation
        ...     again, _ = dataset[(1, 7)]
        ...     same = torch.equal(first, again)
        >>> len(dataset), dataset.num_classes, same
        (2, 5, True)
        >>> image.shape
        torch.Size([3, 64, 64])
        >>> sorted(target)
        ['boxes', 'image_id', 'labels', 'orig_size', 'size']
        >>> target["boxes"].shape[1], bool(((target["boxes"] >= 0) & (target["boxes"] <= 1)).all())
        (4, True)
        >>> target["size"].tolist(), target["labels"].shape == target["boxes"].shape[:1]
        ([64, 64], True)
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transforms: Callable | None = None,
        *,
        missing_images: Literal["error", "skip"] = "error",
    ) -> None:
        if missing_images not in ("error", "skip"):
            raise ValueError(f"missing_images must be 'error' or 'skip'; got {missing_images!r}")
        ann_file, image_dir = Path(ann_file), Path(image_dir)
        if not ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
        if not image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {image_dir} (check the image_dir setting)")
        data = read_coco_json(ann_file)
        validate_coco_annotations(data, ann_file=ann_file, image_dir=image_dir)
        VisionDataset.__init__(self, str(image_dir))  # CocoDetection's set-up, from the validated dict
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs.keys())
        self.detr_transforms = transforms
        self.report = self._check_annotations(missing_images)

    # ------------------------------------------------------------------ checks
    def _check_annotations(self, missing_images: str) -> AnnotationReport:
        missing = [
            image_id
            for image_id in self.ids
            if not os.path.isfile(os.path.join(self.root, self.coco.imgs[image_id]["file_name"]))
        ]
        if missing:
            names = [self.coco.imgs[i]["file_name"] for i in missing[:5]]
            message = (
                f"{len(missing)} of {len(self.ids)} images listed in the annotation file are missing "
                f"from {self.root}, e.g. {names}"
            )
            if missing_images == "error":
                raise FileNotFoundError(message + "; fix the paths or pass missing_images='skip' to drop them")
            warnings.warn(message + "; they are skipped", stacklevel=3)
            missing_set = set(missing)
            self.ids = [i for i in self.ids if i not in missing_set]
        degenerate = clipped = crowd = empty = 0
        for image_id in self.ids:
            info = self.coco.imgs[image_id]
            anns = self.coco.imgToAnns.get(image_id, [])
            if not anns:
                empty += 1
            for ann in anns:
                if ann.get("iscrowd", 0):
                    crowd += 1
                    continue
                x, y, w, h = ann["bbox"]
                if w <= 0 or h <= 0:
                    degenerate += 1
                elif x < 0 or y < 0 or x + w > info.get("width", float("inf")) or y + h > info.get(
                    "height", float("inf")
                ):
                    clipped += 1
        if degenerate or clipped:
            warnings.warn(
                f"{self.root}: {degenerate} degenerate boxes (w or h <= 0) are dropped and "
                f"{clipped} boxes reaching outside their image are clipped",
                stacklevel=3,
            )
        report = AnnotationReport(
            num_images=len(self.ids),
            num_missing_images=len(missing),
            num_images_without_annotations=empty,
            num_degenerate_boxes=degenerate,
            num_clipped_boxes=clipped,
            num_crowd_boxes=crowd,
        )
        logger.info("COCO dataset %s: %s", self.root, report)
        return report

    # ------------------------------------------------------------------ access
    @property
    def category_ids(self) -> list[int]:
        """Sorted category ids of the annotation file."""
        return sorted(self.coco.cats)

    @property
    def category_names(self) -> dict[int, str]:
        """Category id -> name."""
        return {cid: cat["name"] for cid, cat in self.coco.cats.items()}

    @property
    def num_classes(self) -> int:
        """DETR's ``num_classes``: the largest category id + 1 (labels are raw ids)."""
        return max(self.coco.cats) + 1 if self.coco.cats else 1

    def _load_image(self, id: int) -> Image.Image:  # noqa: A002 - torchvision's name
        path = os.path.join(self.root, self.coco.loadImgs(id)[0]["file_name"])
        try:
            return read_rgb_image(path)  # grayscale, palette, RGBA, CMYK, 16-bit -> 8-bit RGB
        except FileNotFoundError as error:
            raise FileNotFoundError(f"image file disappeared after the dataset was built: {path}") from error

    def _raw_target(self, image_id: int, height: int, width: int) -> dict:
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w <= 0 or h <= 0:
                continue
            x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x1 <= x0 or y1 <= y0:  # entirely outside the image
                continue
            boxes.append([x0, y0, x1, y1])
            labels.append(int(ann["category_id"]))
        boxes_xyxy = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        return {
            "boxes": tv_tensors.BoundingBoxes(boxes_xyxy, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        """Returns ``(image (3, H, W) float, target)``; ``key`` is an index or ``(index, seed)``."""
        index, seed = (key if isinstance(key, tuple) else (key, None))
        image_id = self.ids[index]
        pil_image = self._load_image(image_id)
        width, height = pil_image.size
        image = tv_tensors.Image(TF.pil_to_tensor(pil_image))
        target = self._raw_target(image_id, height, width)
        if self.detr_transforms is None:
            image, target = TF.to_dtype(image, torch.float32, scale=True), target
        elif seed is None:
            image, target = self.detr_transforms(image, target)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                image, target = self.detr_transforms(image, target)
        out_h, out_w = image.shape[-2:]
        detr_target = {
            "boxes": boxes_xyxy_to_cxcywh_normalized(
                torch.as_tensor(target["boxes"], dtype=torch.float32), out_h, out_w
            ).clamp(0.0, 1.0),
            "labels": torch.as_tensor(target["labels"], dtype=torch.int64),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor([out_h, out_w], dtype=torch.int64),
        }
        return image.as_subclass(torch.Tensor), detr_target
