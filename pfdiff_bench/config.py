"""Run configuration: YAML -> validated, fully-resolved dict (validated once, here, at the edge).

A config has five sections (see ``configs/*.yaml``)::

    name: toy
    model:    {type: analytic | ddpm | adm | ncsnpp | python, ..., quantize: auto | truncate | round}  # what predicts ε
    schedule: {type: linear | cosine | vp_linear | betas | alphas_cumprod, ...}
    sampler:  {name, convention, grid, order, method, pfdiff, eta, lower_order_final, t_start, t_end,
               variant, predict, final_corrector, ts_order}
    guidance: {classifier, scale, labels}
    sampling: {nfe, num_samples, batch_size, seed, seed_offset, device, shard_size}

Unknown keys and wrong types are refused with the key's dotted path and what is accepted. CLI
options override single keys (``override``) and are validated the same way.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import re

import yaml

from pfdiff_bench.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

_ANY_NUM = (int, float)
# section -> key -> (accepted types, default); a tuple of strings as "types" is a choice list
SCHEMA: dict[str, dict[str, tuple]] = {
    "model": {
        "type": (("analytic", "ddpm", "adm", "ncsnpp", "stable_diffusion", "python"), "analytic"),
        # python: "package.module:factory"; factory(**kwargs) returns eps(x, t, y=None) (model time t)
        "target": ((str, type(None)), None), "kwargs": ((dict, type(None)), None),
        # analytic
        "components": (int, 4), "shape": (list, [3, 8, 8]), "std": (_ANY_NUM, 0.1), "mean_scale": (_ANY_NUM, 0.6),
        "means_seed": (int, 0), "class_cond": (bool, False),
        # networks
        "checkpoint": ((str, type(None)), None), "checkpoint_path": ((str, type(None)), None),
        "image_size": ((int, type(None)), None), "num_classes": ((int, type(None)), None),
        "fp16": (("auto", True, False), "auto"),
        # the fast path (models/fastpath.py): precision auto = fp16 for ADM on CUDA (as the paper ran), else fp32;
        # an explicit precision wins over the older model.fp16 (true = fp16, false = fp32)
        "precision": (("auto", "fp32", "fp16", "bf16"), "auto"), "attention": (("sdpa", "einsum"), "sdpa"),
        "channels_last": (bool, False), "compile": (bool, False),
        "random_weights": (bool, False), "random_seed": (int, 0), "arch": ((dict, type(None)), None),
        # how samples become uint8 images: a property of the benchmark's codebase, not of the sampler
        "quantize": (("auto", "truncate", "round"), "auto"),
        # stable_diffusion: checkpoint = HF repo id, checkpoint_path = diffusers folder; prompts
        "captions": ((str, type(None)), None), "prompt": ((str, type(None)), None),
    },
    "schedule": {
        "type": (("linear", "cosine", "vp_linear", "betas", "alphas_cumprod", "ldm_linear"), "linear"),
        "num_steps": (int, 1000), "beta_start": (_ANY_NUM, 1e-4), "beta_end": (_ANY_NUM, 0.02),
        "beta_0": (_ANY_NUM, 0.1), "beta_1": (_ANY_NUM, 20.0), "label_scale": (_ANY_NUM, 999.0),
        "t_end": (_ANY_NUM, 1e-3), "values": ((list, type(None)), None),
        "linear_start": (_ANY_NUM, 0.00085), "linear_end": (_ANY_NUM, 0.012),  # ldm_linear (SD v1 config)
    },
    "sampler": {
        "name": (("ddim", "dpm-solver", "dpm-solver++", "unipc", "deis", "ipndm"), "ddim"),
        "convention": (("ddim", "guided", "dpm_solver", "deis", "ldm"), "ddim"),
        "grid": ((str, type(None)), None), "order": (int, 1),
        "method": (("singlestep_fixed", "singlestep", "multistep"), "singlestep_fixed"),
        "pfdiff": ((list, str, type(None)), None), "eta": (_ANY_NUM, 0.0), "lower_order_final": (bool, True),
        "t_start": ((float, int, type(None)), None), "t_end": ((float, int, type(None)), None),
        "clip_denoised": (bool, True), "float32_coefficients": (bool, True),
        # baselines (spec BASELINES.md): UniPC variant / prediction / final corrector, DEIS grid exponent
        "variant": (("bh1", "bh2"), "bh1"), "predict": (("x0", "eps"), "x0"), "final_corrector": (bool, False),
        "ts_order": ((float, int, type(None)), None),
    },
    "guidance": {
        "classifier": ((str, type(None)), None), "classifier_path": ((str, type(None)), None),
        "classifier_arch": ((dict, type(None)), None),
        "precision": (("fp32", "fp16", "bf16"), "fp32"),  # the classifier's own (official: fp32)
        "scale": (_ANY_NUM, 0.0), "labels": (("uniform", "none"), "none"),
    },
    "sampling": {
        "nfe": (int, 10), "num_samples": (int, 64), "batch_size": (int, 64), "seed": (int, 0),
        "device": (str, "auto"), "shard_size": (int, 1000),
        # sample i hashes index seed_offset + i (seeding.py): reproduce --seeds K puts range r at r * num_samples
        "seed_offset": (int, 0),
    },
}
TOP_KEYS = ("name", "description", *SCHEMA)

# dotted key -> (low, high, low_open, high_open): the accepted range of a number (None: unbounded).
# Checked with the type in ``_check``, so every config file and CLI option meets the same edge.
RANGES: dict[str, tuple] = {
    "model.components": (1, None, False, False), "model.std": (0, None, True, False),
    "model.mean_scale": (0, None, False, False), "model.means_seed": (0, None, False, False),
    "model.image_size": (1, None, False, False), "model.num_classes": (1, None, False, False),
    "model.random_seed": (0, None, False, False),
    "schedule.num_steps": (2, None, False, False),
    "schedule.beta_start": (0, 1, True, True), "schedule.beta_end": (0, 1, True, True),
    "schedule.beta_0": (0, None, True, False), "schedule.beta_1": (0, None, True, False),
    "schedule.label_scale": (0, None, True, False), "schedule.t_end": (0, 1, True, True),
    "sampler.order": (1, 4, False, False),  # 4: iPNDM; the per-solver limit is checked by samplers/plan.py
    "sampler.ts_order": (0, None, True, False), "sampler.eta": (0, None, False, False),
    "sampler.t_start": (0, 1, True, False), "sampler.t_end": (0, 1, True, True),
    "guidance.scale": (0, None, False, False),
    # upper bounds (issue 10 item 9): refused at the edge, before a grid or a shard list is allocated
    "sampling.nfe": (1, 10_000, False, False), "sampling.num_samples": (1, 10_000_000, False, False),
    "sampling.batch_size": (1, 1_000_000, False, False), "sampling.shard_size": (1, 10_000_000, False, False),
    "sampling.seed": (0, 2**63 - 1, False, False), "sampling.seed_offset": (0, None, False, False),
}


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the bare name of a bundled config (``toy``, ``imagenet64``, ...)."""
    p = Path(name_or_path)
    if p.exists():
        if not p.is_file():
            raise ConfigError(f"config {p} is a directory, not a YAML file")
        return p
    # not an existing path: a bare name, with or without .yaml/.yml, is a bundled config
    stem = p.stem if p.suffix in (".yaml", ".yml") else p.name
    if len(p.parts) == 1:
        cand = CONFIG_DIR / f"{stem}.yaml"
        if cand.is_file():
            return cand
    raise ConfigError(f"config file not found: {name_or_path!r} is not a file and not a bundled config; "
                      f"bundled: {', '.join(bundled_configs())}")


