"""Verified, resumable, atomic HTTP(S) downloads into the qdetr cache.

The release checkpoints live on file hosts (Google Drive), not on the Hugging Face
Hub, so the zoo needs its own small downloader. It uses only :mod:`urllib` and
guarantees:

* **atomicity** -- bytes go to ``<file>.part``; the final name only ever appears through
  ``os.replace`` *after* the size and SHA-256 checks passed, so a killed download never
  leaves a file that a later call trusts;
* **resume** -- an existing ``.part`` is continued with an HTTP ``Range`` request (guarded
  by ``If-Range`` when the server gave an ``ETag``); a server that ignores ``Range`` makes
  the download restart from byte 0;
* **verification** -- the expected size and SHA-256 when known; otherwise the SHA-256 of
  the first verified download is recorded in ``<file>.meta.json`` and every later use of the
  cached file is checked against it;
* **no HTML instead of a checkpoint** -- an HTML answer (``Content-Type`` or leading bytes)
  is never saved. For Google Drive the "can't scan this file for viruses" interstitial is
  followed once through its confirmation form (or ``confirm=t``); any other HTML fails with
  a message that says how to download the file by hand;
* **offline mode** -- with ``QDETR_OFFLINE``/``HF_HUB_OFFLINE`` set, only the cache is used.

Examples:
    >>> path = download_url(gdrive_download_url("1K_lZckXWW9_mdSvhXELeWoSyqvFZVJAT"),
    ...                     filename="ckpt_4_bit_smca_detr_coco.pth",
    ...                     subdir="qdetr_smca_r50.w4a4attn8_seed_coco_e50",
    ...                     gdrive=True)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import http.client
import http.cookiejar
import logging
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

from qdetr.errors import ChecksumError, ConfigError, DownloadError, HTMLResponseError, OfflineModeError
from qdetr.zoo.cache import default_cache_dir, is_offline, read_json, write_json_atomic
from qdetr.zoo.hashing import sha256_file

__all__ = [
    "DownloadError",
    "ChecksumError",
    "HTMLResponseError",
    "OfflineModeError",
    "GDRIVE_ENDPOINT_ENV",
    "gdrive_download_url",
    "gdrive_view_url",
    "download_url",
    "cached_file_path",
    "sha256_file",
]

logger = logging.getLogger(__name__)

#: Environment variable that overrides the Google Drive endpoint (mirrors, tests).
GDRIVE_ENDPOINT_ENV = "QDETR_GDRIVE_ENDPOINT"
#: Environment variable that allows plain ``http://`` downloads from non-loopback hosts (``1``).
ALLOW_HTTP_ENV = "QDETR_ALLOW_HTTP"
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
_HTML_MARKERS = (b"<!doctype", b"<html", b"<head", b"<body", b"<script", b"<meta", b"<title", b"<div", b"<!--")
_GDRIVE_DEFAULT_ENDPOINT = "https://drive.google.com"
_GDRIVE_HOSTS = {"drive.google.com", "drive.usercontent.google.com", "docs.google.com"}
_CHUNK_BYTES = 1 << 20
_USER_AGENT = "qdetr-zoo (urllib)"


def gdrive_download_url(file_id: str, *, endpoint: str | None = None) -> str:
    """Direct-download URL for a Google Drive file id.

    Args:
        file_id: the id in ``https://drive.google.com/file/d/<ID>/view``.
        endpoint: base URL; defaults to ``$QDETR_GDRIVE_ENDPOINT`` or
            ``https://drive.google.com``.

    Returns:
        ``<endpoint>/uc?export=download&id=<ID>``.

    Raises:
        ValueError: ``file_id`` is empty or holds URL characters (pass only the id).

    Examples:
        >>> from qdetr.zoo import gdrive_download_url
        >>> gdrive_download_url("1K_lZckXWW9_mdSvhXELeWoSyqvFZVJAT", endpoint="https://drive.google.com")
        'https://drive.google.com/uc?export=download&id=1K_lZckXWW9_mdSvhXELeWoSyqvFZVJAT'
    """
    if not file_id or any(c in file_id for c in "/?&=# "):
        raise ValueError(f"not a Google Drive file id: {file_id!r}; pass the <ID> part of .../file/d/<ID>/view")
    base = (endpoint or os.environ.get(GDRIVE_ENDPOINT_ENV) or _GDRIVE_DEFAULT_ENDPOINT).rstrip("/")
    return f"{base}/uc?export=download&id={urllib.parse.quote(file_id)}"


def gdrive_view_url(file_id: str) -> str:
    """The human-facing Google Drive page of ``file_id`` (for manual downloads)."""
    return f"https://drive.google.com/file/d/{file_id}/view"


def cached_file_path(filename: str, *, subdir: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`download_url` stores ``filename`` (a user may put a hand-downloaded file here).

    Raises:
        ConfigError: ``filename`` or ``subdir`` would leave the cache's ``downloads`` folder
            (absolute paths, ``..``, separators in the file name, NUL bytes).
    """
    root = default_cache_dir(cache_dir) / "downloads"
    if not isinstance(filename, str) or not filename or filename in (".", "..") or any(c in filename for c in "/\\\0"):
        raise ConfigError(f"cache file name {filename!r} must be a plain file name (no folders, not '.' or '..')")
    parts = Path(str(subdir)).parts if isinstance(subdir, str) and subdir else ()
    if not parts or "\0" in subdir or Path(subdir).is_absolute() or any(p in (".", "..") for p in parts) or "\\" in subdir:
        raise ConfigError(f"cache subdir {subdir!r} must be a relative folder name without '..'")
    final = root / subdir / filename
    if not os.path.realpath(final).startswith(os.path.realpath(root) + os.sep):
        raise ConfigError(f"cache path {final} leaves the cache folder {root} (a symbolic link?); refusing to use it")
    return final


