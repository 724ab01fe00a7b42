"""A procedurally generated, deterministic COCO-format detection dataset ("synthetic shapes").

The embedded default dataset of ``qdetr``: images of a few kinds of filled shapes
(rectangle, ellipse, triangle, cross) with varied size, colour and partial overlap, on
textured, noisy backgrounds. It needs no download, and the same ``seed`` always gives
byte-identical files, so demos, tests and benchmarks are reproducible.

Each image is rendered from its own random stream (``numpy.random.SeedSequence((seed, index))``),
so image ``i`` does not depend on how many images are generated.

Examples:
    >>> import tempfile
    >>> from qdetr.data.synthetic import make_synthetic_coco
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     ann_file = make_synthetic_coco(tmp, num_images=4, image_size=64, seed=0)
    >>> ann_file.name
    'instances.json'
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPE_CATEGORIES",
    "SyntheticShapesConfig",
    "SyntheticSample",
    "render_synthetic_sample",
    "make_synthetic_coco",
    "synthetic_coco_dict",
]

#: COCO categories of the synthetic set (ids 1..4; id 0 is unused, as in COCO).
SHAPE_CATEGORIES: tuple[dict, ...] = (
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "cross", "supercategory": "shape"},
)


@dataclass(frozen=True, kw_only=True)
class SyntheticShapesConfig:
    """How synthetic images are drawn.

    Args:
        image_size: side of the square images in pixels.
        min_objects: fewest shapes per image (0 gives some negative images).
        max_objects: most shapes per image.
        min_size_frac: smallest shape side, as a fraction of ``image_size``.
        max_size_frac: largest shape side, as a fraction of ``image_size``.
        max_overlap_iou: two shapes of one image never overlap more than this IoU.
        noise_std: standard deviation of the per-pixel background noise (0-255 scale).
        num_classes_used: use only the first N shape classes (1 to 4).
        textured_background: gradient plus stripes or blobs; False keeps a flat colour (plus noise).
        colour_by_class: draw each class in its own hue family (an easier task: class is
            visible in colour as well as in shape); False draws any contrasting colour.
        image_format: ``"png"`` (lossless, byte-identical everywhere) or ``"jpg"``.

    Raises:
        ValueError: on out-of-range values, with the valid range in the message.

    Examples:
        >>> from qdetr.data import SyntheticShapesConfig
        >>> config = SyntheticShapesConfig(image_size=64, num_classes_used=2)
        >>> [category["name"] for category in config.categories]
        ['rectangle', 'ellipse']
        >>> SyntheticShapesConfig(image_size=8)
        Traceback (most recent call last):
        ...
        ValueError: image_size must be >= 16 pixels; got 8
    """

    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 3
    min_size_frac: float = 0.25
    max_size_frac: float = 0.55
    max_overlap_iou: float = 0.3
    noise_std: float = 12.0
    num_classes_used: int = 4
    textured_background: bool = True
    colour_by_class: bool = False
    image_format: str = "png"

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels; got {self.image_size}")
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError(
                "need 0 <= min_objects <= max_objects; got "
                f"min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        if not 0.0 < self.min_size_frac <= self.max_size_frac <= 1.0:
            raise ValueError(
                "need 0 < min_size_frac <= max_size_frac <= 1; got "
                f"{self.min_size_frac}, {self.max_size_frac}"
            )
        if not 0.0 <= self.max_overlap_iou <= 1.0:
            raise ValueError(f"max_overlap_iou must be in [0, 1]; got {self.max_overlap_iou}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0; got {self.noise_std}")
        if not 1 <= self.num_classes_used <= len(SHAPE_CATEGORIES):
            raise ValueError(
                f"num_classes_used must be 1..{len(SHAPE_CATEGORIES)}; got {self.num_classes_used}"
            )
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg'; got {self.image_format!r}")

    @property
    def categories(self) -> list[dict]:
        """The COCO ``categories`` entries used by this configuration."""
        return [dict(c) for c in SHAPE_CATEGORIES[: self.num_classes_used]]


@dataclass(frozen=True)
class SyntheticSample:
    """One rendered image and its objects.

    Attributes:
        image: RGB image of size (image_size, image_size).
        boxes_xywh: one ``[x, y, w, h]`` (absolute pixels, COCO format) per object.
        category_ids: one category id (1..4) per object.

    Examples:
        >>> from qdetr.data import SyntheticShapesConfig, render_synthetic_sample
        >>> sample = render_synthetic_sample(0, SyntheticShapesConfig(image_size=64))
        >>> sample.image.size, sample.image.mode
        ((64, 64), 'RGB')
        >>> len(sample.boxes_xywh) == len(sample.category_ids)
        True
    """

    image: Image.Image
    boxes_xywh: list[list[float]]
    category_ids: list[int]


def _box_iou_xyxy(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _background(rng: np.random.Generator, size: int, noise_std: float, textured: bool = True) -> np.ndarray:
    """Background: a colour gradient, optional stripes or blobs, pixel noise. (H, W, 3) uint8.

    Untextured backgrounds are one flat colour plus the pixel noise.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    c0 = rng.uniform(20, 235, size=3)
    c1 = rng.uniform(20, 235, size=3) if textured else c0
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0  # in (0, 1)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    texture = rng.integers(0, 3) if textured else 0
    if texture == 1:  # stripes
        freq = rng.uniform(4, 12)
        phase = rng.uniform(0, 2 * math.pi)
        stripes = np.sin(2 * math.pi * freq * (np.cos(angle) * yy - np.sin(angle) * xx) + phase)
        img += 18.0 * stripes[..., None]
    elif texture == 2:  # low-frequency blobs
        coarse = rng.normal(0, 1, size=(5, 5, 3))
        up = np.kron(coarse, np.ones((math.ceil(size / 5), math.ceil(size / 5), 1)))[:size, :size]
        img += 15.0 * up
    img += rng.normal(0, noise_std, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


#: Hue families of ``colour_by_class`` (red, green, blue, yellow), jittered per object.
_CLASS_COLOURS = ((220, 40, 40), (40, 190, 60), (40, 70, 220), (230, 210, 40))


def _shape_colour(
    rng: np.random.Generator, background_mean: np.ndarray, category_id: int | None = None
) -> tuple[int, int, int]:
    """A colour that differs clearly from the mean background colour (or the class's hue family)."""
    if category_id is not None:
        base = np.array(_CLASS_COLOURS[category_id - 1], dtype=np.float64)
        return tuple(int(c) for c in np.clip(base + rng.uniform(-25, 25, size=3), 0, 255))
    for _ in range(20):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - background_mean).sum() > 150:
            break
    return tuple(int(c) for c in colour)


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    category_id: int,
    box_xyxy: tuple[float, float, float, float],
    colour: tuple[int, int, int],
    rng: np.random.Generator,
) -> tuple[float, float, float, float]:
    """Draws one shape inside ``box_xyxy`` and returns its tight box (xyxy, pixel edges)."""
    x0, y0, x1, y1 = box_xyxy
    w, h = x1 - x0, y1 - y0
    if category_id == 1:  # rectangle
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif category_id == 2:  # ellipse
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif category_id == 3:  # triangle, apex on a random side position
        apex = x0 + float(rng.uniform(0.2, 0.8)) * w
        draw.polygon([(apex, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=colour)
    else:  # cross (plus sign)
        arm = float(rng.uniform(0.25, 0.4))
        cx0, cx1 = x0 + (0.5 - arm / 2) * w, x0 + (0.5 + arm / 2) * w
        cy0, cy1 = y0 + (0.5 - arm / 2) * h, y0 + (0.5 + arm / 2) * h
        draw.rectangle([cx0, y0, cx1 - 1, y1 - 1], fill=colour)
        draw.rectangle([x0, cy0, x1 - 1, cy1 - 1], fill=colour)
    return (x0, y0, x1, y1)


def render_synthetic_sample(index: int, config: SyntheticShapesConfig, seed: int = 0) -> SyntheticSample:
    """Renders image ``index`` of the synthetic set with ``seed``.

    Args:
        index: image index (>= 0); each index has its own random stream.
        config: drawing parameters.
        seed: dataset seed.

    Returns:
        The image (RGB, image_size x image_size) with its boxes (one ``[x, y, w, h]`` per
        object: COCO xywh, absolute pixels) and category ids.

    Examples:
        >>> from qdetr.data import SyntheticShapesConfig, render_synthetic_sample
        >>> config = SyntheticShapesConfig(image_size=64, min_objects=1, max_objects=3)
        >>> sample = render_synthetic_sample(5, config, seed=0)
        >>> sample.image.size, 1 <= len(sample.boxes_xywh) <= 3
        ((64, 64), True)
        >>> render_synthetic_sample(5, config, seed=0).boxes_xywh == sample.boxes_xywh  # deterministic
        True
    """
    rng = np.random.default_rng(np.random.SeedSequence((int(seed), int(index))))
    size = config.image_size
    background = _background(rng, size, config.noise_std, config.textured_background)
    image = Image.fromarray(background, mode="RGB")
    draw = ImageDraw.Draw(image)
    num_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    placed: list[tuple[float, float, float, float]] = []
    boxes_xywh: list[list[float]] = []
    category_ids: list[int] = []
    for _ in range(num_objects):
        for _attempt in range(30):
            w = int(round(rng.uniform(config.min_size_frac, config.max_size_frac) * size))
            h = int(round(w * rng.uniform(0.6, 1.6)))
            w, h = max(4, min(w, size)), max(4, min(h, size))
            x0 = int(rng.integers(0, size - w + 1))
            y0 = int(rng.integers(0, size - h + 1))
            box = (float(x0), float(y0), float(x0 + w), float(y0 + h))
            if all(_box_iou_xyxy(box, other) <= config.max_overlap_iou for other in placed):
                break
        else:
            continue  # no free spot for this object
        category_id = int(rng.integers(1, config.num_classes_used + 1))
        colour = _shape_colour(
            rng, background.reshape(-1, 3).mean(0), category_id if config.colour_by_class else None
        )
        x0f, y0f, x1f, y1f = _draw_shape(draw, category_id, box, colour, rng)
        placed.append(box)
        boxes_xywh.append([x0f, y0f, x1f - x0f, y1f - y0f])
        category_ids.append(category_id)
    return SyntheticSample(image=image, boxes_xywh=boxes_xywh, category_ids=category_ids)


def synthetic_coco_dict(
    num_images: int, config: SyntheticShapesConfig, seed: int = 0, *, first_index: int = 0
) -> tuple[dict, list[Image.Image]]:
    """Renders ``num_images`` images in memory and their COCO ``instances`` dict.

    Args:
        num_images: number of images.
        config: drawing parameters.
        seed: dataset seed.
        first_index: index of the first image (use disjoint ranges for train and val).

    Returns:
        ``(coco_dict, images)``: the COCO annotation dict (``images``, ``annotations``,
        ``categories``; ``bbox`` in COCO xywh absolute pixels) and the PIL images in the same
        order as ``coco_dict["images"]``.

    Raises:
        ValueError: if ``num_images`` < 1.

    Examples:
        >>> from qdetr.data import SyntheticShapesConfig, synthetic_coco_dict
        >>> coco, images = synthetic_coco_dict(3, SyntheticShapesConfig(image_size=64), first_index=10)
        >>> sorted(coco)
        ['annotations', 'categories', 'images', 'info', 'licenses']
        >>> [info["id"] for info in coco["images"]], len(images)
        ([11, 12, 13], 3)
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1; got {num_images}")
    images_info, annotations, pil_images = [], [], []
    ann_id = 1
    for offset in range(num_images):
        index = first_index + offset
        sample = render_synthetic_sample(index, config, seed)
        image_id = index + 1
        images_info.append(
            {
                "id": image_id,
                "file_name": f"{image_id:08d}.{config.image_format}",
                "width": config.image_size,
                "height": config.image_size,
            }
        )
        for box, category_id in zip(sample.boxes_xywh, sample.category_ids):
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
            ann_id += 1
        pil_images.append(sample.image)
    coco = {
        "info": {"description": "qdetr synthetic shapes", "seed": int(seed)},
        "licenses": [],
        "images": images_info,
        "annotations": annotations,
        "categories": config.categories,
    }
    return coco, pil_images


def make_synthetic_coco(
    root: str | Path,
    num_images: int,
    image_size: int = 128,
    seed: int = 0,
    *,
    config: SyntheticShapesConfig | None = None,
    first_index: int = 0,
    ann_name: str = "instances.json",
) -> Path:
    """Writes a synthetic COCO-format dataset to ``root``.

    Layout: ``root/images/<id>.png`` and ``root/<ann_name>``. The same arguments always give
    byte-identical files. Existing files of the same name are overwritten.

    Args:
        root: output directory (created if needed).
        num_images: number of images.
        image_size: image side in pixels (ignored when ``config`` is given).
        seed: dataset seed.
        config: full drawing parameters; default ``SyntheticShapesConfig(image_size=image_size)``.
        first_index: index of the first image (use disjoint ranges for train and val splits).
        ann_name: file name of the annotation JSON.

    Returns:
        Path of the written annotation file; images are in ``root / "images"``.

    Raises:
        ValueError: if ``num_images`` < 1.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from qdetr.data import make_synthetic_coco
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     ann_file = make_synthetic_coco(tmp, num_images=2, image_size=64, seed=0)
        ...     print(ann_file.name, sorted(p.name for p in (Path(tmp) / "images").iterdir()))
        instances.json ['00000001.png', '00000002.png']
    """
    config = config if config is not None else SyntheticShapesConfig(image_size=image_size)
    root = Path(root)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    coco, pil_images = synthetic_coco_dict(num_images, config, seed, first_index=first_index)
    for info, image in zip(coco["images"], pil_images):
        path = image_dir / info["file_name"]
        if config.image_format == "png":
            image.save(path, format="PNG", optimize=False)
        else:
            image.save(path, format="JPEG", quality=95)
    ann_path = root / ann_name
    ann_path.write_text(json.dumps(coco, indent=1, sort_keys=True))
    return ann_path
