"""What widgets.EditingExplorer computes with, apart from the widget: the cache keys, the suggested edit, PSNR,
the progress counter over UNet calls, and reading an upload."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

UPLOAD_LIMIT = 20 * 2**20  # bytes


def suggest_edit(caption: str) -> str:
    """A first edit of a TinyWorld caption: its first colour word swapped for another (the caption if none)."""
    from lab.tinyworld.world import COLORS

    words = caption.split()
    for i, word in enumerate(words):
        if word in COLORS:
            other = next(c for c in ("green", "blue", "red", "yellow") if c not in words)
            return " ".join([*words[:i], other, *words[i + 1 :]])
    return caption


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (skimage.metrics.peak_signal_noise_ratio's)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@dataclass(frozen=True)
class InversionSpec:
    image: tuple  # ("seed", n) or ("upload", sha1)
    method: str
    num_inference_steps: int
    guidance_scale: float
    prompt: str


@dataclass(frozen=True)
class EditSpec:
    inversion: InversionSpec
    target_prompt: str
    edit: str
    cross_steps: float
    self_steps: float
    reweight: tuple  # () or (word, scale)
    local_blend: tuple  # words
    blend_threshold: float

    def arguments(self) -> dict:
        """lab.prompt_to_prompt's keyword arguments."""
        return dict(
            edit="auto" if self.edit == "reweight" else self.edit,
            cross_steps=self.cross_steps,
            self_steps=self.self_steps,
            reweight=dict([self.reweight]) if self.reweight else None,
            local_blend=list(self.local_blend) or None,
            blend_threshold=self.blend_threshold,
        )


class UNetCalls:
    """The widget's progress bar over the UNet's forward calls of a job (a plain torch hook, removed on exit)."""

    def __init__(self, pipe, progress, total: int):
        self.pipe, self.progress, self.total, self.done = pipe, progress, total, 0

    def __enter__(self):
        self.handle = self.pipe.unet.register_forward_pre_hook(self._count)
        return self

    def _count(self, module, args):
        self.done += 1
        self.progress(min(self.done, self.total), self.total, f"UNet call {self.done} of at most {self.total}")

    def __exit__(self, *exc):
        self.handle.remove()


def run_prompt_to_prompt(pipe, spec: EditSpec, inversion):
    import lab

    return lab.prompt_to_prompt(
        pipe, spec.inversion.prompt, spec.target_prompt, inversion=inversion, progress=False, **spec.arguments()
    )


def open_image(image) -> Image.Image:
    """An upload as a PIL image, its mode and size untouched (lab.inversion checks them)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise ValueError(f"an upload is PNG or JPEG bytes, a path, a PIL image or an array, not {type(image).__name__}")
    if len(image) > UPLOAD_LIMIT:
        raise ValueError(f"the file is {len(image) / 2**20:.1f} MB; at most {UPLOAD_LIMIT // 2**20} MB")
    try:
        picture = Image.open(io.BytesIO(bytes(image)))
        picture.load()
    except Exception:
        raise ValueError("the file is not an image PIL can read (upload a PNG or JPEG)") from None
    if picture.format not in ("PNG", "JPEG"):
        raise ValueError(f"upload a PNG or JPEG image, not {picture.format}")
    return picture
