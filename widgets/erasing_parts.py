"""What widgets.ErasingExplorer computes with, apart from the widget: the held-out prompts and the preserved concepts
a concept gets by default, the judge's reading as text, the cache keys, the progress counter over training
iterations and denoising steps, and an erasure's weights written back into a pipeline."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch


def _world():
    from lab.tinyworld.world import COLORS, SHAPES, TEXTURES

    return list(SHAPES), list(COLORS), [t for t in TEXTURES if t != "plain"]


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def held_out_prompts(concept: str) -> list[str]:
    """Two prompts that name the concept and two that do not, in TinyWorld's words (prompts the erasure never saw).

    A shape ("star"): "a red star", "a large blue star", then two other shapes in other colours; a colour ("red"):
    that colour on a circle and on a square, then other colours on the same shapes; anything else: "a <concept>",
    "a red <concept>", then "a green circle" and "a yellow square"."""
    shapes, colors, _ = _world()
    concept = concept.strip().lower()
    if concept in shapes:
        others = [s for s in ("circle", "square", "triangle") if s != concept][:2]
        return [f"a red {concept}", f"a large blue {concept}", f"a green {others[0]}", f"a yellow {others[1]}"]
    if concept in colors:
        others = [c for c in ("green", "yellow", "blue") if c != concept][:2]
        return [f"a {concept} circle", f"a large {concept} square", f"a {others[0]} circle", f"a {others[1]} square"]
    return [f"a {concept}", f"a red {concept}", "a green circle", "a yellow square"]


def default_preserve(concept: str) -> list[str]:
    """What UCE preserves by default: for a TinyWorld shape the five other shapes (lab.uce's docstring: preserving
    them makes the erasure itself stronger, 7 of 8 stars before, 1 after), for a colour the other colours; else none."""
    shapes, colors, _ = _world()
    concept = concept.strip().lower()
    for group in (shapes, colors):
        if concept in group:
            return [word for word in group if word != concept]
    return []


def names_concept(prompt: str, concept: str) -> bool:
    """Whether the prompt names the concept: every word of the concept is a word of the prompt."""
    wanted = words_of(concept)
    return bool(wanted) and set(wanted) <= set(words_of(prompt))


def describe(detection) -> str:
    """A judge's Detection as words: "large red star", "small striped blue circle"."""
    texture = "" if detection.texture == "plain" else f"{detection.texture} "
    return f"{detection.size_label} {texture}{detection.color} {detection.shape}"


def reading_text(reading) -> str:
    """The judge's reading of an image as one line: its objects, or "nothing"."""
    return ", ".join(describe(d) for d in reading.objects) or "nothing"


def concept_seen(reading, concept: str) -> bool | None:
    """Whether the judge reads the concept in the image: a shape, colour, texture or size word among its objects;
    None when the concept is not a word the judge reads (it then says nothing about it)."""
    shapes, colors, textures = _world()
    word = concept.strip().lower()
    for attribute, group in (("shape", shapes), ("color", colors), ("texture", textures)):
        if word in group:
            return any(getattr(d, attribute) == word for d in reading.objects)
    if word in ("large", "small"):
        return any(d.size_label == word for d in reading.objects)
    return None


def comma_list(text: str) -> list[str]:
    return [word.strip() for word in text.split(",") if word.strip()]


@dataclass(frozen=True)
class EraseSpec:
    """One erasure: what lab.uce.erase / lab.esd.erase is called with (the cache key of its weights)."""

    method: str  # "uce" | "esd_x" | "esd_u"
    concept: str
    preserve: tuple  # UCE: the preserved concepts; () for ESD
    guide: str  # UCE: what the concept should give instead ("": nothing)
    iterations: int  # ESD's; 0 for UCE
    lr: float
    eta: float

    def arguments(self) -> dict:
        """The keyword arguments of lab's function for this method."""
        if self.method == "uce":
            return dict(preserve=list(self.preserve) or None, guide=self.guide or None)
        return dict(method=self.method.removeprefix("esd_"), iterations=self.iterations, lr=self.lr, eta=self.eta)


@dataclass(frozen=True)
class ImageKey:
    """One generated image: the edit it was made under (None: the model as loaded), the slider and its settings
    ((slider id, scale, start step); None: no slider), the prompt, seed, steps and guidance."""

    edit: EraseSpec | None
    slider: tuple | None
    prompt: str
    seed: int
    num_inference_steps: int
    guidance_scale: float


class Work:
    """The widget's progress bar over one job: training iterations (each worth `iteration_units` denoising steps,
    counted by the UNet calls made with gradients: one per iteration, the prediction being trained) and the
    denoising steps of its generations (callback_on_step_end). A plain torch hook, removed on exit."""

    def __init__(self, pipe, progress, *, iterations: int = 0, images: int = 0, steps: int = 1):
        self.pipe, self.progress, self.steps = pipe, progress, steps
        self.iterations, self.images = iterations, images
        self.total = max(iterations * steps + images * steps, 1)
        self.trained = self.stepped = 0
        self.text = ""

    def __enter__(self):
        self.handle = self.pipe.unet.register_forward_pre_hook(self._unet_call)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _unet_call(self, module, args):
        if torch.is_grad_enabled() and self.trained < self.iterations:
            self.trained += 1
            self._report(f"{self.text}: iteration {self.trained} / {self.iterations}")

    def step(self, pipe, step, timestep, tensors):
        """callback_on_step_end of every generation of the job."""
        self.stepped += 1
        image = min(self.stepped // self.steps + (self.stepped % self.steps > 0), max(self.images, 1))
        self._report(f"{self.text}: image {image} / {self.images}, step {step + 1}")
        return {}

    def _report(self, text: str) -> None:
        done = self.trained * self.steps + self.stepped
        self.progress(min(done, self.total), self.total, text)


def apply_tensors(pipe, tensors: dict[str, torch.Tensor]):
    """An erasure's saved weights written back into `pipe`: a lab.weights.WeightEdit over the same names, to use in
    `with` (the restore on leaving is lab's, bit for bit)."""
    from lab.weights import WeightEdit

    edit = WeightEdit(pipe, list(tensors))
    try:
        with torch.no_grad():
            for name, value in tensors.items():
                edit.parameters[name].data.copy_(value)
    except BaseException:
        edit.restore()
        raise
    return edit


def as_array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