def download_url(
    url: str,
    *,
    filename: str | None = None,
    subdir: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
    size: int | None = None,
    gdrive: bool | None = None,
    timeout: float = 60.0,
    max_attempts: int = 3,
    manual_hint: str | None = None,
    allow_http: bool = False,
) -> Path:
    """Return a verified local copy of ``url``, downloading it into the cache if needed.

    Args:
        url: HTTP(S) URL of the file.
        filename: name of the cached file; defaults to the last URL path component.
        subdir: cache sub-directory; defaults to a hash of ``url``.
        cache_dir: cache root; defaults to ``$QDETR_CACHE`` or ``~/.cache/qdetr``.
        sha256: expected hex SHA-256, if known. When ``None`` the digest of the first
            verified download is recorded and enforced afterwards.
        size: expected size in bytes, if known.
        gdrive: follow Google Drive's virus-scan interstitial. ``None`` decides from the
            host (``drive.google.com`` and friends, or ``$QDETR_GDRIVE_ENDPOINT``).
        timeout: socket timeout per request, seconds.
        max_attempts: requests tried (each resuming the previous one) before giving up.
        manual_hint: text appended to errors, e.g. the page to download the file by hand.
        allow_http: accept plain ``http://`` (and redirects to it) from non-loopback hosts;
            also allowed by ``QDETR_ALLOW_HTTP=1``. Loopback hosts are always allowed.

    Returns:
        Path of the verified file in the cache.

    Raises:
        OfflineModeError: offline mode is on and the file is not cached.
        HTMLResponseError: the server sent an HTML page instead of the file.
        ChecksumError: the SHA-256 does not match (nothing is cached).
        DownloadError: network failure or a transfer that stayed incomplete; the partial
            ``.part`` file is kept so that the next call resumes it. Also: a plain ``http://``
            URL (or redirect) that was not allowed, and a transfer without ``Content-Length``
            whose file is visibly truncated (nothing is cached).
        ConfigError: a ``filename`` or ``subdir`` that would leave the cache.

    Examples:
        A file already in the cache (here put there by hand) is verified and returned
        without any network access:

        >>> import tempfile
        >>> from qdetr.zoo import download_url
        >>> from qdetr.zoo.download import cached_file_path
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     cached = cached_file_path("weights.pth", subdir="demo", cache_dir=tmp)
        ...     cached.parent.mkdir(parents=True)
        ...     _ = cached.write_bytes(b"0123")
        ...     path = download_url("https://example.com/weights.pth", subdir="demo", cache_dir=tmp)
        ...     print(path == cached, path.with_name("weights.pth.meta.json").is_file())
        True True
        >>> path = download_url("https://example.com/weights.pth")  # doctest: +SKIP
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https"):
        raise ConfigError(f"only http(s) URLs can be downloaded; got {url!r}")
    _check_transport(url, allow_http=allow_http)
    if sha256 is not None:
        sha256 = sha256.lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"sha256 must be 64 hex digits; got {sha256!r}")
    filename = filename or Path(urllib.parse.unquote(parsed.path)).name
    if not filename or filename in (".", "..") or "/" in filename or "\\" in filename:
        raise ConfigError(f"cannot derive a plain file name from {url!r} (got {filename!r}); pass filename=")
    subdir = subdir or hashlib.sha256(url.encode()).hexdigest()[:16]
    if gdrive is None:
        gdrive = _is_gdrive_url(url)
    hint = f" {manual_hint}" if manual_hint else ""

    final = cached_file_path(filename, subdir=subdir, cache_dir=cache_dir)
    meta_path = final.with_name(final.name + ".meta.json")
    cached = _use_cached(final, meta_path, url=url, sha256=sha256, size=size, hint=hint)
    if cached is not None:
        return cached
    if is_offline():
        raise OfflineModeError(
            f"offline mode is on (QDETR_OFFLINE or HF_HUB_OFFLINE) and {filename!r} is not in the cache "
            f"at {final}; unset the variable to download it, or put the file there.{hint}"
        )

    created = [d for d in (final.parent, *final.parent.parents) if not d.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    part_meta_path = final.with_name(final.name + ".part.json")
    try:
        _fetch_with_resume(url, part, part_meta_path, size=size, gdrive=gdrive, timeout=timeout,
                           max_attempts=max_attempts, hint=hint, allow_http=allow_http)

        actual_size = part.stat().st_size
        if size is None and sha256 is None:
            problem = _truncation_evidence(part, filename)
            if problem is not None:
                _discard(part, part_meta_path)
                raise DownloadError(
                    f"the download of {url} is incomplete: {problem}; the server announced no size and no checksum is "
                    f"known, so the file was deleted and nothing was cached. Retry.{hint}"
                )
        if size is not None and actual_size != size:
            _discard(part, part_meta_path)
            raise DownloadError(f"downloaded {actual_size} bytes from {url} but expected {size}; nothing was cached.{hint}")
        digest = sha256_file(part)
        if sha256 is not None and digest != sha256:
            _discard(part, part_meta_path)
            raise ChecksumError(
                f"SHA-256 mismatch for {url}: expected {sha256}, got {digest}; the file was deleted and nothing "
                f"was cached. Retry, or check that the source still serves the released file.{hint}"
            )
        # Metadata first, then the file: the final name only appears once fully verified.
        write_json_atomic(meta_path, {
            "url": url,
            "filename": filename,
            "size": actual_size,
            "sha256": digest,
            "sha256_source": "expected" if sha256 is not None else "recorded_on_first_download",
        })
        os.replace(part, final)
        part_meta_path.unlink(missing_ok=True)
        if sha256 is None:
            logger.warning(
                "no published SHA-256 for %s: trusting this first download (trust on first use) and pinning SHA-256 %s "
                "in %s; later uses of the cached file are checked against it", filename, digest, meta_path)
        return final
    except BaseException:
        _tidy_failed_download(created, part, part_meta_path)
        raise


def _tidy_failed_download(created: list[Path], part: Path, part_meta_path: Path) -> None:
    """After a failure, remove what the attempt created unless a resumable ``.part`` file is kept."""
    if part.exists():
        return  # kept on purpose: the next call resumes it
    part_meta_path.unlink(missing_ok=True)
    for folder in created:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break


def _check_transport(url: str, *, allow_http: bool) -> None:
    """Refuse plain ``http://`` to non-loopback hosts unless allowed (``allow_http`` or ``$QDETR_ALLOW_HTTP``)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "https" or (parsed.hostname or "") in _LOOPBACK_HOSTS:
        return
    if allow_http or os.environ.get(ALLOW_HTTP_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return
    raise DownloadError(
        f"refusing plain http:// for {url}: the bytes could be altered in transit. Use an https:// URL, or pass "
        f"allow_http=True (or set {ALLOW_HTTP_ENV}=1) if you trust the network"
    )


def _truncation_evidence(path: Path, filename: str) -> str | None:
    """Why a file whose size nobody announced is visibly cut short, or None when it looks whole.

    PyTorch files (``.pth``/``.pt``/``.bin``/``.ckpt``) are zip archives whose directory sits at
    the end, or legacy pickles ending with the STOP opcode; a safetensors file must hold the
    bytes its header declares.
    """
    import json
    import zipfile

    size = path.stat().st_size
    if size == 0:
        return "the server sent 0 bytes"
    suffix = Path(filename).suffix.lower()
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(max(0, size - 1))
        last = f.read(1)
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        if head.startswith(b"PK"):
            return None if zipfile.is_zipfile(path) else f"the zip archive ({size} bytes) has no central directory"
        if head[:1] == b"\x80" and last != b".":
            return f"the pickle ({size} bytes) does not end with its STOP opcode"
    elif suffix == ".safetensors":
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len < 2 or 8 + header_len > size:
            return f"the safetensors header declares {header_len} bytes but the file has {size}"
        with open(path, "rb") as f:
            f.seek(8)
            try:
                header = json.loads(f.read(header_len))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError):
                return "the safetensors header is not valid JSON"
        if 8 + header_len + end > size:
            return f"the safetensors header declares {8 + header_len + end} bytes but the file has {size}"
    return None


