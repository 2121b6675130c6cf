"""Text prompts of the Stable-Diffusion protocol: COCO-2014 validation captions (PFDiff's SD FID runs).

Accepted files: the official ``captions_val2014.json`` (``{"annotations": [{"caption": ...}, ...]}``),
``captions_val2014_30K_samples.json`` (the same ``annotations`` layout, a 30K subset), or a JSON list
of strings / of objects with a ``caption``. The protocol takes the first ``limit`` (10,000) captions in
file order, lower-cased; caption i is the prompt of sample i (whose seed is per sample, so a sample
does not depend on the batch size, unlike the official script's single global seed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pfdiff_bench.errors import ConfigError

PROTOCOL_LIMIT = 10_000
PROTOCOL = ("COCO-2014 val captions (captions_val2014.json or captions_val2014_30K_samples.json), "
            "first 10,000 in file order, lower-cased; caption i -> sample i, per-sample seeds")


def load_captions(path, limit: Optional[int] = PROTOCOL_LIMIT) -> list[str]:
    """The first ``limit`` captions of ``path`` in file order, lower-cased."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the captions file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"captions file {path} is not JSON ({exc})") from None
    items = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ConfigError(f"captions file {path}: expected {{'annotations': [{{'caption': ...}}]}} or a JSON list")
    out = []
    for item in items[: limit or None]:
        cap = item.get("caption") if isinstance(item, dict) else item
        if not isinstance(cap, str):
            raise ConfigError(f"captions file {path}: entry {len(out)} has no caption string")
        out.append(cap.lower())
    if not out:
        raise ConfigError(f"captions file {path} holds no captions")
    return out


class Prompts:
    """Prompt of sample i: caption i of a captions file, or one fixed prompt for every sample."""

    def __init__(self, captions: Optional[list[str]] = None, prompt: Optional[str] = None):
        if captions is None and prompt is None:
            raise ConfigError("Stable Diffusion needs model.captions (a COCO captions file) or model.prompt")
        self.captions, self.prompt = captions, prompt

    def __len__(self) -> int:
        return len(self.captions) if self.captions is not None else 1 << 62

    def __getitem__(self, i: int) -> str:
        return self.captions[i] if self.captions is not None else self.prompt
