"""Fixtures of the robustness suite: the zoo's isolated cache and loopback file server."""

from __future__ import annotations

from zoo.conftest import loopback, qdetr_cache  # noqa: F401 - re-exported fixtures
