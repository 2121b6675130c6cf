"""Checkpoint zoo: full-size round trips, checksums, safe loading, offline and resumable downloads.

No test sends network traffic: `urllib.request.urlopen` is replaced in every test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from pfdiff_bench.cli import main
from pfdiff_bench.errors import CheckpointError, ConfigError
from pfdiff_bench.models import zoo
from pfdiff_bench.models.adapters import ADMClassifierGrad, ADMEps, DDPMEps


@pytest.fixture(autouse=True)
def no_network(offline_home):
    """Every test here runs offline with a private cache (conftest.offline_home)."""


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _set_spec(monkeypatch, name: str, **changes) -> zoo.CheckpointSpec:
    spec = dataclasses.replace(zoo.CHECKPOINTS[name], **changes)
    monkeypatch.setitem(zoo.CHECKPOINTS, name, spec)
    return spec


def _forward(net, arch: str, size: int) -> torch.Tensor:
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([321.0])
    with torch.no_grad():
        if arch == "adm_unet":
            return net(x, t, torch.tensor([7]))
        return net(x, t)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Full-size networks with random weights saved in the official format, built once each."""
    root = tmp_path_factory.mktemp("official")
    cache: dict[str, tuple[Path, torch.Tensor]] = {}

    def get(name: str) -> tuple[Path, torch.Tensor]:
        if name not in cache:
            spec = zoo.CHECKPOINTS[name]
            torch.manual_seed(0)
            net = zoo.build_network(name)
            assert sum(p.numel() for p in net.parameters()) == spec.num_parameters
            path = root / Path(spec.filename).name
            torch.save(net.state_dict(), path)  # what pytorch_diffusion / guided-diffusion wrote
            cache[name] = (path, _forward(net, spec.arch, spec.config["image_size"]))
            del net
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["ema_cifar10", pytest.param("ema_lsun_bedroom", marks=pytest.mark.slow)])
def test_ddpm_full_size_roundtrip_md5(name, saved, monkeypatch):
    path, expected_out = saved(name)
    _set_spec(monkeypatch, name, md5=_md5(path))  # our random file stands in for the published one
    logs = []
    net, used, algo, digest = zoo.load_checkpoint(name, checkpoint=path, log=logs.append)
    assert used == path and algo == "md5" and digest == _md5(path)
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    size = zoo.CHECKPOINTS[name].config["image_size"]
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    out = DDPMEps(net)(x.double(), torch.tensor(321.0))  # the adapter: float64 in, float64 out
    assert out.dtype == torch.float64 and torch.equal(out.float(), expected_out)


