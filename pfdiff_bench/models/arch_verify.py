"""Check our networks against the official-code architecture fixtures (``verify arch``).

A directory holds numerical fixtures ``*.pt`` (format ``pfdiff-arch-fixture/1``: small networks run
through the official classes, with their outputs and tolerances) and full-size layout manifests
``manifests/*.json`` (format ``pfdiff-arch-manifest/1``). Everything is driven by each file's own
``arch`` and ``config`` fields, so fixtures of other sizes and seeds work the same way. Every file
found is one case; a case that cannot be run is a failure, never a skip.

A checkpoint-file fixture (a ``checkpoint_file`` key naming a ScoreSDE ``.pth`` beside it) also runs
the zoo's checkpoint loader on that file: it must return exactly the fixture's ``state_dict`` (the EMA
weights plus the ``sigmas`` buffer, without the ``module.`` prefix), and the forward pass uses what the
loader returned. A manifest with ``ema_shadow_params_keys`` must list our ``named_parameters()`` order,
the order in which the official EMA list is copied into the model.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import torch

from pfdiff_bench.errors import ConfigError

__all__ = ["verify_arch", "check_fixture", "check_manifest", "default_arch_dir"]

FIXTURE_FORMAT = "pfdiff-arch-fixture/1"
MANIFEST_FORMAT = "pfdiff-arch-manifest/1"


def default_arch_dir() -> Path:
    """The fixtures bundled with the package (``pfdiff_bench/data/arch``)."""
    return Path(str(resources.files("pfdiff_bench") / "data" / "arch"))


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def check_fixture(path: Union[str, Path], attention: str = "einsum") -> Optional[str]:
    """Run one numerical fixture; return None on a match, else a one-line reason.

    ``attention``: the kernel of the network's attention modules (`models/attention.py`)."""
    from pfdiff_bench.models.fastpath import set_attention
    from pfdiff_bench.models.zoo import build_arch

    fx = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(fx, dict) or fx.get("format") != FIXTURE_FORMAT:
        return f"not a {FIXTURE_FORMAT} file"
    net = build_arch(fx["arch"], fx["config"], device="meta").eval()
    state_dict = fx["state_dict"]
    if fx.get("checkpoint_file"):
        state_dict, reason = _load_checkpoint_file(Path(path).parent / fx["checkpoint_file"], fx, net)
        if reason is not None:
            return reason
    net.load_state_dict({k: v.clone() for k, v in state_dict.items()}, strict=True, assign=True)
    set_attention(net, attention)
    n_params = sum(p.numel() for p in net.parameters())
    if "num_parameters" in fx and n_params != fx["num_parameters"]:
        return f"{n_params:,} parameters, fixture says {fx['num_parameters']:,}"
    inputs = fx["inputs"]
    with torch.no_grad():
        if inputs.get("y") is not None:
            out = net(inputs["x"], inputs["t"], inputs["y"])
        else:
            out = net(inputs["x"], inputs["t"])
    expected = fx["expected"]
    if out.shape != expected.shape:
        return f"output shape {list(out.shape)}, expected {list(expected.shape)}"
    atol, rtol = float(fx["atol"]), float(fx["rtol"])
    diff = (out.double() - expected.double()).abs()
    allowed = atol + rtol * expected.double().abs()
    if not torch.isfinite(out).all() or not bool((diff <= allowed).all()):
        worst = int(torch.argmax(diff - allowed))
        return (f"output differs: max |out - expected| = {diff.max().item():.3g} "
                f"(worst element {worst}: {diff.flatten()[worst].item():.3g} > allowed "
                f"{allowed.flatten()[worst].item():.3g}; atol {atol:g}, rtol {rtol:g})")
    return None


def _load_checkpoint_file(ckpt: Path, fx: dict, net: torch.nn.Module) -> tuple[dict, Optional[str]]:
    """Our loader on the fixture's checkpoint file; (state dict, None) when it returns the fixture's weights."""
    from pfdiff_bench.models.zoo import file_digest, load_state_dict_file

    if not ckpt.is_file():
        return {}, f"checkpoint file {ckpt.name} (named by the fixture) is missing"
    want = fx.get("checkpoint_sha256")
    if want and file_digest(ckpt, "sha256") != want:
        return {}, f"checkpoint file {ckpt.name} has another SHA-256 than the fixture records"
    got = load_state_dict_file(ckpt, buffers=[k for k, _ in net.named_buffers()])
    expected = fx["state_dict"]
    if list(got) != list(expected):
        missing = [k for k in expected if k not in got]
        extra = [k for k in got if k not in expected]
        return {}, (f"checkpoint loader returned other keys than the fixture ({len(missing)} missing, "
                    f"{len(extra)} extra, or another order)")
    differ = [k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])]
    if differ:
        return {}, (f"checkpoint loader returned other values than the fixture's (EMA) weights for {len(differ)} "
                    f"tensors (e.g. {differ[0]})")
    return got, None


