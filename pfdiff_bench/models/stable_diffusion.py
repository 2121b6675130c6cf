"""Stable Diffusion v1.4 from a diffusers-format folder, behind the noise-prediction interface.

The folder is the ``CompVis/stable-diffusion-v1-4`` layout (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``; weights as safetensors or bin), found in the Hugging Face cache or given
as a path, and loaded offline (``local_files_only``) with diffusers' ``UNet2DConditionModel`` and
``AutoencoderKL`` and transformers' ``CLIPTextModel`` / ``CLIPTokenizer``. What the official script
(PFDiff ``scripts/txt2img_save_img.py``, PFDIFF_LDM.md) does and this module copies:

* text conditioning: CLIP tokens padded/truncated to 77, ``last_hidden_state`` (``FrozenCLIPEmbedder``);
  the empty prompt "" is the unconditional input; prompts are encoded once per batch;
* the UNet runs under ``torch.autocast`` in fp16 on CUDA (``--precision autocast``), fp32 on CPU;
* latents are decoded with ``vae.decode(z / 0.18215)``; images are ``clamp((x + 1)/2, 0, 1)·255``
  truncated to uint8 (``Image.fromarray(x.astype(np.uint8))``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from pfdiff_bench.errors import CheckpointError

REPO_ID = "CompVis/stable-diffusion-v1-4"
LATENT_SCALE = 0.18215  # first-stage scale factor of the SD v1 config
TEXT_LENGTH = 77        # FrozenCLIPEmbedder max_length
_CONFIGS = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer/vocab.json",
            "tokenizer/merges.txt", "scheduler/scheduler_config.json")
_WEIGHTS = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
            "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
            "text_encoder": ("model.safetensors", "pytorch_model.bin")}


def required_files() -> list[str]:
    return list(_CONFIGS) + [f"{sub}/{names[0]} (or {names[1]})" for sub, names in _WEIGHTS.items()]


def _missing(folder: Path) -> list[str]:
    miss = [f for f in _CONFIGS if not (folder / f).is_file()]
    for sub, names in _WEIGHTS.items():
        if not any((folder / sub / n).is_file() for n in names):
            miss.append(f"{sub}/{names[0]}")
    return miss


def _cache_snapshots(repo_id: str) -> list[Path]:
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    return sorted(root.glob("*"), key=lambda p: p.stat().st_mtime, reverse=True) if root.is_dir() else []


def _offline_message(repo_id: str, where: str) -> str:
    from huggingface_hub import constants

    return (f"Stable Diffusion weights not found ({where}): need the diffusers-format folder of {repo_id} "
            f"with {', '.join(required_files())}; download it once with `huggingface-cli download {repo_id}` "
            f"(cache {constants.HF_HUB_CACHE}) or pass the folder as model.checkpoint_path / --checkpoint")


def find_folder(path: Optional[str] = None, repo_id: str = REPO_ID) -> Path:
    """The complete model folder: ``path`` if given, else the newest complete snapshot in the HF cache."""
    if path:
        folder = Path(os.path.expanduser(path))
        miss = _missing(folder) if folder.is_dir() else ["the folder itself"]
        if miss:
            raise CheckpointError(_offline_message(repo_id, f"{folder} lacks {', '.join(miss[:3])}"))
        return folder
    for snap in _cache_snapshots(repo_id):
        if not _missing(snap):
            return snap
    raise CheckpointError(_offline_message(repo_id, "not in the Hugging Face cache"))


class StableDiffusion:
    """The three networks of SD v1 and the tokenizer, on one device."""

    def __init__(self, folder, device: torch.device, fp16: bool = False):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(folder)
        self.folder, self.device, self.fp16 = folder, torch.device(device), bool(fp16)
        try:
            kw = dict(local_files_only=True)
            self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
            self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
            self.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **kw)
            self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", **kw)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot load Stable Diffusion from {folder}: "
                                  f"{' '.join(str(exc).split())[:300]}") from None
        for net in (self.unet, self.vae, self.text_encoder):
            net.to(self.device).eval().requires_grad_(False)
        self.latent_channels = int(self.unet.config.in_channels)
        self.latent_size = int(self.unet.config.sample_size)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._empty: Optional[torch.Tensor] = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.latent_size * self.vae_factor, self.latent_size * self.vae_factor)

    def _autocast(self):
        if self.fp16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP ``last_hidden_state`` of the prompts, [B, 77, D] (``FrozenCLIPEmbedder.encode``)."""
        tok = self.tokenizer(list(prompts), truncation=True, max_length=TEXT_LENGTH,
                             padding="max_length", return_tensors="pt")
        with self._autocast():
            z = self.text_encoder(input_ids=tok.input_ids.to(self.device)).last_hidden_state
        return z

    def empty_prompt(self, batch: int) -> torch.Tensor:
        """The unconditional input: the encoding of "" (computed once), one row per sample."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty.expand(batch, *self._empty.shape[1:])

    @torch.no_grad()
    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """ε(x, t | text embedding), t the integer DDPM index (float tensor accepted)."""
        with self._autocast():
            # integer DDPM index (ldm) or DPM-Solver's fractional (t − 1/N)·1000, as the official wrappers pass it
            out = self.unet(x.to(self.device, torch.float32), t.to(self.device, torch.float32),
                            encoder_hidden_states=cond.to(self.device)).sample
        return out.to(device=x.device, dtype=x.dtype)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (``decode_first_stage``: 1/0.18215 scale)."""
        with self._autocast():
            x = self.vae.decode(z.to(self.device, torch.float32) / LATENT_SCALE).sample
        return x.float()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW -> uint8 NHWC as the official script saves: clamp((x+1)/2, 0, 1)·255, truncated."""
    return (torch.clamp((x + 1.0) / 2.0, 0.0, 1.0) * 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class SDEps:
    """NoisePredictor adapter: ``y`` is the text conditioning (CLIP embeddings, one row per sample)."""

    def __init__(self, sd: StableDiffusion):
        self.sd = sd

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if y is None:
            y = self.sd.empty_prompt(x.shape[0])
        return self.sd.eps(x, t, y)

    def __repr__(self) -> str:
        return f"SDEps({self.sd.folder})"
