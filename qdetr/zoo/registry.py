"""The pretrained-weights registry: named entries with their source and metadata.

Names follow ``<arch>.<recipe>_<data>[_eNN]`` (``qdetr_smca_r50.w4a4attn8_seed_coco_e50``):
the part before the dot is a :func:`qdetr.models.create_model` name, the tag after it names
the weights. Registering a name twice raises.

Each entry says where the bytes come from (exactly one of a Google Drive file id, a plain
URL, or a Hugging Face Hub repository; file hosts serve Q-DETR release ``.pth`` files, the
Hub our own saved format), and what is known about them (bits, profile, reported COCO AP, licence, recipe).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PretrainedEntry",
    "register_pretrained",
    "unregister_pretrained",
    "get_pretrained_entry",
    "list_pretrained",
    "is_registered",
]

_NAME_RE = re.compile(r"^[a-z0-9_]+\.[a-z0-9_]+$")
_REGISTRY: dict[str, "PretrainedEntry"] = {}


@dataclass(frozen=True, kw_only=True)
class PretrainedEntry:
    """Metadata of one set of pretrained weights.

    Attributes:
        name: ``<arch>.<tag>``; ``arch`` is the :func:`qdetr.models.create_model` name.
        bits: weight/activation bits, None for float models.
        attn_bits: bits of attention q/k/v/softmax, None for float models.
        profile: quantization profile (``"seed"``/``"paper"``), None for float models.
        gdrive_id: Google Drive file id (file-host source).
        url: direct HTTP(S) URL (file-host source).
        hf_hub_id: Hugging Face Hub repository (Hub source).
        hf_revision: Hub revision to pin.
        filename: file name of the downloaded file.
        sha256: expected SHA-256 when published; None = recorded on first verified download.
        size_bytes: expected size when known.
        box_ap: COCO val2017 box AP reported by the source.
        box_ap_source: who reported ``box_ap``.
        license: licence of the weights.
        epochs: training epochs.
        teacher: distillation teacher, if any.
        recipe: link or description of the training recipe.
        description: one line for listings.
        extra: free-form metadata.

    The source says how the weights are read: a file host (``gdrive_id`` / ``url``) serves a
    Q-DETR release ``.pth`` (converted on first use), the Hub (``hf_hub_id``) a directory saved
    by ``save_pretrained``.

    Raises:
        ValueError: for a malformed name, not exactly one source, or a malformed ``sha256``.

    Examples:
        >>> from qdetr.zoo import PretrainedEntry
        >>> entry = PretrainedEntry(name="detr_tiny.demo_coco", hf_hub_id="my-org/detr-tiny-demo")
        >>> entry.arch, entry.source
        ('detr_tiny', 'hf-hub:my-org/detr-tiny-demo')
        >>> PretrainedEntry(name="Bad Name", hf_hub_id="my-org/detr-tiny-demo")
        Traceback (most recent call last):
        ...
        ValueError: zoo name 'Bad Name' must look like '<arch>.<tag>' (lowercase, digits, '_')
    """

    name: str
    bits: int | None = None
    attn_bits: int | None = None
    profile: str | None = None
    gdrive_id: str | None = None
    url: str | None = None
    hf_hub_id: str | None = None
    hf_revision: str | None = None
    filename: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    box_ap: float | None = None
    box_ap_source: str | None = None
    license: str | None = None
    epochs: int | None = None
    teacher: str | None = None
    recipe: str | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"zoo name {self.name!r} must look like '<arch>.<tag>' (lowercase, digits, '_')")
        sources = [s for s in (self.gdrive_id, self.url, self.hf_hub_id) if s]
        if len(sources) != 1:
            raise ValueError(f"{self.name}: give exactly one of gdrive_id, url or hf_hub_id; got {len(sources)}")
        if (self.gdrive_id or self.url) and not self.filename:
            raise ValueError(f"{self.name}: file-host sources need filename=")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits")

    @property
    def arch(self) -> str:
        """The :func:`qdetr.models.create_model` name (part before the dot)."""
        return self.name.split(".", 1)[0]

    @property
    def source(self) -> str:
        """Human-readable source: ``gdrive:<id>``, the URL, or ``hf-hub:<repo>``."""
        if self.gdrive_id:
            return f"gdrive:{self.gdrive_id}"
        if self.url:
            return self.url
        return f"hf-hub:{self.hf_hub_id}"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for listings and provenance)."""
        return {**dataclasses.asdict(self), "arch": self.arch, "source": self.source}


def register_pretrained(entry: PretrainedEntry) -> PretrainedEntry:
    """Add ``entry`` to the registry.

    Args:
        entry: the weights' metadata.

    Returns:
        ``entry``.

    Raises:
        ValueError: if the name is already registered.

    Examples:
        >>> from qdetr.zoo import PretrainedEntry, list_pretrained, register_pretrained
        >>> from qdetr.zoo.registry import unregister_pretrained
        >>> entry = PretrainedEntry(name="detr_tiny.demo_coco", hf_hub_id="my-org/detr-tiny-demo")
        >>> _ = register_pretrained(entry)
        >>> list_pretrained("detr_tiny.*")
        ['detr_tiny.demo_coco']
        >>> unregister_pretrained("detr_tiny.demo_coco")
    """
    if entry.name in _REGISTRY:
        raise ValueError(f"pretrained entry {entry.name!r} is already registered; pick another name")
    _REGISTRY[entry.name] = entry
    return entry


def unregister_pretrained(name: str) -> None:
    """Remove an entry (for tests and for replacing an entry deliberately)."""
    _REGISTRY.pop(name, None)


def get_pretrained_entry(name: str) -> PretrainedEntry:
    """The entry called ``name``.

    Args:
        name: a name from :func:`list_pretrained`.

    Returns:
        The :class:`PretrainedEntry`.

    Raises:
        KeyError: unknown name (the message lists close matches).

    Examples:
        >>> from qdetr.zoo import get_pretrained_entry
        >>> entry = get_pretrained_entry("qdetr_smca_r50.w4a4attn8_seed_coco_e50")
        >>> entry.bits, entry.attn_bits, entry.profile, entry.arch
        (4, 8, 'seed', 'qdetr_smca_r50')
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {close}?" if close else ""
        raise KeyError(f"no pretrained entry {name!r}.{hint} See qdetr.list_pretrained().") from None


def list_pretrained(pattern: str | None = None, *, details: bool = False) -> list[str] | list[dict[str, Any]]:
    """Registered pretrained weights.

    Args:
        pattern: optional glob on the name (``"qdetr_smca_r50.*"``).
        details: return dicts (name, bits, profile, source, box_ap, license, ...) instead of names.

    Returns:
        Sorted names, or their metadata dicts.

    Examples:
        >>> from qdetr.zoo import list_pretrained
        >>> list_pretrained("qdetr_smca_r50.*")
        ['qdetr_smca_r50.w2a2attn8_seed_coco_e50', 'qdetr_smca_r50.w4a4attn8_seed_coco_e50']
        >>> details = list_pretrained("qdetr_smca_r50.*", details=True)
        >>> sorted(info["bits"] for info in details)
        [2, 4]
    """
    names = sorted(n for n in _REGISTRY if pattern is None or fnmatch.fnmatchcase(n, pattern))
    if details:
        return [_REGISTRY[n].to_dict() for n in names]
    return names


def is_registered(name: str) -> bool:
    """Whether ``name`` is a registered entry."""
    return name in _REGISTRY
