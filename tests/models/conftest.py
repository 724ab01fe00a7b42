"""Shared fixtures for the model tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
MANIFEST = SHARED / "fixtures" / "qdetr-seed-smca-r50" / "state_dict_manifest.json"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def manifest_path() -> Path:
    if not MANIFEST.is_file():
        pytest.skip(f"shared fixtures not found at {MANIFEST}")
    return MANIFEST
