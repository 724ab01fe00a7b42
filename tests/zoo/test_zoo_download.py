"""Downloads against a loopback server: verification, resume, HTML pages, offline mode."""

from __future__ import annotations

import json
import os

import pytest

from qdetr.zoo.download import (
    ChecksumError,
    DownloadError,
    HTMLResponseError,
    OfflineModeError,
    cached_file_path,
    download_url,
    gdrive_download_url,
)

from .loopback_server import DRIVE_INTERSTITIAL_TEMPLATE, Route, sha256_hex

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: spans several read chunks


def _files_in(directory):
    return sorted(p.name for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def test_good_file_is_verified_cached_and_reused(qdetr_cache, loopback):
    url = loopback.add("/files/good.bin", Route(data=PAYLOAD))
    path = download_url(url, sha256=sha256_hex(PAYLOAD), size=len(PAYLOAD), subdir="good")
    assert path == cached_file_path("good.bin", subdir="good")
    assert path.read_bytes() == PAYLOAD
    meta = json.loads(path.with_name("good.bin.meta.json").read_text())
    assert meta["sha256"] == sha256_hex(PAYLOAD) and meta["sha256_source"] == "expected"
    assert not path.with_name("good.bin.part").exists()
    # Second call: served from the cache, no new request.
    assert download_url(url, sha256=sha256_hex(PAYLOAD), subdir="good") == path
    assert len(loopback.requests_to("/files/good.bin")) == 1


def test_unknown_sha_is_recorded_and_enforced_later(qdetr_cache, loopback):
    url = loopback.add("/files/nosha.bin", Route(data=PAYLOAD))
    path = download_url(url, subdir="nosha")
    meta = json.loads(path.with_name("nosha.bin.meta.json").read_text())
    assert meta["sha256"] == sha256_hex(PAYLOAD)
    assert meta["sha256_source"] == "recorded_on_first_download"
    # The cached copy gets corrupted: offline, that is a clear error, never a silent use.
    path.write_bytes(b"x" + PAYLOAD[1:])
    os.environ["QDETR_OFFLINE"] = "1"
    try:
        with pytest.raises(ChecksumError, match="corrupt.*recorded"):
            download_url(url, subdir="nosha")
    finally:
        del os.environ["QDETR_OFFLINE"]
    # Online, the corrupt copy is replaced by a fresh verified download.
    assert download_url(url, subdir="nosha").read_bytes() == PAYLOAD
    assert len(loopback.requests_to("/files/nosha.bin")) == 2


def test_wrong_sha_fails_and_caches_nothing(qdetr_cache, loopback):
    url = loopback.add("/files/bad.bin", Route(data=PAYLOAD))
    with pytest.raises(ChecksumError, match="SHA-256 mismatch.*nothing was cached"):
        download_url(url, sha256="0" * 64, subdir="bad")
    assert _files_in(qdetr_cache) == []


def test_wrong_size_fails_and_caches_nothing(qdetr_cache, loopback):
    url = loopback.add("/files/size.bin", Route(data=PAYLOAD))
    with pytest.raises(DownloadError, match="expected 12"):
        download_url(url, size=12, subdir="size")
    assert not cached_file_path("size.bin", subdir="size").exists()


def test_interrupted_transfer_resumes_with_range(qdetr_cache, loopback):
    cut = 300_000
    url = loopback.add("/files/cut.bin", Route(data=PAYLOAD, truncate_at=cut, truncate_times=1, etag='"v1"'))
    path = download_url(url, sha256=sha256_hex(PAYLOAD), subdir="cut")
    assert path.read_bytes() == PAYLOAD
    reqs = loopback.requests_to("/files/cut.bin")
    assert [r["range"] for r in reqs] == [None, f"bytes={cut}-"]


def test_killed_download_leaves_no_trusted_file_and_resumes_next_call(qdetr_cache, loopback):
    cut = 500_000
    url = loopback.add("/files/killed.bin", Route(data=PAYLOAD, truncate_at=cut, truncate_times=2))
    with pytest.raises(DownloadError, match="incomplete after 2 attempts.*resumes"):
        download_url(url, subdir="killed", max_attempts=2)
    final = cached_file_path("killed.bin", subdir="killed")
    assert not final.exists()
    assert final.with_name("killed.bin.part").stat().st_size == cut
    # Offline, the partial file is not trusted.
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with pytest.raises(OfflineModeError, match="not in the cache"):
            download_url(url, subdir="killed")
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    # The next online call resumes from the partial file.
    assert download_url(url, subdir="killed", sha256=sha256_hex(PAYLOAD)).read_bytes() == PAYLOAD
    assert loopback.requests_to("/files/killed.bin")[-1]["range"] == f"bytes={cut}-"


def test_server_without_range_support_restarts_from_zero(qdetr_cache, loopback):
    url = loopback.add("/files/norange.bin", Route(data=PAYLOAD, support_range=False, truncate_at=1000,
                                                   truncate_times=1))
    assert download_url(url, subdir="norange", sha256=sha256_hex(PAYLOAD)).read_bytes() == PAYLOAD


def test_html_page_is_refused_for_a_plain_host(qdetr_cache, loopback):
    url = loopback.add("/files/login.pth", Route(html="<html><body>Please sign in</body></html>"))
    with pytest.raises(HTMLResponseError, match="HTML page instead of the file"):
        download_url(url, subdir="login")
    assert _files_in(qdetr_cache) == []


def test_html_detected_from_leading_bytes(qdetr_cache, loopback):
    url = loopback.add("/files/sneaky.pth", Route(data=b"  <!DOCTYPE html><html>quota</html>",
                                                  content_type="application/octet-stream"))
    with pytest.raises(HTMLResponseError):
        download_url(url, subdir="sneaky")
    assert _files_in(qdetr_cache) == []


def test_drive_interstitial_form_is_followed(qdetr_cache, loopback, monkeypatch):
    monkeypatch.setenv("QDETR_GDRIVE_ENDPOINT", loopback.base_url)
    page = DRIVE_INTERSTITIAL_TEMPLATE.format(name="ckpt.pth", action=loopback.url("/download"), file_id="FILEID")
    loopback.add("/uc", Route(html=page))
    loopback.add("/download", Route(data=PAYLOAD, confirm_param=("confirm", "t")))
    url = gdrive_download_url("FILEID")
    assert url == f"{loopback.base_url}/uc?export=download&id=FILEID"
    path = download_url(url, filename="ckpt.pth", subdir="drive")  # gdrive auto-detected from the endpoint
    assert path.read_bytes() == PAYLOAD
    confirm = loopback.requests_to("/download")[0]["query"]
    assert confirm == {"id": "FILEID", "export": "download", "confirm": "t", "uuid": "0d5c-11ef"}


def test_drive_page_without_form_retries_with_confirm_t(qdetr_cache, loopback):
    loopback.add("/uc", Route(data=PAYLOAD, html="<html>can't scan for viruses</html>",
                              confirm_param=("confirm", "t")))
    path = download_url(loopback.url("/uc?export=download&id=ABC"), filename="f.pth", subdir="d2", gdrive=True)
    assert path.read_bytes() == PAYLOAD
    assert loopback.requests_to("/uc")[1]["query"]["confirm"] == "t"


def test_drive_quota_page_fails_clearly(qdetr_cache, loopback):
    loopback.add("/uc", Route(html="<html>Too many users have viewed or downloaded this file</html>"))
    with pytest.raises(HTMLResponseError, match="kept answering.*HTML.*by hand|kept answering"):
        download_url(loopback.url("/uc?export=download&id=ABC"), filename="f.pth", subdir="d3", gdrive=True,
                     manual_hint="Download it from the Drive page.")
    assert _files_in(qdetr_cache) == []


def test_offline_uses_cache_or_raises(qdetr_cache, loopback, monkeypatch):
    url = loopback.add("/files/off.bin", Route(data=PAYLOAD))
    monkeypatch.setenv("QDETR_OFFLINE", "1")
    with pytest.raises(OfflineModeError, match="QDETR_OFFLINE or HF_HUB_OFFLINE"):
        download_url(url, subdir="off")
    assert loopback.requests == []
    monkeypatch.delenv("QDETR_OFFLINE")
    path = download_url(url, subdir="off")
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    assert download_url(url, subdir="off") == path
    assert len(loopback.requests) == 1


def test_hand_placed_file_is_accepted_and_checked(qdetr_cache, loopback):
    target = cached_file_path("manual.pth", subdir="manual")
    target.parent.mkdir(parents=True)
    target.write_bytes(PAYLOAD)
    url = loopback.url("/never-requested.pth")
    assert download_url(url, filename="manual.pth", subdir="manual", sha256=sha256_hex(PAYLOAD)) == target
    assert loopback.requests == []


def test_404_is_a_clear_error(qdetr_cache, loopback):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_url(loopback.url("/missing.pth"), subdir="missing")


@pytest.mark.parametrize("bad", ["", "a/b", "x?y"])
def test_gdrive_id_validation(bad):
    with pytest.raises(ValueError, match="Google Drive file id"):
        gdrive_download_url(bad)


def test_real_drive_url_shape(monkeypatch):
    monkeypatch.delenv("QDETR_GDRIVE_ENDPOINT", raising=False)
    assert gdrive_download_url("1K_lZckXWW9_mdSvhXELeWoSyqvFZVJAT") == (
        "https://drive.google.com/uc?export=download&id=1K_lZckXWW9_mdSvhXELeWoSyqvFZVJAT")
