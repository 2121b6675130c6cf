"""Resumable, locked, size-checked HTTP(S) download into a ``.part`` file: the one transfer loop behind the
model zoo and the FID files (Inception weights, reference statistics), and the one safe loader of the weights
they hold. Callers check the result (checksum, or for files without one, size and loadability) and rename it.

What a transfer checks (docs/ENGINE.md "Downloads and checkpoints"):

* **One writer.** :func:`download_lock` takes an exclusive ``fcntl.flock`` on ``<dest>.part.lock`` for the
  whole fetch-check-rename sequence. A second downloader of the same file *waits* for the first (logging the
  holder's PID once) and then finds the finished file, so ranks or shells started together never interleave
  their bytes in one ``.part``. The lock file stays (removing it would race with a waiter).
* **Own bytes only.** A ``.part`` is resumed only up to the last checkpoint recorded in its ``<dest>.part.json``
  sidecar (URL, byte count, SHA-256 of those bytes, the server's total and ETag), written by this code every
  64 MiB and when a transfer stops. A ``.part`` without a matching sidecar (foreign or hand-made bytes, another
  URL, a changed prefix) is discarded and the download restarts from byte 0; bytes past the last checkpoint are
  cut off. The resume request carries ``If-Range`` with the ETag, so a changed file on the server restarts too.
* **Exact size.** The received size must equal the server's total: ``Content-Length`` of a 200, the
  ``Content-Range`` total of a 206 (whose ``Content-Length`` must equal the rest). An HTTP 416 (nothing left to
  send) is accepted only when its ``Content-Range: bytes */N`` equals both the ``.part`` length and the total
  recorded when the bytes were fetched; a ``.part`` longer than the file, or one whose total is unknown, is
  deleted and fetched again, never renamed. A server that gives no size at all is refused unless the caller
  checks a published checksum afterwards; a server that sends more than it announced is refused.

Network failures become a CheckpointError built by the caller's ``offline`` function (which names the URL and
where to place the file by hand).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import io
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence
from urllib.parse import urlparse

from tqdm import tqdm

from pfdiff_bench.errors import CheckpointError
from pfdiff_bench.files import write_bytes_atomic

CHUNK = 1 << 20
CHECKPOINT_EVERY = 64 * CHUNK  # bytes between two sidecar checkpoints of a running transfer
PART_FORMAT = "pfdiff-bench-part/1"
Log = Callable[[str], None]


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def part_state_path(dest_or_part: Path) -> Path:
    """``<dest>.part.json``: what this code knows about the bytes in ``<dest>.part``."""
    p = Path(dest_or_part)
    part = p if p.name.endswith(".part") else part_path(p)
    return part.with_name(part.name + ".json")


def lock_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part.lock")


def discard_part(part: Path) -> None:
    """Delete a ``.part`` file and its sidecar."""
    part.unlink(missing_ok=True)
    part_state_path(part).unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`pfdiff_bench.files.atomic_writer`; the thread id in the
    temporary name keeps concurrent downloader threads of one process apart)."""
    write_bytes_atomic(path, text.encode(), suffix=f"-{threading.get_ident()}")