def _use_cached(final: Path, meta_path: Path, *, url: str, sha256: str | None, size: int | None,
                hint: str) -> Path | None:
    """Return ``final`` if it is cached and verifies; ``None`` if it must be (re)downloaded."""
    if not final.is_file():
        return None
    meta = read_json(meta_path)
    actual_size = final.stat().st_size
    digest = sha256_file(final)
    recorded = meta.get("sha256") if meta else None
    problems = []
    if size is not None and actual_size != size:
        problems.append(f"size {actual_size} != expected {size}")
    if sha256 is not None and digest != sha256:
        problems.append(f"SHA-256 {digest} != expected {sha256}")
    if recorded is not None and digest != recorded:
        problems.append(f"SHA-256 {digest} != recorded {recorded}")
    if problems:
        if is_offline():
            raise ChecksumError(
                f"cached file {final} is corrupt ({'; '.join(problems)}) and offline mode is on; "
                f"delete it and download again with network access.{hint}"
            )
        logger.warning("cached file %s is corrupt (%s); downloading it again", final, "; ".join(problems))
        final.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        return None
    if meta is None:
        # A file put there by hand: trust it from now on, recording its digest.
        logger.info("using hand-placed file %s (SHA-256 %s recorded)", final, digest)
        write_json_atomic(meta_path, {
            "url": url, "filename": final.name, "size": actual_size, "sha256": digest,
            "sha256_source": "expected" if sha256 is not None else "recorded_from_local_file",
        })
    return final


