"""Exports of a run: the ADM-evaluator npz (``arr_0`` uint8 NHWC), one PNG per sample, image grids.

Every file is written atomically and never through a symlink planted at its name (files.atomic_writer:
an O_EXCL|O_NOFOLLOW temporary in the same folder, then ``os.replace``); a PNG folder that is itself a
symlink is refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from pfdiff_bench.errors import PFDiffError
from pfdiff_bench.files import atomic_writer
from pfdiff_bench.sampling.rundir import (_require_complete, iter_image_batches, load_run,
                                          read_manifest)


def save_image_grid(images: torch.Tensor, path, nrow: Optional[int] = None) -> Path:
    """Write uint8 NHWC ``images`` as one grid PNG (torchvision make_grid)."""
    from torchvision.utils import make_grid

    path = Path(path)
    x = images.permute(0, 3, 1, 2)
    grid = make_grid(x, nrow=nrow or max(1, int(math.ceil(math.sqrt(x.shape[0])))), padding=2, pad_value=0)
    if images.shape[-1] == 1:
        grid = grid[:1]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_png(grid, path)
    except (OSError, RuntimeError) as exc:
        raise PFDiffError(f"cannot write the grid image {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    return path


def _write_png(chw: torch.Tensor, path: Path) -> None:
    """uint8 CHW -> PNG at ``path``, atomically and never through a symlink planted there."""
    from torchvision.io import encode_png

    data = encode_png(chw.contiguous()).numpy().tobytes()
    with atomic_writer(path) as f:
        f.write(data)


def first_images(run_dir, count: int = 64) -> torch.Tensor:
    out, have = [], 0
    for x, _ in iter_image_batches(run_dir, batch_size=count, require_complete=False):
        out.append(x)
        have += x.shape[0]
        if have >= count:
            break
    if not out:
        raise PFDiffError(f"run {run_dir} has no samples yet")
    return torch.cat(out)[:count]


def export_npz(run_dir, out_path, raw: bool = False, png_dir=None) -> dict:
    """Write ``arr_0`` (uint8 NHWC, index order), ``arr_1`` (labels, class-conditional runs), with
    ``raw`` the stored float arrays (``samples``, ``x_T``); with ``png_dir`` one PNG per sample."""
    import numpy as np

    run_dir = Path(run_dir)
    man = read_manifest(run_dir)
    _require_complete(run_dir, man)
    data = load_run(run_dir)
    arrays = {}
    if data["images"] is not None:
        arrays["arr_0"] = data["images"].numpy()
        if data["labels"] is not None:
            arrays["arr_1"] = data["labels"].numpy()
    elif not raw:
        raise PFDiffError(f"run {run_dir} stores no images (sample shape {man.get('sample_shape')}); "
                          f"use --raw to export the float samples")
    if raw:
        for key in ("samples", "x_T"):
            if data[key] is not None:
                arrays[key] = data[key].numpy()
        if data["labels"] is not None:
            arrays.setdefault("labels", data["labels"].numpy())
        arrays["indices"] = data["indices"].numpy()
    out_path = Path(out_path)
    if png_dir is not None:
        if data["images"] is None:
            raise PFDiffError(f"run {run_dir} stores no images to write as PNG")
        if Path(png_dir).is_symlink():
            raise PFDiffError(f"the PNG folder {png_dir} is a symbolic link; refusing to write through it (pass a "
                              f"real folder)")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(out_path) as f:  # np.savez on a file object: no ".npz" is appended
            np.savez(f, **arrays)
    except OSError as exc:
        raise PFDiffError(f"cannot write {out_path}: {exc.strerror or exc}") from None
    if png_dir is not None:
        png_dir = Path(png_dir)
        width = max(6, len(str(int(man["num_samples"]) - 1)))
        try:
            png_dir.mkdir(parents=True, exist_ok=True)
            if png_dir.is_symlink():  # planted between the check above and now
                raise PFDiffError(f"the PNG folder {png_dir} is a symbolic link; refusing to write through it")
            for i, img in zip(data["indices"].tolist(), data["images"]):
                _write_png(img.permute(2, 0, 1), png_dir / f"{i:0{width}d}.png")
        except (OSError, RuntimeError) as exc:
            raise PFDiffError(f"cannot write PNGs into {png_dir}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    return {k: tuple(v.shape) for k, v in arrays.items()}