MAX_YAML_BYTES = 1 << 20  # configs and tables are a few KiB; a cap bounds what a file can make us parse


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases: nothing we ship needs them, and they make "billion laughs" bombs."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            ev = self.peek_event()
            raise ConfigError(f"YAML alias '*{ev.anchor}' at line {ev.start_mark.line + 1}: aliases/anchors are "
                              f"not accepted in configs or tables; write the values out")
        return super().compose_node(parent, index)


def load_yaml_file(path: Path) -> Any:
    """Parse a config/table file: at most MAX_YAML_BYTES, UTF-8, no aliases; one-line ConfigError otherwise."""
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {size} bytes; a config or table file may have at most {MAX_YAML_BYTES}")
        data = path.read_bytes()[:MAX_YAML_BYTES + 1]
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); configs and tables are UTF-8 YAML") from None
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:300]})") from None


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def check_name(value: Any, what: str, source: str) -> str:
    """A name that may become a directory name: 1-64 of [A-Za-z0-9._+-], not starting with '.' or '-'."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or ".." in value:
        raise ConfigError(f"{source}: '{what}' must be 1-64 characters of letters, digits and . _ + - (not starting "
                          f"with . or -, no '..'); got {value!r:.80}")
    return value


def load_config(name_or_path: str) -> dict:
    path = resolve_path(name_or_path)
    raw = load_yaml_file(path)
    if raw is None:  # an empty file would silently run every default
        raise ConfigError(f"{path}: the config is empty; start from a bundled one: {', '.join(bundled_configs())}")
    cfg = validate(raw, source=str(path))
    cfg.setdefault("name", path.stem)
    return cfg


def validate(raw: Any, source: str = "config") -> dict:
    """Check every key and type, fill defaults; returns a new dict."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"{source}: unknown key '{key}'{_suggest(key, TOP_KEYS)}; accepted: {', '.join(TOP_KEYS)}")
    out: dict = {k: raw[k] for k in ("name", "description") if k in raw}
    if "name" in out:
        check_name(out["name"], "name", source)
    if "description" in out and (not isinstance(out["description"], str) or len(out["description"]) > 2000
                                 or any(ord(ch) < 32 and ch not in "\n\t" for ch in out["description"])):
        raise ConfigError(f"{source}: 'description' must be text of at most 2000 characters without control "
                          f"characters")
    for section, keys in SCHEMA.items():
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"{source}: '{section}' must be a mapping")
        sec = {}
        for key, value in given.items():
            if key not in keys:
                raise ConfigError(f"{source}: unknown key '{section}.{key}'{_suggest(key, keys)}; "
                                  f"accepted: {', '.join(keys)}")
            sec[key] = _check(f"{section}.{key}", value, keys[key][0], source)
        for key, (_, default) in keys.items():
            sec.setdefault(key, copy.deepcopy(default))
        out[section] = sec
    _cross_checks(out, source)
    return out