def _discard(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _is_gdrive_url(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    endpoint = os.environ.get(GDRIVE_ENDPOINT_ENV)
    if endpoint and host == (urllib.parse.urlparse(endpoint).hostname or ""):
        return True
    return host in _GDRIVE_HOSTS


def _fetch_with_resume(url: str, part: Path, part_meta_path: Path, *, size: int | None, gdrive: bool,
                       timeout: float, max_attempts: int, hint: str, allow_http: bool = False) -> None:
    """Fill ``part`` with the complete body of ``url``, resuming across attempts and calls."""
    part_meta = read_json(part_meta_path) or {}
    if part.exists() and part_meta.get("url") != url:
        _discard(part, part_meta_path)  # a partial file of another source: never mix bytes
        part_meta = {}
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
                                         _SafeRedirects(allow_http))
    last_error: Exception | None = None
    for attempt in range(1, max_attempts + 1):
        offset = part.stat().st_size if part.exists() else 0
        if size is not None and offset >= size:
            if offset == size:
                return
            _discard(part, part_meta_path)
            offset = 0
        try:
            complete = _fetch_once(opener, url, part, part_meta_path, offset=offset,
                                   validator=part_meta.get("validator"), gdrive=gdrive, timeout=timeout, hint=hint)
        except (HTMLResponseError, ValueError, DownloadError):
            raise
        except (urllib.error.URLError, http.client.HTTPException, OSError, socket.timeout) as err:
            if isinstance(err, urllib.error.HTTPError) and err.code == 416:
                # Range not satisfiable: the partial file is already complete, or stale.
                total = (err.headers.get("Content-Range") or "").rpartition("/")[2]
                if total.isdigit() and int(total) == offset:
                    return
                _discard(part, part_meta_path)
                last_error = err
                continue
            if isinstance(err, urllib.error.HTTPError) and 400 <= err.code < 500 and err.code not in (408, 429):
                raise DownloadError(f"HTTP {err.code} {err.reason} for {url}.{hint}") from err
            last_error = err
            logger.warning("download attempt %d/%d of %s failed: %s", attempt, max_attempts, url, err)
            continue
        part_meta = read_json(part_meta_path) or {}
        if complete:
            return
        last_error = DownloadError("connection closed before the end of the file")
        logger.warning("download attempt %d/%d of %s stopped early; resuming", attempt, max_attempts, url)
    got = part.stat().st_size if part.exists() else 0
    raise DownloadError(
        f"download of {url} incomplete after {max_attempts} attempts ({got} bytes kept in {part}; the next "
        f"call resumes from there): {last_error}.{hint}"
    )


def _fetch_once(opener, url: str, part: Path, part_meta_path: Path, *, offset: int, validator: str | None,
                gdrive: bool, timeout: float, hint: str) -> bool:
    """One request (plus at most one Drive confirmation); append to ``part``. True when complete."""
    response = _open(opener, url, offset=offset, validator=validator, timeout=timeout)
    try:
        head = _peek(response)
        if _looks_like_html(response, head):
            page = head + response.read(2 << 20)
            response.close()
            if not gdrive:
                raise HTMLResponseError(
                    f"{url} returned an HTML page instead of the file (a login, error or interstitial page); "
                    f"nothing was saved. Download the file in a browser and pass its path instead.{hint}"
                )
            confirmed = _gdrive_confirmation_url(page.decode("utf-8", "replace"), url)
            response = _open(opener, confirmed, offset=offset, validator=validator, timeout=timeout)
            head = _peek(response)
            if _looks_like_html(response, head):
                raise HTMLResponseError(
                    f"Google Drive kept answering {url} with an HTML page after the download confirmation "
                    f"(quota exceeded, file not shared, or the page changed); nothing was saved. Download the "
                    f"file in a browser and pass its path (or place it in the cache).{hint}"
                )
        status = response.status
        total = _total_size(response, offset)
        if status == 206 and offset > 0:
            start = _content_range_start(response)
            if start != offset:
                raise DownloadError(f"server resumed {url} at byte {start}, expected {offset}")
            mode = "ab"
        else:
            mode = "wb"  # 200: the server sent the whole file (Range ignored or validator changed)
            offset = 0
        etag = response.headers.get("ETag")
        write_json_atomic(part_meta_path, {"url": url, "validator": etag if etag and not etag.startswith("W/") else
                                           response.headers.get("Last-Modified")})
        written = offset
        with open(part, mode) as f:
            f.write(head)
            written += len(head)
            while True:
                try:
                    chunk = response.read(_CHUNK_BYTES)
                except http.client.IncompleteRead as err:
                    f.write(err.partial)
                    written += len(err.partial)
                    return False
                if not chunk:
                    break
                f.write(chunk)
                written += len(chunk)
        return total is None or written >= total
    finally:
        response.close()


def _open(opener, url: str, *, offset: int, validator: str | None, timeout: float):
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)


