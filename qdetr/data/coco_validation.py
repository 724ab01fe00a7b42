"""Validation of a COCO ``instances`` annotation file before anything trusts it.

pycocotools indexes whatever JSON it is given and fails later with a bare ``KeyError`` (a
missing ``id``) or silently trains on wrong targets (NaN boxes, category ids absent from
``categories``). :func:`validate_coco_annotations` checks every record first and raises a
:class:`~qdetr.errors.DataError` that names the file, the record (``annotations[12] (id 57)``)
and the problem:

* top level: a JSON object with ``images``, ``annotations`` and ``categories`` lists;
* ``categories``: objects with a unique integer ``id`` (>= 0) and a string ``name``;
* ``images``: objects with a unique integer ``id`` and a non-empty relative ``file_name``
  that stays inside the image folder (no absolute paths, no ``..`` escaping it); optional
  ``width``/``height`` positive integers;
* ``annotations``: objects with a unique integer ``id``, an ``image_id`` listed in ``images``,
  a ``category_id`` listed in ``categories``, a ``bbox`` of 4 finite numbers (width and height
  may be <= 0: such boxes are dropped and counted, as before), ``iscrowd`` 0 or 1 when present.

Examples:
    >>> from qdetr.data.coco_validation import validate_coco_annotations
    >>> data = {"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "cat"}],
    ...         "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5]}]}
    >>> try:
    ...     validate_coco_annotations(data, ann_file="train.json", image_dir="images")
    ... except ValueError as err:
    ...     print(err)
    train.json: annotations[0] (id 1): category_id 3 is not in categories (ids [1])
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from qdetr.errors import DataError

__all__ = ["read_coco_json", "validate_coco_annotations"]


def read_coco_json(ann_file: str | os.PathLike) -> dict[str, Any]:
    """Parse an annotation file; unreadable or non-JSON content is a :class:`DataError` naming the file.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "instances.json"
        ...     _ = path.write_text('{"images": [')
        ...     try:
        ...         read_coco_json(path)
        ...     except ValueError as err:
        ...         print("is not valid JSON" in str(err))
        True
    """
    path = Path(ann_file)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); it must be a COCO instances file") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _record(kind: str, index: int, item: Any) -> str:
    ident = item.get("id") if isinstance(item, dict) else None
    return f"{kind}[{index}]" + (f" (id {ident!r})" if ident is not None else "")


def _inside(image_dir: Path, file_name: str) -> bool:
    if Path(file_name).is_absolute() or "\0" in file_name:
        return False
    root = os.path.normpath(os.path.abspath(image_dir))
    target = os.path.normpath(os.path.join(root, file_name))
    return target.startswith(root + os.sep)


def validate_coco_annotations(data: Any, *, ann_file: str | os.PathLike, image_dir: str | os.PathLike) -> None:
    """Check every record of a parsed COCO ``instances`` dict (see the module docstring).

    Args:
        data: the parsed JSON.
        ann_file: the file it came from (named in messages).
        image_dir: the image folder ``file_name`` values are relative to.

    Raises:
        DataError: on the first malformed record, naming the file, the record and the fix.
    """
    src = str(ann_file)

    def fail(where: str, problem: str) -> None:
        raise DataError(f"{src}: {where}: {problem}")

    if not isinstance(data, dict):
        fail("top level", f"expected a JSON object with images/annotations/categories, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            fail("top level", f"missing {key!r} (a COCO instances file has images, annotations and categories)")
        if not isinstance(data[key], list):
            fail(key, f"must be a list, got {type(data[key]).__name__}")

    category_ids: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        where = _record("categories", i, cat)
        if not isinstance(cat, dict):
            fail(where, "must be an object with id and name")
        if not _is_int(cat.get("id")) or cat["id"] < 0:
            fail(where, f"id must be a non-negative integer, got {cat.get('id')!r}")
        if cat["id"] in category_ids:
            fail(where, "duplicate category id")
        if not isinstance(cat.get("name"), str):
            fail(where, f"name must be a string, got {cat.get('name')!r}")
        category_ids.add(cat["id"])

    image_ids: set[int] = set()
    root = Path(image_dir)
    for i, image in enumerate(data["images"]):
        where = _record("images", i, image)
        if not isinstance(image, dict):
            fail(where, "must be an object with id and file_name")
        if not _is_int(image.get("id")):
            fail(where, f"id must be an integer, got {image.get('id')!r}")
        if image["id"] in image_ids:
            fail(where, "duplicate image id")
        name = image.get("file_name")
        if not isinstance(name, str) or not name.strip():
            fail(where, f"file_name must be a non-empty string, got {name!r}")
        if not _inside(root, name):
            fail(where, f"file_name {name!r} points outside the image folder {root}; use a path relative to it")
        for side in ("width", "height"):
            if side in image and (not _is_int(image[side]) or image[side] < 1):
                fail(where, f"{side} must be a positive integer, got {image[side]!r}")
        image_ids.add(image["id"])

    annotation_ids: set[int] = set()
    shown = sorted(category_ids)[:10]
    for i, ann in enumerate(data["annotations"]):
        where = _record("annotations", i, ann)
        if not isinstance(ann, dict):
            fail(where, "must be an object with id, image_id, category_id and bbox")
        if not _is_int(ann.get("id")):
            fail(where, f"id must be an integer, got {ann.get('id')!r}")
        if ann["id"] in annotation_ids:
            fail(where, "duplicate annotation id")
        annotation_ids.add(ann["id"])
        if not _is_int(ann.get("image_id")):
            fail(where, f"image_id must be an integer, got {ann.get('image_id')!r}")
        if ann["image_id"] not in image_ids:
            fail(where, f"image_id {ann['image_id']} is not in images")
        if not _is_int(ann.get("category_id")):
            fail(where, f"category_id must be an integer, got {ann.get('category_id')!r}")
        if ann["category_id"] not in category_ids:
            fail(where, f"category_id {ann['category_id']} is not in categories (ids {shown}"
                        f"{' ...' if len(category_ids) > 10 else ''})")
        bbox = ann.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            fail(where, f"bbox must be a list of 4 numbers [x, y, width, height], got {bbox!r}")
        if not all(math.isfinite(v) for v in bbox):
            fail(where, f"bbox {bbox} has NaN or infinite values")
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
            fail(where, f"iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
