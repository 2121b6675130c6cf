"""Issue 10 items 5 and 6: attacks on downloads and on loading checkpoints, against a real loopback HTTP server.

The server (http.server on 127.0.0.1, one thread per request) speaks HTTP Range: 206 with Content-Range,
416 with ``Content-Range: bytes */N``, and can be told to lie (Content-Length), cut the body, ignore Range
or go slow. The zoo's specs point at it; the checkpoints are tiny DDPM UNets saved with ``torch.save``, so
a download must also load with the right keys and shapes before an unpinned file is pinned.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from pfdiff_bench import download
from pfdiff_bench.cli import main
from pfdiff_bench.errors import CheckpointError
from pfdiff_bench.models import zoo

TINY = dict(in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
            dropout=0.0, resamp_with_conv=True, image_size=16)
UNPINNED = "adm_imagenet64"  # OpenAI file: no published checksum
PINNED = "ema_cifar10"       # DDPM file: published MD5


class Server:
    """The loopback server's files and its behaviour for the next responses (attributes set by the tests)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.cut_after = None        # the next full/partial body stops after this many bytes (connection closed)
        self.length_delta = 0        # Content-Length sent = true length + delta
        self.ranges = True           # honour Range
        self.omit_length = False
        self.range_416 = "exact"     # "exact": bytes */N; "none": no Content-Range on 416
        self.delay = 0.0             # seconds per 64 KiB
        self.lock = threading.Lock()
        handler = type("H", (Handler,), {"server_state": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def full_gets(self, name: str) -> int:
        return sum(1 for r in self.requests if r["path"] == f"/{name}" and r["range"] is None)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Handler(BaseHTTPRequestHandler):
    server_state: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        st = self.server_state
        rng = self.headers.get("Range")
        with st.lock:
            st.requests.append({"path": self.path, "range": rng, "if_range": self.headers.get("If-Range")})
            cut, st.cut_after = st.cut_after, None
        body = st.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        n = len(body)
        status, start = 200, 0
        if rng and st.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= n:
                self.send_response(416)
                if st.range_416 == "exact":
                    self.send_header("Content-Range", f"bytes */{n}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        chunk = body[start:]
        self.send_response(status)
        self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest()[:16] + '"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{n - 1}/{n}")
        if not st.omit_length:
            self.send_header("Content-Length", str(len(chunk) + st.length_delta))
        self.send_header("Connection", "close")
        self.end_headers()
        if cut is not None:
            chunk = chunk[:cut]
        for i in range(0, len(chunk), 1 << 16):
            if st.delay:
                time.sleep(st.delay)
            try:
                self.wfile.write(chunk[i:i + (1 << 16)])
            except (BrokenPipeError, ConnectionResetError):
                return
        self.close_connection = True


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _tiny_bytes(seed: int = 0, zero: bool = False) -> bytes:
    torch.manual_seed(seed)
    net = zoo.build_arch("ddpm_unet", TINY)
    if zero:
        for p in net.parameters():
            p.data.zero_()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    return buf.getvalue()


@pytest.fixture
def tiny(monkeypatch, tmp_path, server):
    """Both zoo entries become tiny DDPM UNets served by the loopback server; a private cache; no proxy."""
    monkeypatch.setenv("PFDIFF_BENCH_HOME", str(tmp_path / "home"))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    payload = _tiny_bytes(0)
    server.files["unpinned.pt"] = payload
    server.files["pinned.ckpt"] = payload
    n = sum(p.numel() for p in zoo.build_arch("ddpm_unet", TINY).parameters())
    for name, url, md5 in ((UNPINNED, server.url("unpinned.pt"), None),
                           (PINNED, server.url("pinned.ckpt"), hashlib.md5(payload).hexdigest())):
        spec = dataclasses.replace(zoo.CHECKPOINTS[name], arch="ddpm_unet", config=dict(TINY), url=url, md5=md5,
                                   num_parameters=n, manifest=f"tiny-{name}")
        monkeypatch.setitem(zoo.CHECKPOINTS, name, spec)
    zoo._expected_shapes_of.cache_clear()
    yield payload
    zoo._expected_shapes_of.cache_clear()


def _paths(name: str):
    dest = zoo.cache_path(name)
    part = download.part_path(dest)
    return dest, part, dest.with_name(dest.name + ".sha256")


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _own_part(part: Path, url: str, data: bytes, total=None):
    """A ``.part`` as this code records its own bytes (e.g. an older, longer version of the server's file)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data)
    download.part_state_path(part).write_text(json.dumps({
        "format": download.PART_FORMAT, "url": url, "bytes": len(data), "sha256": _sha(data),
        "total": total, "etag": None}))


# ----------------------------------------------------------------------------------------- resume
def test_interrupted_download_resumes_to_the_right_bytes(tiny, server):
    dest, part, pin = _paths(UNPINNED)
    k = len(tiny) // 3
    server.cut_after = k
    with pytest.raises(CheckpointError, match="resume"):
        zoo.download(UNPINNED, log=lambda m: None)
    assert not dest.exists() and not pin.exists() and part.stat().st_size == k
    logs: list[str] = []
    assert zoo.download(UNPINNED, log=logs.append) == dest
    assert dest.read_bytes() == tiny and not part.exists() and not download.part_state_path(part).exists()
    assert [r["range"] for r in server.requests] == [None, f"bytes={k}-"]
    assert server.requests[1]["if_range"]  # the ETag recorded with the first bytes
    assert pin.read_text().split()[0] == _sha(tiny) and zoo.pin_source(dest) == "download"
    assert any("resuming" in m for m in logs)


def test_file_changed_on_the_server_restarts(tiny, server):
    """The server's file changes between an interruption and the resume (same size, new ETag): no splice."""
    dest, part, pin = _paths(UNPINNED)
    k = len(tiny) // 2
    server.cut_after = k
    with pytest.raises(CheckpointError, match="resume"):
        zoo.download(UNPINNED, log=lambda m: None)
    new = _tiny_bytes(seed=11)
    assert len(new) == len(tiny) and new != tiny
    server.files["unpinned.pt"] = new
    zoo.download(UNPINNED, log=lambda m: None)
    assert [r["range"] for r in server.requests] == [None, f"bytes={k}-", None]
    assert dest.read_bytes() == new and pin.read_text().split()[0] == _sha(new)


def test_foreign_part_is_never_resumed_or_pinned(tiny, server):
    dest, part, pin = _paths(UNPINNED)
    foreign = _tiny_bytes(seed=7)[: len(tiny) // 2]  # plausible bytes of another file (what the audit planted)
    part.parent.mkdir(parents=True)
    part.write_bytes(foreign)
    logs: list[str] = []
    zoo.download(UNPINNED, log=logs.append)
    assert [r["range"] for r in server.requests] == [None]  # restarted from 0, nothing appended
    assert dest.read_bytes() == tiny and pin.read_text().split()[0] == _sha(tiny)
    assert any("discarding" in m and "no record" in m for m in logs)

    # a sidecar copied from a real interruption, with the bytes under it replaced: the hash gives it away
    dest.unlink()
    pin.unlink()
    server.requests.clear()
    server.cut_after = len(tiny) // 2
    with pytest.raises(CheckpointError, match="resume"):
        zoo.download(UNPINNED, log=lambda m: None)
    part.write_bytes(foreign)  # same length, other bytes
    zoo.download(UNPINNED, log=logs.append)
    assert [r["range"] for r in server.requests] == [None, None]
    assert dest.read_bytes() == tiny and pin.read_text().split()[0] == _sha(tiny)
    assert any("bytes differ" in m for m in logs)


def test_part_longer_than_the_file_and_416(tiny, server):
    dest, part, pin = _paths(UNPINNED)
    url = server.url("unpinned.pt")
    longer = tiny + b"\0" * 5000  # e.g. a longer version of the file fetched before it changed
    for recorded_total in (None, len(longer)):
        _own_part(part, url, longer, total=recorded_total)
        server.requests.clear()
        logs: list[str] = []
        zoo.download(UNPINNED, log=logs.append)
        # the 416 says the file has len(tiny) bytes: the .part was deleted and fetched again, never renamed
        assert [r["range"] for r in server.requests] == [f"bytes={len(longer)}-", None]
        assert dest.read_bytes() == tiny and pin.read_text().split()[0] == _sha(tiny)
        assert any("nothing after byte" in m for m in logs)
        dest.unlink()
        pin.unlink()

    # a 416 without a total: unknown, so restarted too
    server.range_416 = "none"
    _own_part(part, url, tiny, total=len(tiny))
    server.requests.clear()
    zoo.download(UNPINNED, log=lambda m: None)
    assert [r["range"] for r in server.requests] == [f"bytes={len(tiny)}-", None] and dest.read_bytes() == tiny
    dest.unlink()
    pin.unlink()

    # a complete .part of our own (killed before the rename): the exact total accepts it without a refetch
    server.range_416 = "exact"
    _own_part(part, url, tiny, total=len(tiny))
    server.requests.clear()
    zoo.download(UNPINNED, log=lambda m: None)
    assert [r["range"] for r in server.requests] == [f"bytes={len(tiny)}-"]
    assert dest.read_bytes() == tiny and pin.read_text().split()[0] == _sha(tiny)


def test_complete_but_corrupt_part_is_deleted_not_pinned(tiny, server):
    """A .part of the right length whose bytes (ours, recorded) are junk: the load check refuses the pin."""
    dest, part, pin = _paths(UNPINNED)
    junk = b"\x01" * len(tiny)
    _own_part(part, server.url("unpinned.pt"), junk, total=len(tiny))
    with pytest.raises(CheckpointError, match="weights-only.*the bad file was deleted"):
        zoo.download(UNPINNED, log=lambda m: None)
    assert not dest.exists() and not pin.exists() and not part.exists()


# ------------------------------------------------------------------------------------ wrong sizes
def test_wrong_content_length_is_refused(tiny, server):
    dest, part, pin = _paths(UNPINNED)
    server.length_delta = 100  # announces more than it sends
    with pytest.raises(CheckpointError, match=f"incomplete: {len(tiny):,} of {len(tiny) + 100:,} bytes"):
        zoo.download(UNPINNED, log=lambda m: None)
    assert not dest.exists() and not pin.exists()

    server.length_delta = -100  # announces less: a truncated file of the announced size
    for p in (part, download.part_state_path(part)):
        p.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="the bad file was deleted"):
        zoo.download(UNPINNED, log=lambda m: None)
    assert not dest.exists() and not pin.exists() and not part.exists()

    # the published-MD5 file with the same lie: the MD5 refuses it
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        zoo.download(PINNED, log=lambda m: None)
    assert not _paths(PINNED)[0].exists()

    # no Content-Length at all: an unpinned file's completeness cannot be checked
    server.length_delta, server.omit_length = 0, True
    with pytest.raises(CheckpointError, match="no Content-Length"):
        zoo.download(UNPINNED, log=lambda m: None)
    assert not dest.exists() and not pin.exists()
    assert zoo.download(PINNED, log=lambda m: None).read_bytes() == tiny  # the MD5 covers it

    # a 206 whose Content-Length disagrees with its Content-Range: not a continuation, restarted from 0
    server.omit_length = False
    server.cut_after = 1000
    with pytest.raises(CheckpointError, match="resume"):
        zoo.download(UNPINNED, log=lambda m: None)
    server.length_delta = 7
    server.requests.clear()
    logs: list[str] = []
    with pytest.raises(CheckpointError):  # the fresh 200 lies as well
        zoo.download(UNPINNED, log=logs.append)
    assert server.requests[0]["range"] == "bytes=1000-" and server.requests[1]["range"] is None
    assert any("does not continue" in m for m in logs) and not dest.exists() and not pin.exists()


# ------------------------------------------------------------------------------------ concurrency
def test_two_concurrent_downloads_are_serialised(tiny, server):
    dest, part, pin = _paths(UNPINNED)
    server.delay = 0.02  # ~0.3 s for the whole file: the second caller arrives mid-transfer
    logs: list[str] = []
    results, errors = [], []

    def run():
        try:
            results.append(zoo.download(UNPINNED, log=logs.append))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    threads[0].start()
    deadline = time.monotonic() + 10
    while not server.requests and time.monotonic() < deadline:
        time.sleep(0.005)
    threads[1].start()
    for t in threads:
        t.join(30)
    assert not errors and results == [dest, dest]
    assert server.full_gets("unpinned.pt") == 1  # the second waited, then reused the verified file
    assert dest.read_bytes() == tiny and dest.stat().st_size == len(tiny)
    assert pin.read_text().split()[0] == _sha(tiny)
    assert any(f"by PID {os.getpid()}" in m and "waiting" in m for m in logs)


def test_lock_held_by_another_process_names_its_pid(tiny, server, tmp_path):
    dest, _, _ = _paths(UNPINNED)
    lock = download.lock_path(dest)
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.ftruncate(fd, 0); os.pwrite(fd, f'{os.getpid()}\\n'.encode(), 0)\n"
        "print('locked', flush=True); time.sleep(0.8)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        logs: list[str] = []
        start = time.monotonic()
        assert zoo.download(UNPINNED, log=logs.append).read_bytes() == tiny
        assert time.monotonic() - start >= 0.3  # it waited for the holder
        assert any(f"by PID {holder.pid}" in m and str(lock) in m for m in logs)
    finally:
        holder.wait(10)


# ---------------------------------------------------------------------------------- fetch_file
def test_fetch_file_checks_prefix_size_and_416(tiny, server, tmp_path):
    server.files["weights-abc.pth"] = tiny
    url = server.url("weights-abc.pth")
    dest = tmp_path / "hub" / "weights-abc.pth"
    with pytest.raises(CheckpointError, match="checksum mismatch.*deleted"):
        download.fetch_file(url, dest, sha256_prefix="00000000", log=lambda m: None)
    assert not dest.exists() and not download.part_path(dest).exists()
    _own_part(download.part_path(dest), url, tiny + b"junk")  # longer than the file
    server.requests.clear()
    download.fetch_file(url, dest, sha256_prefix=_sha(tiny)[:8], log=lambda m: None)
    assert dest.read_bytes() == tiny and [r["range"] for r in server.requests] == [f"bytes={len(tiny) + 4}-", None]


# --------------------------------------------------------------------------------- models verify
def _verify(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(["models", "verify", *args, "--no-forward"])
    return info.value.code, capsys.readouterr().out


def test_verify_random_or_zero_network_is_not_ok(tiny, server, capsys, tmp_path):
    dest, _, pin = _paths(UNPINNED)
    dest.parent.mkdir(parents=True)
    for label, data in (("random", _tiny_bytes(seed=3)), ("zero", _tiny_bytes(zero=True))):
        dest.write_bytes(data)  # right format, placed by hand: no published checksum, no pin
        code, out = _verify(capsys, UNPINNED)
        assert code == 1, label
        assert "all match" in out and f"{UNPINNED}: NOT VERIFIED" in out and f"{UNPINNED}: OK" not in out
        assert "does not exist" in out and not pin.exists()  # verify writes no pin
        # loading it pins it at first use; that pin still does not make it OK
        zoo.load_network(UNPINNED, log=lambda m: None)
        assert zoo.pin_source(dest) == "first-use"
        code, out = _verify(capsys, UNPINNED)
        assert code == 1 and "first use" in out and f"{UNPINNED}: OK" not in out
        pin.unlink()

    # the published-MD5 checkpoint: a random file passed with --checkpoint is not the published one
    own = tmp_path / "model.ckpt"
    own.write_bytes(_tiny_bytes(seed=5))
    code, out = _verify(capsys, PINNED, "--checkpoint", str(own))
    assert code == 1 and "is not the published" in out and hashlib.md5(own.read_bytes()).hexdigest() in out

    # the real thing, downloaded from the (loopback) official URL: OK; then altered: not OK
    dest.unlink()
    zoo.download(UNPINNED, log=lambda m: None)
    code, out = _verify(capsys, UNPINNED)
    assert code == 0 and f"{UNPINNED}: OK" in out and _sha(tiny) in out
    data = bytearray(dest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dest.write_bytes(bytes(data))
    code, out = _verify(capsys, UNPINNED)
    assert code == 1 and "differs from" in out
    zoo.download(PINNED, log=lambda m: None)
    code, out = _verify(capsys, PINNED)
    assert code == 0 and "published MD5" in out and f"{PINNED}: OK" in out


# ------------------------------------------------------------------------------ hash and load once
class Evil:
    def __reduce__(self):
        return (print, ("this should never run",))


def test_checkpoint_loads_the_bytes_it_hashed(tiny, server, monkeypatch, capsys):
    """The file is swapped for a pickle bomb right after it was read: the hashed bytes are what loads."""
    dest = zoo.download(UNPINNED, log=lambda m: None)
    good = dest.read_bytes()
    real = zoo.read_hashed

    def read_then_swap(path, *args, **kwargs):
        out = real(path, *args, **kwargs)
        buf = io.BytesIO()
        torch.save({"x": Evil()}, buf)
        Path(path).write_bytes(buf.getvalue())
        return out

    monkeypatch.setattr(zoo, "read_hashed", read_then_swap)
    seen = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        assert isinstance(f, io.BytesIO) and kwargs.get("weights_only") is True
        seen.append(_sha(f.getvalue()))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    net, path, algo, digest = zoo.load_checkpoint(UNPINNED, log=lambda m: None)
    assert algo == "sha256" and digest == _sha(good) and seen == [_sha(good)]
    assert "should never run" not in capsys.readouterr().out
    ref = zoo.build_arch("ddpm_unet", TINY)
    ref.load_state_dict(real_load(io.BytesIO(good), weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))
    # the next load reads the swapped file: refused by the pin, never unpickled
    monkeypatch.setattr(zoo, "read_hashed", real)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        zoo.load_checkpoint(UNPINNED, log=lambda m: None)


def test_no_weights_only_false_anywhere():
    pkg = Path(zoo.__file__).resolve().parents[1]
    bad = []
    for f in pkg.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "weights_only" and not (isinstance(kw.value, ast.Constant) and kw.value.value is True):
                        bad.append(f"{f.relative_to(pkg)}:{node.lineno}")
    assert not bad, bad
