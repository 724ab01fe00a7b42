"""Class-name tables for detection heads.

COCO detectors (DETR and its descendants) predict over the 91-id space of the original
COCO category ids (1..90, with gaps); id 0 and the gaps are ``"N/A"``. This is the table of
facebookresearch/detr and of ``facebook/detr-resnet-50``'s ``id2label``.

Examples:
    >>> from qdetr.zoo.labels import COCO_ID2LABEL
    >>> len(COCO_ID2LABEL), COCO_ID2LABEL.get(1), COCO_ID2LABEL.get(12), COCO_ID2LABEL.get(90)
    (91, 'person', 'N/A', 'toothbrush')
"""

from __future__ import annotations

__all__ = ["COCO_ID2LABEL", "default_id2label"]

_COCO_NAMES = (
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A",
    "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

#: COCO class id (0..90) -> name; "N/A" for unused ids.
COCO_ID2LABEL: dict[int, str] = dict(enumerate(_COCO_NAMES))


def default_id2label(num_classes: int) -> dict[int, str]:
    """Labels for a head with ``num_classes`` class ids: COCO names for 91, ``LABEL_i`` otherwise.

    Examples:
        >>> from qdetr.zoo.labels import default_id2label
        >>> default_id2label(3)
        {0: 'LABEL_0', 1: 'LABEL_1', 2: 'LABEL_2'}
        >>> labels = default_id2label(91)
        >>> len(labels), labels.get(3), labels is COCO_ID2LABEL     # a copy of the COCO table
        (91, 'car', False)
    """
    if num_classes == len(COCO_ID2LABEL):
        return dict(COCO_ID2LABEL)
    return {i: f"LABEL_{i}" for i in range(num_classes)}
