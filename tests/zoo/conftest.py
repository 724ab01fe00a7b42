"""Fixtures for the zoo tests: an isolated cache, offline switches cleared, a loopback server."""

from __future__ import annotations

import pytest

from .loopback_server import LoopbackServer


@pytest.fixture
def qdetr_cache(tmp_path, monkeypatch):
    """A fresh ``QDETR_CACHE`` with offline mode off and no proxy in the way of 127.0.0.1."""
    cache = tmp_path / "qdetr-cache"
    monkeypatch.setenv("QDETR_CACHE", str(cache))
    for var in ("QDETR_OFFLINE", "HF_HUB_OFFLINE", "QDETR_GDRIVE_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return cache


@pytest.fixture
def loopback():
    """A running :class:`LoopbackServer`, shut down after the test."""
    with LoopbackServer() as server:
        yield server
