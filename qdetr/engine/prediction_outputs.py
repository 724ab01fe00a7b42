"""Where ``predict_images`` writes: one output per input that never replaces an input or an earlier output.

Naming scheme: ``<out>/<stem>.pred.png`` for each image and ``<out>/predictions.json``. When
several inputs share a stem (``a/photo.jpg`` and ``b/photo.jpg``, or ``photo.jpg`` and
``photo.png``), each of them gets ``<stem>-<8 hex digits of the SHA-1 of its absolute path>.pred.png``:
the name depends only on the input, not on the order of the list, and cannot collide.

Every path is checked before anything is written:

* an output that is one of the inputs is always refused (even with ``overwrite=True``);
* an output that already exists (an earlier run) is refused unless ``overwrite=True``;
* the same input given twice is refused (its output would be written twice).

Examples:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from qdetr.engine.prediction_outputs import prediction_output_paths
    >>> outputs, summary = prediction_output_paths(["a/photo.jpg", "b/photo.jpg", "c/cat.png"], "out")
    >>> [p.name for p in outputs][2], summary.name
    ('cat.pred.png', 'predictions.json')
    >>> outputs[0] != outputs[1] and all(p.name.startswith("photo-") for p in outputs[:2])
    True
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from qdetr.errors import ConfigError, OutputExistsError

__all__ = ["OUTPUT_SUFFIX", "SUMMARY_NAME", "prediction_output_paths"]

#: Suffix of the drawn images: ``photo.jpg`` -> ``photo.pred.png``.
OUTPUT_SUFFIX = ".pred.png"
#: The JSON summary written next to the drawn images.
SUMMARY_NAME = "predictions.json"


def _identity(path: Path) -> Path:
    return Path(os.path.realpath(path))


def prediction_output_paths(
    image_paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, overwrite: bool = False
) -> tuple[list[Path], Path]:
    """The drawn-image path of each input and the summary path, after checking that none replaces a file.

    Args:
        image_paths: the input images, in order.
        out_dir: the output folder (it may be the folder of the inputs).
        overwrite: allow replacing outputs of an earlier run (never an input).

    Returns:
        ``(outputs, summary)``: one ``.pred.png`` path per input, and ``<out_dir>/predictions.json``.

    Raises:
        ConfigError: an input is given twice.
        OutputExistsError: an output would be an input, or already exists and ``overwrite`` is False
            (the message names the files and what to do); nothing has been written.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     image = Path(tmp) / "photo.png"
        ...     _ = image.write_bytes(b"an image")
        ...     outputs, _ = prediction_output_paths([image], tmp)   # output next to the input
        ...     _ = outputs[0].write_bytes(b"an earlier result")
        ...     try:
        ...         prediction_output_paths([image], tmp)
        ...     except FileExistsError as err:
        ...         print(type(err).__name__, "--overwrite" in str(err))
        ...     print(outputs[0].name, image.read_bytes())
        OutputExistsError True
        photo.pred.png b'an image'
    """
    out = Path(out_dir)
    inputs = [Path(p) for p in image_paths]
    identities = [_identity(p) for p in inputs]
    repeated = [str(inputs[identities.index(i)]) for i, n in Counter(identities).items() if n > 1]
    if repeated:
        raise ConfigError(f"the same image is given more than once: {repeated[:5]}; pass each image once")
    stems = Counter(p.stem for p in inputs)
    outputs = []
    for path, identity in zip(inputs, identities):
        stem = path.stem
        if stems[stem] > 1:
            stem = f"{stem}-{hashlib.sha1(str(identity).encode()).hexdigest()[:8]}"
        outputs.append(out / f"{stem}{OUTPUT_SUFFIX}")
    summary = out / SUMMARY_NAME
    input_set = set(identities)
    replaced_inputs = [str(p) for p in [*outputs, summary] if _identity(p) in input_set]
    if replaced_inputs:
        raise OutputExistsError(
            f"refusing to write {replaced_inputs[:5]}: they are input images and would be replaced by their "
            "predictions; choose another --out folder or rename the inputs"
        )
    if not overwrite:
        existing = [str(p) for p in [*outputs, summary] if p.exists()]
        if existing:
            raise OutputExistsError(
                f"refusing to replace {len(existing)} existing file(s) in {out} ({existing[:3]}"
                f"{' ...' if len(existing) > 3 else ''}) from an earlier run; choose another --out folder or pass "
                "--overwrite (overwrite=True) to replace them"
            )
    return outputs, summary