def test_adm_full_size_roundtrip_pins_sha256(saved):
    path, expected_out = saved("adm_imagenet64")
    logs: list[str] = []
    net = zoo.load_network("adm_imagenet64", checkpoint=path, log=logs.append)
    pin = path.with_name(path.name + ".sha256")
    sha = pin.read_text().split()[0]
    assert len(sha) == 64 and any("no published checksum" in m and sha in m and str(pin) in m for m in logs)
    out = _forward(net, "adm_unet", 64)
    assert out.shape == (1, 6, 64, 64) and torch.equal(out, expected_out)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ADMEps(net)(x, torch.tensor([321.0]), torch.tensor([7])), expected_out[:, :3])
    del net
    # later: the file is checked against the pin (an independent SHA-256 of the file)
    with open(path, "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == sha
    logs.clear()
    assert zoo.verify_checksum("adm_imagenet64", path, log=logs.append) == ("sha256", sha) and not logs


def test_classifier_from_cache_pin_then_altered_and_truncated(saved, monkeypatch):
    src, expected_logits = saved("adm_classifier64")
    dest = zoo.cache_path("adm_classifier64")
    assert dest == zoo.home_dir() / "checkpoints" / "64x64_classifier.pt"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(src.read_bytes())
    logs: list[str] = []
    grad = zoo.classifier_grad("adm_classifier64", log=logs.append)  # cache copy, no download needed
    assert isinstance(grad, ADMClassifierGrad)
    assert torch.equal(_forward(grad.classifier, "adm_classifier", 64), expected_logits)
    g = grad(torch.randn(1, 3, 64, 64), torch.tensor([10.0]), torch.tensor([3]))
    assert g.shape == (1, 3, 64, 64) and torch.isfinite(g).all() and g.abs().sum() > 0
    pinned = dest.with_name(dest.name + ".sha256").read_text().split()[0]
    assert any("pinned" in m for m in logs)

    data = bytearray(dest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    dest.write_bytes(bytes(data))
    altered = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(CheckpointError) as err:
        zoo.load_network("adm_classifier64", log=logs.append)
    msg = str(err.value)
    assert str(dest) in msg and pinned in msg and altered in msg

    dest.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(CheckpointError) as err:
        zoo.load_network("adm_classifier64", log=logs.append)
    assert str(dest) in str(err.value) and pinned in str(err.value)

    # without a pin, a truncated file is still refused (too small for the parameters)
    dest.with_name(dest.name + ".sha256").unlink()
    with pytest.raises(CheckpointError, match="truncated"):
        zoo.load_network("adm_classifier64", log=logs.append)
    assert not dest.with_name(dest.name + ".sha256").exists()


def test_truncated_ddpm_file_fails_md5(saved, monkeypatch, tmp_path):
    path, _ = saved("ema_cifar10")
    good = _md5(path)
    _set_spec(monkeypatch, "ema_cifar10", md5=good)
    cut = tmp_path / "model-790000.ckpt"
    cut.write_bytes(path.read_bytes()[:1_000_000])
    with pytest.raises(CheckpointError) as err:
        zoo.load_network("ema_cifar10", checkpoint=cut)
    msg = str(err.value)
    assert str(cut) in msg and good in msg and _md5(cut) in msg
    # the published MD5 is what a real download is checked against
    assert zoo.get_spec("cifar10").md5 == "82ed3067fd1002f5cf4c339fb80c4669"


def test_wrong_network_state_dict_is_summarised(saved):
    path, _ = saved("adm_classifier64")
    with pytest.raises(CheckpointError) as err:
        zoo.load_network("adm_imagenet64", checkpoint=path, verify=False)
    msg = str(err.value)
    assert str(path) in msg and "missing keys" in msg and "unexpected keys" in msg
    assert re.search(r"\d+ missing keys \(.+\), \d+ unexpected keys \(.+\), \d+ shape mismatches", msg), msg
    assert "label_emb.weight" in msg and "expected [768, 192]" in msg
    assert "looks like a checkpoint for adm_classifier64 (adm_classifier)" in msg  # recognised as the classifier
    # the same for an in-memory state dict given as the other DDPM resolution
    sd = zoo.build_network("ema_lsun_church", device="meta").state_dict()
    with pytest.raises(CheckpointError, match=r"missing keys.*unexpected keys.*shape mismatches.*ema_lsun"):
        zoo.check_state_dict("ema_cifar10", sd)


class Evil:
    def __reduce__(self):
        return (print, ("this should never run",))


def test_non_tensor_pickle_is_refused(tmp_path, capsys):
    bad = tmp_path / "evil.pt"
    torch.save({"conv_in.weight": torch.zeros(1), "payload": Evil()}, bad)
    with pytest.raises(CheckpointError) as err:
        zoo.load_state_dict_file(bad)
    assert str(bad) in str(err.value) and "weights-only" in str(err.value)
    with pytest.raises(CheckpointError, match="evil.pt"):
        zoo.load_network("ema_cifar10", checkpoint=bad, verify=False)
    assert "should never run" not in capsys.readouterr().out
    plain = tmp_path / "training_state.pt"
    torch.save({"step": 3, "weights": [torch.zeros(2)]}, plain)  # loads weights-only but is no state dict
    with pytest.raises(CheckpointError, match="not a state dict"):
        zoo.load_state_dict_file(plain)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"module.a": torch.ones(1)}, wrapped)
    assert list(zoo.load_state_dict_file(wrapped)) == ["a"]


def test_offline_download_fails_fast_with_instructions(monkeypatch, capsys):
    calls = []

    def offline(request, timeout=None):
        calls.append((request.full_url, timeout))
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    spec = zoo.get_spec("ema_lsun_church")
    dest = zoo.cache_path("ema_lsun_church")
    start = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        zoo.download("ema_lsun_church")
    assert time.monotonic() - start < 2
    msg = str(err.value)
    assert spec.url in msg and "model-4432000.ckpt" in msg and str(dest) in msg
    assert calls == [(spec.url, zoo.CONNECT_TIMEOUT_S)] and zoo.CONNECT_TIMEOUT_S <= 15
    assert not dest.exists()
    # loading a missing checkpoint tries the download and gives the same instructions
    with pytest.raises(CheckpointError, match="place the file"):
        zoo.load_network("adm_imagenet64")
    # through the CLI: one line, exit status 2
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "download", "adm_classifier64"])
    assert exit_info.value.code == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: cannot download adm_classifier64")
    assert zoo.get_spec("adm_classifier64").url in err_lines[0]
    assert str(zoo.cache_path("adm_classifier64")) in err_lines[0]
    # without download the error says where the file is expected
    with pytest.raises(CheckpointError, match="not in the cache"):
        zoo.load_network("ema_cifar10", download=False)


