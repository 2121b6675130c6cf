"""Resumable HTTP(S) download into a ``.part`` file: the one transfer loop behind the model zoo and the
FID files (Inception weights, reference statistics). Callers check the result and rename it.

The ``.part`` file is resumed with an HTTP Range request; a server that ignores Range restarts it.
Network failures become a CheckpointError built by the caller's ``offline`` function (which names
the URL and where to place the file by hand).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

from tqdm import tqdm

from pfdiff_bench.errors import CheckpointError

CHUNK = 1 << 20
Log = Callable[[str], None]


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def reachable(url: str, timeout: float) -> Optional[str]:
    """None when a TCP connection to the URL's host opens within ``timeout`` s, else the reason.

    Runs in a daemon thread so that a hanging DNS resolver cannot stall the caller beyond ``timeout``.
    """
    u = urlparse(url)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    result: list = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as exc:
            result.append(f"{type(exc).__name__}: {exc}")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result[0] if result else f"no answer from {host} within {timeout:g} s"


def transfer(url: str, part: Path, *, label: str, offline: Callable[[str], CheckpointError], timeout: float,
             log: Log, progress: Optional[bool] = None) -> tuple[int, Optional[int]]:
    """Fetch ``url`` into ``part`` (resuming it); returns (bytes in part, expected total or None)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "pfdiff-bench"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to fetch: the .part is complete (or junk)
            return offset, None
        raise offline(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, socket.timeout, OSError) as exc:
        raise offline(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from None
    with response:
        status = getattr(response, "status", None) or response.getcode()
        length = response.headers.get("Content-Length")
        if status == 206:
            content_range = response.headers.get("Content-Range", "")  # bytes a-b/total
            start = int(content_range.split()[1].split("-")[0]) if content_range.startswith("bytes ") else offset
            if start != offset:
                raise CheckpointError(f"server resumed {url} at byte {start}, not {offset}; delete {part} and retry")
            tail = content_range.rsplit("/", 1)[-1]
            total = int(tail) if tail.isdigit() else (offset + int(length) if length else None)
            mode = "ab"
            log(f"resuming {label} at {offset:,} bytes")
        else:  # 200: the server ignored the Range header: start over
            if offset:
                log(f"note: server does not support resuming; restarting {label} from 0")
            offset, total, mode = 0, (int(length) if length else None), "wb"
        try:
            with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                             unit_divisor=1024, desc=label, file=sys.stderr,
                                             disable=(not progress) if progress is not None else None) as bar:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (urllib.error.URLError, socket.timeout, OSError) as exc:
            kept = part.stat().st_size if part.exists() else 0
            raise CheckpointError(f"download of {label} from {url} interrupted ({type(exc).__name__}: {exc}); "
                                  f"{kept:,} bytes kept in {part}: run the download again to resume") from None
    size = part.stat().st_size if part.exists() else 0
    if total is not None and size != total:
        raise CheckpointError(f"download of {label} incomplete: {size:,} of {total:,} bytes in {part}; "
                              f"run the download again to resume")
    return size, total


# ------------------------------------------------------------------ URL fetch with checksum
def file_digest(path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path) -> str:
    return file_digest(path, "sha256")


def fetch_file(url: str, dest, *, sha256: Optional[str] = None, what: str = "file",
               hint: str = "", timeout: float = 5.0, log=None,
               progress: Optional[bool] = None) -> Path:
    """Download ``url`` to ``dest``: ``.part`` file, HTTP Range resume, tqdm progress, SHA-256 check.

    The URL-based counterpart of :func:`pfdiff_bench.models.zoo.download` (same transfer code).
    Offline, fails within about ``timeout`` seconds with a CheckpointError
    naming the URL and the exact path to place the file at.
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    dest = Path(dest)
    part = part_path(dest)

    def offline(reason: str) -> CheckpointError:
        return CheckpointError(
            f"cannot download {what} from {url} ({reason}). Without network access, fetch that URL elsewhere "
            f"and place the file at {dest}{hint}")

    reason = reachable(url, timeout)  # fail fast (DNS included) before urllib's longer timeouts
    if reason is not None:
        raise offline(reason)
    size, _ = transfer(url, part, label=dest.name, offline=offline, timeout=timeout, log=log, progress=progress)
    got = file_sha256(part)
    if sha256 is not None and got != sha256:
        part.unlink(missing_ok=True)
        raise CheckpointError(f"checksum mismatch for {what} downloaded from {url}: SHA-256 {got}, expected "
                              f"{sha256}; the bad file was deleted")
    os.replace(part, dest)
    log(f"downloaded {what} to {dest} ({size:,} bytes, sha256 {got})")
    return dest