def check_manifest(path: Union[str, Path]) -> Optional[str]:
    """Compare a full-size layout manifest with our constructor; None on a match, else a reason."""
    from pfdiff_bench.models.zoo import build_arch

    with open(path) as f:
        m = json.load(f)
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        return f"not a {MANIFEST_FORMAT} file"
    net = build_arch(m["arch"], m["config"], device="meta")  # layout only: no memory, no init
    ours = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in net.state_dict().items()]
    theirs = [[str(k), [int(s) for s in shape], str(dt)] for k, shape, dt in m["state_dict"]]
    problems = []
    if ours != theirs:
        our_keys, their_keys = [e[0] for e in ours], [e[0] for e in theirs]
        missing = [k for k in their_keys if k not in set(our_keys)]
        extra = [k for k in our_keys if k not in set(their_keys)]
        if missing:
            problems.append(f"{len(missing)} keys missing from ours (e.g. {', '.join(missing[:3])})")
        if extra:
            problems.append(f"{len(extra)} extra keys in ours (e.g. {', '.join(extra[:3])})")
        their_map = {e[0]: e for e in theirs}
        diff = [f"{e[0]}: ours {e[1]} {e[2]} vs {their_map[e[0]][1]} {their_map[e[0]][2]}"
                for e in ours if e[0] in their_map and e[1:] != their_map[e[0]][1:]]
        if diff:
            problems.append(f"{len(diff)} shape/dtype mismatches ({'; '.join(diff[:3])})")
        if not (missing or extra or diff):
            first = next(i for i, (a, b) in enumerate(zip(our_keys, their_keys)) if a != b)
            problems.append(f"key order differs from position {first} ({our_keys[first]} vs {their_keys[first]})")
    n_params = sum(p.numel() for p in net.parameters())
    if n_params != m.get("num_parameters"):
        problems.append(f"{n_params:,} parameters, manifest says {m.get('num_parameters')}")
    if "num_state_dict_keys" in m and len(ours) != m["num_state_dict_keys"]:
        problems.append(f"{len(ours)} state-dict keys, manifest says {m['num_state_dict_keys']}")
    if "ema_shadow_params_keys" in m and [k for k, _ in net.named_parameters()] != list(m["ema_shadow_params_keys"]):
        problems.append("our parameter order differs from ema_shadow_params_keys (the EMA list would be misassigned)")
    return "; ".join(problems) or None


def verify_arch(directory: Union[str, Path, None] = None, attention: str = "einsum") -> tuple[int, int, list[str]]:
    """Check every fixture in ``directory`` and every manifest in ``directory/manifests``.

    Returns ``(matched, total, failure_lines)``. Default directory: the bundled fixtures. ``attention``:
    the attention kernel of the numerical fixtures' networks (``einsum`` or ``sdpa``).
    """
    directory = Path(directory) if directory is not None else default_arch_dir()
    if not directory.is_dir():
        raise ConfigError(f"fixture directory not found: {directory}")
    cases = [(p, lambda p, a=attention: check_fixture(p, a)) for p in sorted(directory.glob("*.pt"))]
    cases += [(p, check_manifest) for p in sorted((directory / "manifests").glob("*.json"))]
    if not cases:
        return 0, 1, [f"FAIL {directory}: no fixtures (*.pt) or manifests (manifests/*.json) found"]
    failures = []
    for path, check in cases:
        label = path.relative_to(directory).as_posix()
        try:
            reason = check(path)
        except Exception as exc:  # anything that cannot be run is a failure, reported on one line
            reason = f"cannot run: {_short(exc)}"
        if reason is not None:
            failures.append(f"FAIL {label}: {reason}")
    return len(cases) - len(failures), len(cases), failures
