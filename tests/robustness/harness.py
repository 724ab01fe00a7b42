"""The table-driven robustness harness: each case names its input, the expected qdetr error and a message fragment.

A :class:`Case` runs ``action(workdir)`` inside a fresh folder prepared by ``setup(workdir)``;
:func:`check_case` asserts that it raises the expected :class:`qdetr.errors.QdetrError`
subclass with the fragment in its message, and that no file under the folder was created,
changed or removed by the failing call (``expect_unchanged=False`` for the few cases whose
documented answer is to evict a damaged cache file: they check that themselves).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from qdetr.errors import QdetrError


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        name: what the input is (the pytest id).
        action: the call that must fail, given the prepared folder.
        error: the qdetr exception type expected.
        fragment: a piece of the expected message (case-insensitive).
        setup: prepares the folder (files the action reads); default: nothing.
        expect_unchanged: the folder must be byte-identical after the failure.
    """

    name: str
    action: Callable[[Path], object]
    error: type[QdetrError]
    fragment: str
    setup: Callable[[Path], None] | None = None
    expect_unchanged: bool = True


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder`` (folders as ``<dir>``)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        out[key] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def check_case(case: Case, workdir: Path) -> QdetrError:
    """Run ``case`` in ``workdir``; assert type, message fragment and an unchanged folder. Returns the error."""
    workdir.mkdir(parents=True, exist_ok=True)
    if case.setup is not None:
        case.setup(workdir)
    before = snapshot(workdir)
    with pytest.raises(case.error) as info:
        case.action(workdir)
    message = str(info.value)
    assert isinstance(info.value, QdetrError)
    assert case.fragment.lower() in message.lower(), f"{case.name}: {case.fragment!r} not in {message!r}"
    assert "weights_only=False" not in message and "Traceback" not in message
    if case.expect_unchanged:
        assert snapshot(workdir) == before, f"{case.name}: files changed on disk"
    return info.value


def ids(cases: list[Case]) -> list[str]:
    """Pytest ids of a case table."""
    return [case.name for case in cases]