def override(cfg: dict, dotted: str, value: Any) -> None:
    """Set ``section.key`` to value (from a CLI option), validated like a config entry."""
    if value is None:
        return
    section, key = dotted.split(".")
    cfg[section][key] = _check(dotted, value, SCHEMA[section][key][0], "option")
    _cross_checks(cfg, "option")


def _check(path: str, value: Any, accepted, source: str) -> Any:
    if isinstance(accepted, tuple) and accepted and all(not isinstance(a, type) for a in accepted):
        if value not in accepted:
            raise ConfigError(f"{source}: '{path}' = {value!r} is not accepted; accepted: "
                              f"{', '.join(map(str, accepted))}")
        return value
    types = accepted if isinstance(accepted, tuple) else (accepted,)
    if type(value) is bool and bool not in types:  # YAML true is not a number here
        raise ConfigError(f"{source}: '{path}' must be {_tname(types)}, got a boolean")
    if not isinstance(value, types):
        raise ConfigError(f"{source}: '{path}' must be {_tname(types)}, got {type(value).__name__} {value!r}")
    if path in RANGES and isinstance(value, (int, float)) and type(value) is not bool:
        _check_range(path, value, RANGES[path], source)
    if path == "model.shape":
        if not value or not all(type(v) is int and v >= 1 for v in value):
            raise ConfigError(f"{source}: 'model.shape' must be a non-empty list of positive integers, "
                              f"e.g. [3, 8, 8]; got {value!r}")
    if path == "schedule.values" and value is not None:
        if len(value) < 2 or not all(isinstance(v, (int, float)) and type(v) is not bool and 0 < v < 1
                                     for v in value):
            raise ConfigError(f"{source}: 'schedule.values' must be a list of at least 2 numbers in (0, 1)")
    return float(value) if types == _ANY_NUM else value


