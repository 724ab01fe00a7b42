"""``save_pretrained`` / ``push_to_hub`` / ``predict`` methods for qdetr detectors.

This mixin is the one way a model gets these methods: :class:`~qdetr.models.Detr` and
:class:`~qdetr.models.SmcaDetr` derive from it, and :func:`qdetr.zoo.attach_pretrained_methods`
gives any other detector a subclass with it. The implementations live in :mod:`qdetr.zoo`
(which depends on the models); each method imports it when it is called, so importing
:mod:`qdetr.models` never imports the zoo (``tests/test_structure.py`` checks ``sys.modules``).
This file is the only place in :mod:`qdetr.models` that refers to the zoo.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["PretrainedMethodsMixin"]


class PretrainedMethodsMixin:
    """Hugging Face-style convenience methods shared by :class:`Detr` and :class:`SmcaDetr`."""

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any):
        """Write ``config.json``, packed ``model.safetensors`` and a model card README.md.

        See :func:`qdetr.zoo.save_pretrained` for the keyword arguments.

        Examples:
            >>> model.save_pretrained("my-4bit-detr")   # doctest: +SKIP
        """
        from qdetr.zoo.hub import save_pretrained

        return save_pretrained(self, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Save (packed) and upload to the Hugging Face Hub; see :func:`qdetr.zoo.push_to_hub`."""
        from qdetr.zoo.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def predict(self, images: Any, threshold: float = 0.5, **kwargs: Any) -> list[dict]:
        """Detect objects in PIL images, paths or (3, H, W) tensors.

        Returns:
            One ``{"scores": (N,), "labels": (N,), "boxes": (N, 4) absolute xyxy}`` dict per image.

        Examples:
            >>> model.predict(["street.jpg"], threshold=0.7)   # doctest: +SKIP
        """
        from qdetr.zoo.prediction import predict

        return predict(self, images, threshold, **kwargs)