@contextlib.contextmanager
def download_lock(dest: Path, *, label: str, log: Log, poll_s: float = 0.2) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<dest>.part.lock``; wait (saying who holds it) while another process has it.

    Waiting, not refusing: the usual second downloader is another rank or shell started at the same time, and
    after the wait it finds the verified file. ``flock`` locks belong to the open file, so they are released
    when the holder exits or is killed and also serialise threads of one process.
    """
    import fcntl

    path = lock_path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise CheckpointError(f"cannot lock {path} for the download of {label}: {exc}") from None
                if not told:
                    holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                    log(f"waiting for the download of {label} by PID {holder} to finish (it holds {path})")
                    told = True
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


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


# ------------------------------------------------------------------------- the .part and its sidecar
def _read_state(part: Path) -> Optional[dict]:
    try:
        state = json.loads(part_state_path(part).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    ok = (isinstance(state, dict) and state.get("format") == PART_FORMAT and isinstance(state.get("bytes"), int)
          and state["bytes"] >= 0 and isinstance(state.get("sha256"), str)
          and (state.get("total") is None or isinstance(state.get("total"), int)))
    return state if ok else None


def _write_state(part: Path, url: str, size: int, h, total: Optional[int], etag: Optional[str]) -> None:
    write_atomic(part_state_path(part), json.dumps({"format": PART_FORMAT, "url": url, "bytes": size,
                                                    "sha256": h.hexdigest(), "total": total, "etag": etag}))


def _own_prefix(url: str, part: Path, label: str, log: Log):
    """``(offset, running sha256, state)`` of the bytes of ``part`` this code fetched from ``url``; else 0."""
    fresh = (0, hashlib.sha256(), None)
    if not part.exists():
        part_state_path(part).unlink(missing_ok=True)
        return fresh
    size = part.stat().st_size
    state = _read_state(part)
    why = None
    if state is None:
        why = "it has no record of being fetched by pfdiff-bench"
    elif state.get("url") != url:
        why = f"it was fetched from {state.get('url')}"
    elif size < state["bytes"]:
        why = f"it is shorter ({size:,} bytes) than the {state['bytes']:,} bytes recorded"
    else:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            left = state["bytes"]
            while left and (chunk := f.read(min(CHUNK, left))):
                h.update(chunk)
                left -= len(chunk)
        if h.hexdigest() != state["sha256"]:
            why = "its bytes differ from the ones recorded when they were fetched"
    if why is not None:
        log(f"note: discarding {part} ({why}); restarting {label} from 0")
        discard_part(part)
        return fresh
    if size > state["bytes"]:  # fetched after the last checkpoint but never recorded: not trusted
        with open(part, "r+b") as f:
            f.truncate(state["bytes"])
    return state["bytes"], h, state


def _total_of_range(value: Optional[str]) -> Optional[int]:
    """N of a ``Content-Range: bytes a-b/N`` or ``bytes */N`` header (None when absent or ``*``)."""
    tail = (value or "").rsplit("/", 1)[-1].strip()
    return int(tail) if tail.isdigit() else None


def _int_header(headers, name: str) -> Optional[int]:
    v = (headers.get(name) or "").strip() if headers is not None else ""
    return int(v) if v.isdigit() else None


def transfer(url: str, part: Path, *, label: str, offline: Callable[[str], CheckpointError], timeout: float,
             log: Log, progress: Optional[bool] = None,
             checksum_follows: bool = False) -> tuple[int, Optional[int], str]:
    """Fetch ``url`` into ``part`` (resuming its own checkpointed bytes); returns ``(size, total, sha256)``.

    ``size == total`` holds on return (the server's total, see the module docstring), and ``sha256`` is the
    digest of the whole ``part``. A server that gives no size is refused, unless ``checksum_follows`` (the
    caller compares a published checksum next; ``total`` is then None). Call it under :func:`download_lock`.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):  # a second attempt only after the .part was discarded: starts from 0
        offset, h, state = _own_prefix(url, part, label, log)
        request = urllib.request.Request(url, headers={"User-Agent": "pfdiff-bench"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
            if state.get("etag"):
                request.add_header("If-Range", state["etag"])
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # nothing left to send: complete only if the totals agree
                total = _total_of_range(exc.headers.get("Content-Range") if exc.headers else None)
                if total is not None and total == offset and state.get("total") in (None, total):
                    return offset, total, h.hexdigest()
                told = "unknown" if total is None else f"{total:,} bytes"
                log(f"note: the server has nothing after byte {offset:,} of {label} but gives its size as {told}; "
                    f"discarding {part} and restarting from 0")
                discard_part(part)
                continue
            raise offline(f"HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, socket.timeout, http.client.HTTPException, OSError) as exc:
            raise offline(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from None
        with response:
            status = getattr(response, "status", None) or response.getcode()
            length = _int_header(response.headers, "Content-Length")
            etag = response.headers.get("ETag")
            if status == 206 and offset:
                content_range = response.headers.get("Content-Range", "")  # bytes a-b/total
                try:
                    start = int(content_range.split()[1].split("-")[0])
                except (IndexError, ValueError):
                    start = None
                total = _total_of_range(content_range)
                if start != offset or total is None or (length is not None and length != total - offset) \
                        or state.get("total") not in (None, total) or (etag and state.get("etag") not in (None, etag)):
                    log(f"note: the server's resume of {label} ({content_range or 'no Content-Range'}, "
                        f"Content-Length {length}) does not continue the {offset:,} bytes fetched before "
                        f"(total {state.get('total')}); restarting from 0")
                    discard_part(part)
                    continue
                mode = "ab"
                log(f"resuming {label} at {offset:,} bytes")
            elif status == 200:  # a fresh download, or the server ignored Range / If-Range: start over
                if offset:
                    log(f"note: the server sent the whole file; restarting {label} from 0")
                offset, h, total, mode = 0, hashlib.sha256(), length, "wb"
            else:
                raise offline(f"unexpected HTTP {status} for a {'resumed' if offset else 'plain'} request")
            if total is None and not checksum_follows:
                raise CheckpointError(f"the server gives no size for {url} (no Content-Length): refusing a download "
                                      f"whose completeness cannot be checked; fetch it by hand")
            size = offset
            since = 0
            try:
                with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                                 unit_divisor=1024, desc=label, file=sys.stderr,
                                                 disable=(not progress) if progress is not None else None) as bar:
                    try:
                        if mode == "wb":
                            _write_state(part, url, 0, h, total, etag)
                        while (total is None or size < total) and \
                                (chunk := response.read(CHUNK if total is None else min(CHUNK, total - size))):
                            f.write(chunk)
                            h.update(chunk)
                            size += len(chunk)
                            since += len(chunk)
                            bar.update(len(chunk))
                            if since >= CHECKPOINT_EVERY:  # resumable up to here even after a SIGKILL
                                f.flush()
                                os.fsync(f.fileno())
                                _write_state(part, url, size, h, total, etag)
                                since = 0
                        extra = response.read(1) if total is not None and size == total else b""
                    finally:
                        f.flush()
                        _write_state(part, url, size, h, total, etag)
            except (urllib.error.URLError, socket.timeout, http.client.HTTPException, OSError) as exc:
                raise CheckpointError(f"download of {label} from {url} interrupted ({type(exc).__name__}: {exc}); "
                                      f"{size:,} bytes kept in {part}: run the download again to resume") from None
        if extra:
            discard_part(part)
            raise CheckpointError(f"the server sent more than the {total:,} bytes it announced for {url}; "
                                  f"the download was deleted")
        if total is not None and size != total:
            raise CheckpointError(f"download of {label} incomplete: {size:,} of {total:,} bytes in {part}; "
                                  f"run the download again to resume")
        return size, total, h.hexdigest()
    raise CheckpointError(f"cannot download {label} from {url}: the server's size and range answers disagree twice; "
                          f"fetch it by hand")


# ------------------------------------------------------------------ hashing and safe loading
def file_digest(path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path) -> str:
    return file_digest(path, "sha256")


def read_hashed(path, algorithms: Sequence[str] = ("sha256",), *, what: str = "file") -> tuple[bytes, dict[str, str]]:
    """Read ``path`` once into memory and digest exactly those bytes: ``(data, {algorithm: hex})``.

    Check the digests, then load ``data`` (:func:`load_weights_bytes`): what is loaded is what was checked,
    even if the file is replaced in between (issue 10 item 6).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return data, {a: hashlib.new(a, data).hexdigest() for a in algorithms}


def load_weights_bytes(data: bytes, source, *, safe_globals: Sequence = ()) -> object:
    """``torch.load(BytesIO(data), map_location="cpu", weights_only=True)``, else a one-line CheckpointError.

    ``safe_globals``: extra pickle globals to allow (``torch.serialization.safe_globals``). There is no
    ``weights_only=False`` path: a file the safe unpickler refuses is refused.
    """
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, OSError, KeyError, IndexError, MemoryError) as exc:
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"cannot load {source} as a weights-only checkpoint (refusing to unpickle arbitrary objects; "
            f"{type(exc).__name__}: {first})") from None


# ------------------------------------------------------------------ URL fetch with checksum
def fetch_file(url: str, dest, *, sha256: Optional[str] = None, sha256_prefix: Optional[str] = None,
               what: str = "file", hint: str = "", timeout: float = 5.0, log=None,
               progress: Optional[bool] = None) -> Path:
    """Download ``url`` to ``dest``: lock, ``.part`` file, HTTP Range resume, size check, SHA-256 check.

    The URL-based counterpart of :func:`pfdiff_bench.models.zoo.download` (same transfer code). ``sha256``
    (full digest) or ``sha256_prefix`` (torch.hub's hash-in-name) must match before the file gets its final
    name; without either, only the size is checked and the caller pins it. Offline, fails within about
    ``timeout`` seconds with a CheckpointError naming the URL and the exact path to place the file at.
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
    with download_lock(dest, label=dest.name, log=log):
        if dest.is_file():  # another process finished it while we waited; the caller checks it as usual
            return dest
        size, _, got = transfer(url, part, label=dest.name, offline=offline, timeout=timeout, log=log,
                                progress=progress, checksum_follows=sha256 is not None)
        if (sha256 is not None and got != sha256) or (sha256_prefix is not None and not got.startswith(sha256_prefix)):
            discard_part(part)
            raise CheckpointError(f"checksum mismatch for {what} downloaded from {url}: SHA-256 {got}, expected "
                                  f"{sha256 or sha256_prefix + '…'}; the bad file was deleted")
        os.replace(part, dest)
        part_state_path(part).unlink(missing_ok=True)
    log(f"downloaded {what} to {dest} ({size:,} bytes, sha256 {got})")
    return dest
