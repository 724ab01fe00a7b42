"""Downloads that cannot poison the cache: truncation, HTML, plain http, escaping names, bad cached files."""

from __future__ import annotations

import io
import logging
import zipfile

import pytest
import torch

from qdetr.errors import ConfigError, DownloadError, HTMLResponseError
from qdetr.zoo.download import cached_file_path, download_url
from zoo.loopback_server import Route

from .harness import Case, check_case, ids


def _pth_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.arange(50_000, dtype=torch.float32)}}, buffer)
    return buffer.getvalue()


PTH = _pth_bytes()


def _serve(loopback, path: str, **route) -> str:
    return loopback.add(path, Route(**route))


def _cases(loopback, cache) -> list[Case]:
    def get(url, **kwargs):
        return lambda _: download_url(url, cache_dir=cache, **kwargs)

    return [
        Case("truncated .pth without Content-Length",
             get(_serve(loopback, "/cut.pth", data=PTH, send_length=False, truncate_at=len(PTH) // 2,
                        truncate_times=99), subdir="cut"),
             DownloadError, "incomplete"),
        Case("truncated .safetensors without Content-Length",
             get(_serve(loopback, "/cut.safetensors", send_length=False, truncate_at=40, truncate_times=99,
                        data=(100).to_bytes(8, "little") + b'{"w":{"dtype":"F32","shape":[25],"data_offsets":[0,100]}}'
                        .ljust(100) + bytes(100)), subdir="cut"),
             DownloadError, "safetensors header"),
        Case("empty body without Content-Length",
             get(_serve(loopback, "/empty.pth", data=b"", send_length=False), subdir="empty"),
             DownloadError, "0 bytes"),
        Case("HTML served as application/octet-stream (starts with <head>)",
             get(_serve(loopback, "/login.pth", data=b"\n <head><title>Sign in</title></head><body>...</body>",
                        content_type="application/octet-stream"), subdir="html"),
             HTMLResponseError, "HTML page"),
        Case("HTML served with a byte-order mark",
             get(_serve(loopback, "/bom.pth", data=b"\xef\xbb\xbf<!-- error --><div>quota exceeded</div>"),
                 subdir="html"),
             HTMLResponseError, "HTML page"),
        Case("plain http:// to a remote host",
             get("http://example.com/weights.pth", subdir="remote"), DownloadError, "refusing plain http://"),
        Case("redirect from the server to plain http:// elsewhere",
             get(_serve(loopback, "/moved.pth", redirect_to="http://example.com/weights.pth"), subdir="moved"),
             DownloadError, "refusing plain http://"),
        Case("subdir that climbs out of the cache",
             get(_serve(loopback, "/ok.pth", data=PTH), subdir="../../outside"), ConfigError, "without '..'"),
        Case("absolute subdir", get(_serve(loopback, "/ok2.pth", data=PTH), subdir="/tmp/outside"),
             ConfigError, "relative folder"),
        Case("file name with a folder", get(_serve(loopback, "/ok3.pth", data=PTH), subdir="x",
                                            filename="../escape.pth"),
             ConfigError, "plain file name"),
        Case("file: URL", get("file:///etc/passwd", subdir="x"), ConfigError, "only http(s)"),
    ]


CASE_NAMES = [
    "truncated .pth without Content-Length",
    "truncated .safetensors without Content-Length",
    "empty body without Content-Length",
    "HTML served as application/octet-stream (starts with <head>)",
    "HTML served with a byte-order mark",
    "plain http:// to a remote host",
    "redirect from the server to plain http:// elsewhere",
    "subdir that climbs out of the cache",
    "absolute subdir",
    "file name with a folder",
    "file: URL",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_download_caches_nothing(name, tmp_path, qdetr_cache, loopback, monkeypatch):
    monkeypatch.delenv("QDETR_ALLOW_HTTP", raising=False)
    cases = {case.name: case for case in _cases(loopback, qdetr_cache)}
    assert ids(list(cases.values())) == CASE_NAMES
    qdetr_cache.mkdir(parents=True, exist_ok=True)
    check_case(cases[name], qdetr_cache)  # the whole cache folder is unchanged
    assert not (tmp_path / "outside").exists()


def test_whole_file_without_content_length_is_accepted(qdetr_cache, loopback):
    url = loopback.add("/whole.pth", Route(data=PTH, send_length=False))
    path = download_url(url, subdir="whole")
    assert path.read_bytes() == PTH and zipfile.is_zipfile(path)


def test_plain_http_needs_an_explicit_opt_in(monkeypatch):
    from qdetr.zoo.download import _check_transport

    _check_transport("http://127.0.0.1:8000/x.pth", allow_http=False)  # loopback is local
    _check_transport("http://mirror.example/x.pth", allow_http=True)
    monkeypatch.setenv("QDETR_ALLOW_HTTP", "1")
    _check_transport("http://mirror.example/x.pth", allow_http=False)


def test_first_download_without_checksum_logs_trust_on_first_use(qdetr_cache, loopback, caplog):
    url = loopback.add("/tofu.pth", Route(data=PTH))
    with caplog.at_level(logging.WARNING, logger="qdetr.zoo.download"):
        path = download_url(url, subdir="tofu")
    assert "trust on first use" in caplog.text and path.name in caplog.text


def test_zoo_list_says_which_checksums_are_unknown(qdetr_cache, capsys):
    from qdetr.cli import main

    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "unknown (TOFU)" in out and "trust" in out
    cached = cached_file_path("ckpt_4_bit_smca_detr_coco.pth", subdir="qdetr_smca_r50.w4a4attn8_seed_coco_e50")
    cached.parent.mkdir(parents=True)
    cached.with_name(cached.name + ".meta.json").write_text('{"sha256": "' + "ab" * 32 + '"}')
    assert main(["zoo", "list"]) == 0
    assert "recorded abababababab" in capsys.readouterr().out


def test_cached_download_that_does_not_load_is_evicted(qdetr_cache, monkeypatch):
    """A damaged cached release file: the error names it and it is removed, so the next call re-downloads."""
    from qdetr.errors import CheckpointError
    from qdetr.zoo import from_pretrained

    name = "qdetr_smca_r50.w4a4attn8_seed_coco_e50"
    cached = cached_file_path("ckpt_4_bit_smca_detr_coco.pth", subdir=name)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(PTH[: len(PTH) // 2])  # a truncated file someone placed in the cache
    monkeypatch.setenv("QDETR_OFFLINE", "1")  # the cached file is used without network
    with pytest.raises(CheckpointError, match="removed from the cache") as info:
        from_pretrained(name)
    assert str(cached) in str(info.value)
    assert not cached.exists() and not cached.with_name(cached.name + ".meta.json").exists()