def _check_range(path: str, value, rng, source: str) -> None:
    low, high, low_open, high_open = rng
    bad = ((low is not None and (value <= low if low_open else value < low))
           or (high is not None and (value >= high if high_open else value > high)))
    if bad and high is None and not low_open:
        raise ConfigError(f"{source}: '{path}' must be at least {low} (got {value!r})")
    if bad:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        if low is not None and not low_open and value < low:
            raise ConfigError(f"{source}: '{path}' must be at least {low} (got {value!r}); accepted: {interval}")
        raise ConfigError(f"{source}: '{path}' = {value!r} is out of range; accepted: {interval}")


def _tname(types) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", bool: "true/false",
             type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _suggest(key: str, options) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


#: model.quantize "auto" per model type, as the codebase each benchmark comes from saves its samples
#: (issue 12 part 3): guided-diffusion (adm) ``((x+1)*127.5).clamp(0,255).to(uint8)`` truncates, as do
#: score_sde and ldm; ermongroup/ddim (its DDPM checkpoints) writes PNGs with torchvision ``save_image``,
#: which rounds. The analytic model follows the ddim codebase (toy outputs unchanged). Other types truncate.
# stable_diffusion: txt2img_save_img.py clamp((x+1)/2, 0, 1)·255 then astype(uint8), the same value as truncate
QUANTIZE_BY_MODEL = {"adm": "truncate", "ddpm": "round", "analytic": "round", "stable_diffusion": "truncate"}


def resolve_quantize(model: dict) -> str:
    q = model.get("quantize", "auto")
    return QUANTIZE_BY_MODEL.get(model.get("type"), "truncate") if q == "auto" else q


def _cross_checks(cfg: dict, source: str) -> None:
    cfg["model"]["quantize"] = resolve_quantize(cfg["model"])  # explicit in the manifest's config
    s = cfg["sampling"]
    for key in ("nfe", "num_samples", "batch_size", "shard_size"):
        if s[key] < 1:
            raise ConfigError(f"{source}: 'sampling.{key}' must be at least 1 (got {s[key]})")
    if cfg["guidance"]["scale"] < 0:
        raise ConfigError(f"{source}: 'guidance.scale' must be >= 0")
    m = cfg["model"]
    if m["type"] == "python" and (not m["target"] or ":" not in m["target"]):
        raise ConfigError(f"{source}: model type python needs 'model.target' = \"package.module:factory\" "
                          f"(got {m['target']!r})")
    sch = cfg["schedule"]
    if sch["type"] == "linear" and sch["beta_end"] < sch["beta_start"]:
        raise ConfigError(f"{source}: 'schedule.beta_end' ({sch['beta_end']}) must be >= 'schedule.beta_start' "
                          f"({sch['beta_start']})")


def parse_pfdiff(value) -> tuple[int, int] | None:
    """'2,1' / [2, 1] / 'none' -> (2, 1) / None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off", "")):
        return None
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        k, h = (int(v) for v in parts)
    except (ValueError, TypeError):
        raise ConfigError(f"--pfdiff expects K,H (e.g. 2,1) or none, got {value!r}") from None
    return k, h
