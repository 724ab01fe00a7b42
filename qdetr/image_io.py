"""Reading user images and checking pixel tensors: every unusable image is an :class:`~qdetr.errors.InputImageError`.

* :func:`read_rgb_image` opens a file as 8-bit RGB. High-depth images (16-bit PNG/TIFF, 32-bit
  integer and float modes) are *scaled* to 0..255, not clipped (Pillow's ``convert("RGB")``
  turns every 16-bit value above 255 into white). Unreadable files, empty images and images
  with an absurd aspect ratio are refused with a message naming the file.
* :func:`check_pixel_tensor` refuses float pixel tensors with NaN/inf or values outside [0, 1]
  (a common mistake: passing 0..255 floats or already-normalised images) and empty images.

This module imports only :mod:`qdetr.errors` from qdetr, so data loading, preprocessing and
the zoo can all use it.

Examples:
    >>> import tempfile
    >>> import numpy as np
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from qdetr.image_io import read_rgb_image
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = Path(tmp) / "depth16.png"
    ...     Image.fromarray(np.full((4, 6), 32768, dtype=np.uint16)).save(path)   # mid-grey, 16 bit
    ...     image = read_rgb_image(path)
    >>> image.mode, image.size, image.getpixel((0, 0))    # scaled to 8 bit, not clipped to white
    ('RGB', (6, 4), (128, 128, 128))
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from qdetr.errors import InputImageError

__all__ = ["MAX_ASPECT_RATIO", "read_rgb_image", "to_rgb", "check_pixel_tensor"]

#: Longest side / shortest side above which an image is refused (it would resize to nothing).
MAX_ASPECT_RATIO = 100.0
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def _check_size(width: int, height: int, name: str) -> None:
    if width < 1 or height < 1:
        raise InputImageError(f"{name} is empty ({width}x{height} pixels); pass an image with pixels")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise InputImageError(
            f"{name} is {width}x{height} pixels (aspect ratio {ratio:.0f}:1, limit {MAX_ASPECT_RATIO:.0f}:1); "
            "resized for the detector its short side would vanish. Crop or pad it first"
        )


def to_rgb(image, *, name: str = "the image"):
    """Convert a PIL image of any mode to 8-bit RGB, scaling high-depth values instead of clipping.

    Args:
        image: a ``PIL.Image.Image`` (``1``, ``L``, ``P``, ``RGB``, ``RGBA``, ``CMYK``, ``I;16``,
            ``I``, ``F``, ...).
        name: how the image is named in error messages (its file).

    Returns:
        An ``RGB`` PIL image of the same size.

    Raises:
        InputImageError: an empty image, an extreme aspect ratio, or a float image whose
            values are NaN/inf or outside both [0, 1] and [0, 255].

    Examples:
        >>> import numpy as np
        >>> from PIL import Image
        >>> to_rgb(Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))).getpixel((0, 0))   # mode F in [0, 1]
        (128, 128, 128)
    """
    from PIL import Image

    _check_size(image.width, image.height, name)
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        if not np.isfinite(values).all():
            raise InputImageError(f"{name} ({mode} mode) contains NaN or infinite pixel values")
        low, high = float(values.min()), float(values.max())
        if mode == "F":
            if low >= 0.0 and high <= 1.0:
                scale = 255.0
            elif low >= 0.0 and high <= 255.0:
                scale = 1.0
            else:
                raise InputImageError(
                    f"{name} is a float image with values in [{low:g}, {high:g}]; expected [0, 1] or [0, 255]"
                )
        elif low < 0:
            raise InputImageError(f"{name} ({mode} mode) has negative pixel values ({low:g}); cannot display it")
        elif mode in _SIXTEEN_BIT_MODES or high > 255:
            scale = 255.0 / (65535.0 if high <= 65535 else 4294967295.0)
        else:  # mode I holding 8-bit values
            scale = 1.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # 2-D uint8 -> mode L
    if mode == "RGB":
        return image.copy()
    return image.convert("RGB")


def read_rgb_image(path: str | os.PathLike):
    """Open an image file as an 8-bit RGB PIL image (loaded, file closed).

    Args:
        path: any Pillow-readable file (JPEG, PNG incl. 16-bit, TIFF, BMP, WebP, ...).

    Returns:
        The ``RGB`` image.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        InputImageError: the file is not a readable image (truncated, another format), or the
            image is empty or has an extreme aspect ratio (see :func:`to_rgb`).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "notes.jpg"
        ...     _ = path.write_text("not an image")
        ...     try:
        ...         read_rgb_image(path)
        ...     except ValueError as err:
        ...         print(type(err).__name__, "not a readable image" in str(err))
        InputImageError True
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image, name=str(path))
    except InputImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InputImageError(
            f"{path} is not a readable image ({type(err).__name__}: {str(err)[:160]}); check the file or re-export it "
            "as JPEG or PNG"
        ) from None


def check_pixel_tensor(tensor: torch.Tensor, *, name: str = "the image") -> None:
    """Refuse a (..., H, W) pixel tensor that is empty, extremely elongated, or float with NaN/inf or values outside [0, 1].

    Args:
        tensor: uint8 (any values are valid) or floating point.
        name: how the image is named in error messages.

    Raises:
        InputImageError: empty spatial size, an aspect ratio above :data:`MAX_ASPECT_RATIO`, non-finite values, or floats outside [0, 1] (the
            message suggests dividing by 255 or passing unnormalised images).

    Examples:
        >>> import torch
        >>> check_pixel_tensor(torch.rand(3, 8, 8))
        >>> try:
        ...     check_pixel_tensor(torch.full((3, 8, 8), 200.0))
        ... except ValueError as err:
        ...     print("divide by 255" in str(err))
        True
    """
    _check_size(int(tensor.shape[-1]), int(tensor.shape[-2]), name)
    if not tensor.is_floating_point():
        return
    if not bool(torch.isfinite(tensor).all()):
        raise InputImageError(f"{name} contains NaN or infinite pixel values; fix the image before predicting")
    low, high = float(tensor.min()), float(tensor.max())
    if low < 0.0 or high > 1.0:
        hint = "divide by 255" if high > 1.0 and low >= 0.0 else "pass unnormalised images (qdetr normalises them)"
        raise InputImageError(
            f"{name} is a float tensor with values in [{low:g}, {high:g}]; float images must be in [0, 1] ({hint})"
        )