def _peek(response, n: int = 512) -> bytes:
    return response.read(n)


def _looks_like_html(response, head: bytes) -> bool:
    """HTML by ``Content-Type`` or by content: markup at the start, whatever the declared type."""
    ctype = (response.headers.get("Content-Type") or "").lower()
    if "text/html" in ctype or "application/xhtml" in ctype:
        return True
    start = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    if not start.startswith(b"<"):
        return False  # zip, pickle and safetensors files never start with '<'
    return any(marker in start for marker in _HTML_MARKERS)


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never from https to plain http (unless http is allowed)."""

    def __init__(self, allow_http: bool) -> None:
        super().__init__()
        self.allow_http = allow_http

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_transport(newurl, allow_http=self.allow_http)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _total_size(response, offset: int) -> int | None:
    """Total file size announced by the server (Content-Range total, or offset + Content-Length)."""
    content_range = response.headers.get("Content-Range")
    if response.status == 206 and content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    length = response.headers.get("Content-Length")
    if length and length.isdigit():
        return int(length) + (offset if response.status == 206 else 0)
    return None


def _content_range_start(response) -> int | None:
    content_range = response.headers.get("Content-Range") or ""
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


class _DriveFormParser(HTMLParser):
    """Collects the download form (action + hidden inputs) and ``confirm=`` links of a Drive page."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((a.get("action", ""), {}))
            self._in_form = True
        elif tag == "input" and self._in_form and a.get("name"):
            self.forms[-1][1][a["name"]] = a.get("value", "")
        elif tag == "a" and "confirm=" in a.get("href", ""):
            self.links.append(a["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def _gdrive_confirmation_url(page: str, url: str) -> str:
    """The URL that confirms a Drive virus-scan interstitial; ``confirm=t`` when the page has no form.

    Only forms and links pointing at Google hosts or at the host of ``url`` are followed.
    """
    parser = _DriveFormParser()
    parser.feed(page)
    allowed_hosts = _GDRIVE_HOSTS | {urllib.parse.urlparse(url).hostname or ""}
    for action, fields in parser.forms:
        target = urllib.parse.urljoin(url, action)
        if "confirm" in fields and urllib.parse.urlparse(target).hostname in allowed_hosts:
            return f"{target}?{urllib.parse.urlencode(fields)}"
    for href in parser.links:
        target = urllib.parse.urljoin(url, href.replace("&amp;", "&"))
        if urllib.parse.urlparse(target).hostname in allowed_hosts:
            return target
    parts = urllib.parse.urlparse(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "confirm"] + [("confirm", "t")]
    return urllib.parse.urlunparse(parts._replace(query=urllib.parse.urlencode(query)))