class FakeResponse(io.BytesIO):
    def __init__(self, body: bytes, status: int, headers: dict, fail_after: int | None = None):
        super().__init__(body)
        self.status = status
        self.headers = headers
        self.fail_after = fail_after

    def getcode(self):
        return self.status

    def read(self, n=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise TimeoutError("timed out")
        if self.fail_after is not None and n > 0:
            n = min(n, self.fail_after - self.tell())
        return super().read(n)


class FakeServer:
    """Serves ``payload`` with HTTP Range support; the first response dies after ``cut`` bytes."""

    def __init__(self, payload: bytes, cut: int | None = None, ranges: bool = True):
        self.payload, self.cut, self.ranges = payload, cut, ranges
        self.requests: list[dict] = []

    def __call__(self, request, timeout=None):
        rng = request.get_header("Range")
        self.requests.append({"url": request.full_url, "range": rng, "timeout": timeout})
        cut, self.cut = self.cut, None
        if rng and self.ranges:
            start = int(rng.split("=")[1].rstrip("-"))
            body = self.payload[start:]
            headers = {"Content-Length": str(len(body)),
                       "Content-Range": f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}"}
            return FakeResponse(body, 206, headers, cut)
        return FakeResponse(self.payload, 200, {"Content-Length": str(len(self.payload))}, cut)


def test_download_resumes_partial_file(monkeypatch):
    payload = torch.randint(0, 256, (3_500_000,), dtype=torch.uint8).numpy().tobytes()
    spec = _set_spec(monkeypatch, "ema_cifar10", md5=hashlib.md5(payload).hexdigest())
    server = FakeServer(payload, cut=1_200_000)
    monkeypatch.setattr(urllib.request, "urlopen", server)
    dest = zoo.cache_path("ema_cifar10")
    part = dest.with_name(dest.name + ".part")

    with pytest.raises(CheckpointError, match="resume"):
        zoo.download("ema_cifar10", log=lambda m: None)
    assert not dest.exists() and part.stat().st_size == 1_200_000  # never a truncated final file

    logs: list[str] = []
    assert zoo.download("ema_cifar10", log=logs.append) == dest
    assert dest.read_bytes() == payload and not part.exists()
    assert [r["range"] for r in server.requests] == [None, "bytes=1200000-"]
    assert all(r["url"] == spec.url for r in server.requests)
    assert any("resuming" in m for m in logs)
    # a second call reuses the verified file without a request; --force fetches again
    assert zoo.download("ema_cifar10", log=logs.append) == dest and len(server.requests) == 2
    zoo.download("ema_cifar10", force=True, log=logs.append)
    assert len(server.requests) == 3 and server.requests[-1]["range"] is None


def test_download_restart_when_server_ignores_range_and_bad_checksum(monkeypatch):
    payload = bytes(range(256)) * 4000
    _set_spec(monkeypatch, "ema_cifar10", md5=hashlib.md5(payload).hexdigest())
    dest = zoo.cache_path("ema_cifar10")
    part = dest.with_name(dest.name + ".part")
    monkeypatch.setattr(urllib.request, "urlopen", FakeServer(payload, cut=1000))  # leaves our own 1000 bytes
    with pytest.raises(CheckpointError, match="resume"):
        zoo.download("ema_cifar10", log=lambda m: None)
    assert part.stat().st_size == 1000
    server = FakeServer(payload, ranges=False)
    monkeypatch.setattr(urllib.request, "urlopen", server)
    zoo.download("ema_cifar10", log=lambda m: None)
    assert dest.read_bytes() == payload and server.requests[0]["range"] == "bytes=1000-"

    # corrupt bytes from the server: checksum error, no final file, the bad .part removed
    monkeypatch.setattr(urllib.request, "urlopen", FakeServer(payload[:-1] + b"\x00"))
    with pytest.raises(CheckpointError) as err:
        zoo.download("ema_cifar10", force=True, log=lambda m: None)
    assert "checksum mismatch" in str(err.value) and hashlib.md5(payload).hexdigest() in str(err.value)
    assert not dest.exists() and not part.exists()


def test_cli_list_and_verify(saved, monkeypatch, capsys):
    path, _ = saved("ema_cifar10")
    _set_spec(monkeypatch, "ema_cifar10", md5=_md5(path))
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "list"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("ema_cifar10", "ema_lsun_bedroom", "ema_lsun_church", "adm_imagenet64", "adm_classifier64",
                 "cifar10", "lsun_bedroom", "lsun_church"):
        assert f"\n{name} " in out
    assert "missing" in out and str(zoo.home_dir()) in out

    with pytest.raises(SystemExit) as exit_info:
        main(["models", "verify", "ema_cifar10", "--checkpoint", str(path)])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "md5" in out and "35,746,307 parameters" in out and "finite" in out and "ema_cifar10: OK" in out

    with pytest.raises(SystemExit) as exit_info:
        main(["models", "verify", "no_such_model"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: unknown checkpoint 'no_such_model'")
    for cmd in (["models", "--help"], ["models", "download", "--help"], ["models", "verify", "--help"],
                ["models", "list", "--help"], ["verify", "arch", "--help"]):
        with pytest.raises(SystemExit):
            main(cmd)
        assert "pfdiff-bench " in capsys.readouterr().out


def test_fp16_flag(saved, monkeypatch):
    path, _ = saved("ema_cifar10")
    with pytest.raises(ConfigError, match="fp16"):
        zoo.load_network("ema_cifar10", checkpoint=path, fp16=True, verify=False)
    with pytest.raises(ConfigError):
        zoo.eps_model("adm_classifier64")
    with pytest.raises(ConfigError, match="unknown checkpoint"):
        zoo.get_spec("imagenet128")
