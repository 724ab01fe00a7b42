"""Sane bounds for sizes declared by untrusted model files, checked before anything is built.

A release ``.pth``, a ``config.json`` or a training checkpoint declares the size of the model
it holds: layer indices in key names (``transformer.encoder.layers.11.``), ``enc_layers``,
``num_queries``, hidden sizes. Building modules from those declarations before checking them
lets a 1 MB file ask for terabytes. Every loader therefore calls these checks first; they look
only at key names and small integers, so they run in microseconds and allocate nothing.

Limits (:data:`LIMITS`) are far above every published DETR variant (DETR-R50: 6+6 layers, 100
queries, width 256, FFN 2048, 91 classes) and far below what exhausts a machine. Beyond the
per-field limits, the estimated parameter count must stay under :data:`MAX_PARAMETERS` and, when
the weights file is known, must be storable in that file at 2 bits per parameter (a 1 MB file
cannot hold a 100 M-parameter model).

Examples:
    >>> from qdetr.zoo.size_limits import check_architecture_bounds, check_layer_indices
    >>> check_layer_indices(["transformer.encoder.layers.0.norm1.weight"], source="ok.pth")
    >>> try:
    ...     check_layer_indices(["transformer.encoder.layers.300000.foo"], source="crafted.pth")
    ... except ValueError as err:
    ...     print(type(err).__name__, "300000" in str(err))
    CheckpointError True
    >>> check_architecture_bounds({"hidden_dim": 256, "enc_layers": 6, "dec_layers": 6}, source="config.json")
    >>> try:
    ...     check_architecture_bounds({"enc_layers": 300000}, source="config.json")
    ... except ValueError as err:
    ...     print("enc_layers" in str(err))
    True
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from qdetr.errors import CheckpointError

__all__ = ["LIMITS", "MAX_PARAMETERS", "check_layer_indices", "check_architecture_bounds", "estimated_parameters"]

#: Upper bound of each size field of an architecture dict (inclusive).
LIMITS: dict[str, int] = {
    "enc_layers": 64,
    "dec_layers": 64,
    "num_queries": 10_000,
    "hidden_dim": 8_192,
    "nheads": 256,
    "dim_feedforward": 32_768,
    "num_classes": 100_000,
    "query_width": 16_384,
    "feature_stride": 1_024,
}
#: Upper bound of the estimated transformer + head parameters (about 2 GB in float32).
MAX_PARAMETERS = 500_000_000
_MAX_KEYS = 1_000_000
_LAYER_INDEX_RE = re.compile(r"(?:^|\.)(layers|layer\d|blocks)\.(\d+)(?:\.|$)")


def check_layer_indices(keys: Iterable[str], *, source: str, max_index: int | None = None) -> None:
    """Refuse state-dict keys whose numeric layer indices are absurd or not contiguous.

    Args:
        keys: the key names (nothing else is read).
        source: the file, named in the message.
        max_index: largest allowed index (default: the largest layer limit in :data:`LIMITS`).

    Raises:
        CheckpointError: too many keys, an index above ``max_index`` or indices of one layer
            list that skip numbers (``layers.0``, ``layers.7``): the file was crafted or damaged.

    Examples:
        >>> try:
        ...     check_layer_indices(["a.layers.0.w", "a.layers.5.w"], source="f.pth")
        ... except ValueError as err:
        ...     print("not contiguous" in str(err))
        True
    """
    limit = max_index if max_index is not None else max(LIMITS["enc_layers"], LIMITS["dec_layers"], 512)
    seen: dict[str, set[int]] = {}
    for count, key in enumerate(keys):
        if count >= _MAX_KEYS:
            raise CheckpointError(f"{source} has more than {_MAX_KEYS} entries; it is not a detector checkpoint")
        if not isinstance(key, str):
            raise CheckpointError(f"{source} has a non-string key {key!r}; it is not a state dict")
        for match in _LAYER_INDEX_RE.finditer(key):
            index = int(match.group(2)) if len(match.group(2)) < 10 else 10**10
            if index > limit:
                raise CheckpointError(
                    f"{source}: key {key[:200]!r} declares layer index {match.group(2)[:20]}, above the limit "
                    f"{limit}; the file is crafted or damaged and was not loaded"
                )
            prefix = key[: match.start(2)]
            seen.setdefault(prefix, set()).add(index)
    for prefix, indices in seen.items():
        if len(indices) != max(indices) + 1:
            missing = sorted(set(range(max(indices) + 1)) - indices)[:5]
            raise CheckpointError(
                f"{source}: the layer indices under {prefix[:200]!r} are not contiguous (missing {missing}); "
                "the file is crafted or damaged and was not loaded"
            )


def _positive_int(arch: Mapping[str, Any], name: str, default: int) -> int:
    value = arch.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{name} must be an integer, got {value!r}")
    return value


def estimated_parameters(arch: Mapping[str, Any]) -> int:
    """A lower estimate of the parameters of the transformer and heads an architecture dict declares.

    Counts the attention and FFN weight matrices, the query embedding and the class head;
    the backbone (bounded by its named layout) is not counted.

    Examples:
        >>> estimated_parameters({"hidden_dim": 256, "enc_layers": 6, "dec_layers": 6,
        ...                       "dim_feedforward": 2048, "num_queries": 100, "num_classes": 91})
        17350656
    """
    d = _positive_int(arch, "hidden_dim", 256)
    f = _positive_int(arch, "dim_feedforward", 2048)
    enc = _positive_int(arch, "enc_layers", 6)
    dec = _positive_int(arch, "dec_layers", 6)
    queries = _positive_int(arch, "num_queries", 100)
    classes = _positive_int(arch, "num_classes", 91)
    per_encoder = 4 * d * d + 2 * d * f
    per_decoder = 8 * d * d + 2 * d * f
    return enc * per_encoder + dec * per_decoder + queries * d + (classes + 1) * d


def check_architecture_bounds(
    arch: Mapping[str, Any], *, source: str, weights_bytes: int | None = None
) -> None:
    """Refuse an architecture dict (``config.json``'s ``architecture``) that declares absurd sizes.

    Args:
        arch: the dict (``DetrConfig.to_dict()`` layout; missing fields take DETR defaults).
        source: the file, named in the message.
        weights_bytes: size of the weights file that goes with it, if known.

    Raises:
        CheckpointError: a field above its limit in :data:`LIMITS` or not a positive integer,
            an estimated parameter count above :data:`MAX_PARAMETERS`, or one that cannot fit in
            ``weights_bytes`` at 2 bits per parameter (config and weights do not belong together).

    Examples:
        >>> try:
        ...     check_architecture_bounds({"hidden_dim": 1024, "dim_feedforward": 8192}, source="c.json",
        ...                               weights_bytes=1000)
        ... except ValueError as err:
        ...     print("do not belong together" in str(err))
        True
    """
    if not isinstance(arch, Mapping):
        raise CheckpointError(f"{source}: the architecture must be a JSON object, got {type(arch).__name__}")
    for name, limit in LIMITS.items():
        if name not in arch or arch[name] is None:
            continue
        value = arch[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{source}: {name} must be a positive integer, got {value!r}")
        if value > limit:
            raise CheckpointError(
                f"{source}: {name} = {value} is above the limit {limit}; the file is crafted or damaged "
                "and nothing was built"
            )
    params = estimated_parameters(arch)
    if params > MAX_PARAMETERS:
        raise CheckpointError(
            f"{source}: the declared sizes need about {params:,} parameters (limit {MAX_PARAMETERS:,}); "
            "the file is crafted or damaged and nothing was built"
        )
    if weights_bytes is not None and params > 4 * weights_bytes:
        raise CheckpointError(
            f"{source} declares a model of at least {params:,} parameters but its weights file has only "
            f"{weights_bytes:,} bytes (needs at least {params // 4:,} at 2 bits per parameter): config and "
            "weights do not belong together"
        )
