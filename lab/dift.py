"""Correspondence from diffusion features: DIFT (Tang et al., "Emergent Correspondence from Image Diffusion",
NeurIPS 2023).

    feats = lab.dift.extract(pipe, [source_image, target_image], prompt="a photo of a star")
    (x, y), score = lab.dift.match(feats, (20, 31), target_index=1)     # where the point went
    heat = lab.dift.similarity(feats, (20, 31), target_index=1)[0]      # cosine map over the target
    where, scores = lab.dift.match_points(feats, points)                # many points, every image

The features of an image x at timestep t, block b, with a text prompt c:

    z0  = VAE(x) (a posterior sample per ensemble member, as the reference code draws it)
    x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps_k,  k = 1..E         (E noise draws, one batched UNet pass)
    F   = mean_k  up_block_b( UNet(x_t, t, c) )                        (the block's output, read by lab's hooks)

and a point p of a source image matches, in a target image, the pixel q maximising the cosine similarity
<F_src(p), F_tgt(q)> / (|F_src(p)| |F_tgt(q)|), both feature maps upsampled bilinearly to the image size as
the reference does (computed here in channel chunks, so 768 px images do not need gigabytes).

Defaults (`PRESETS`): the paper's SD 2.1 setting (t = 261, the second up block, `up_blocks.1`, ensemble 8,
prompt "a photo of a {class}" when the class is known); SD 1.x and SDXL take the same timestep and the up
block at the same fraction of the latent size (the paper measures SD 2.1 only); the embedded TinyWorld
model's preset was chosen by `benchmarks/dift_pck.py` on a validation split. Several blocks may be given:
each block's features are L2-normalised, upsampled to the finest one's grid and concatenated. The UNet
stops right after the last block it needs (the reference truncates its forward the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lab import diffusion, hooks
from lab.hooks import CaptureTooLarge, Mean
from lab.results import Result, as_uint8_images

__all__ = ["PRESETS", "DiftFeatures", "extract", "similarity", "match", "match_points", "dense_matches", "preset_for"]

# timestep, blocks, ensemble; see the module docstring for where each comes from.
PRESETS = {
    "sd2": dict(timestep=261, blocks=("up_blocks.1",), ensemble=8),  # the paper's SD 2.1 setting
    "sd1": dict(timestep=261, blocks=("up_blocks.1",), ensemble=8),  # SD 2.1's values: same UNet layout
    "sdxl": dict(timestep=261, blocks=("up_blocks.0",), ensemble=8),  # the up block at 1/2 of the latent size
    "tinyworld": dict(timestep=261, blocks=("down_blocks.0", "up_blocks.1"), ensemble=8),  # benchmarks/dift_pck.py
}
_CHANNEL_CHUNK = 64  # channels upsampled at a time in similarity(): bounds memory at large image sizes


class _Enough(Exception):
    """Raised by the stop hook once the last needed block has run: the rest of the UNet is not needed."""


@dataclass
class DiftFeatures(Result):
    """Features of n images: float32 (n, channels, h, w), L2-normalised per block, and what made them."""

    features: torch.Tensor
    image_size: tuple[int, int]  # (height, width) of the images, in pixels
    settings: dict
    image_arrays: np.ndarray | None = None  # uint8 (n, height, width, 3)

    FORMAT = "sdlab.dift.DiftFeatures"
    VERSION = 1

    def __repr__(self):
        n, channels, height, width = self.features.shape
        s = self.settings
        return (
            f"<DiftFeatures {n} image(s) {self.image_size[1]}x{self.image_size[0]}: {channels} channels at "
            f"{width}x{height}, t={s['timestep']}, {'+'.join(s['blocks'])}, ensemble {s['ensemble']}>"
        )

    def __len__(self) -> int:
        return len(self.features)

    def to_record(self):
        return {"image_size": list(self.image_size), "settings": self.settings}, {"features": self.features}

    @classmethod
    def from_record(cls, metadata, tensors, images):
        return cls(tensors["features"], tuple(metadata["image_size"]), metadata["settings"], images)


def preset_for(pipe) -> str:
    """The PRESETS key for this pipeline's family."""
    from lab.pipelines import EMBEDDED_MODEL

    unet = pipe.unet
    if str(getattr(unet.config, "_name_or_path", "")).startswith(str(EMBEDDED_MODEL)):
        return "tinyworld"
    if unet.config.get("addition_embed_type") == "text_time":
        return "sdxl"
    # SD 2.x's transformers project with linear layers (and read 1024-wide OpenCLIP text); SD 1.x's use 1x1 convs.
    return "sd2" if unet.config.get("use_linear_projection") else "sd1"


def extract(
    pipe,
    images,
    *,
    prompt: str | list[str] = "",
    timestep: int | None = None,
    blocks=None,
    ensemble: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    memory_limit: int | None = hooks.DEFAULT_MEMORY_LIMIT,
    progress: bool = True,
    callback=None,
) -> DiftFeatures:
    """DIFT features of `images`: PIL images or uint8 arrays (RGB, sides a multiple of the VAE's factor), or
    a lab result holding generated images (e.g. an AttributionRun).

    prompt      one text for all images or one per image (the paper: "a photo of a {class}", or "")
    timestep    the noise level t (an integer training timestep); blocks: a block name or a list (lab
                block sites, e.g. "up_blocks.1"); ensemble: noise draws averaged. None: the preset of
                the pipeline's family (preset_for(pipe)).
    seed        seeds the noise and the VAE samples: the same seed gives the same features.
    batch_size  UNet rows per pass (images x ensemble members are flattened into rows).
    memory_limit  the features kept for all images, estimated by lab's guard before anything runs.
    callback    fn(rows_done, rows_total) after every UNet pass, e.g. for a widget's progress bar
                (progress=True shows a tqdm bar when there is more than one pass).
    """
    preset = PRESETS[preset_for(pipe)]
    timestep = preset["timestep"] if timestep is None else timestep
    blocks = preset["blocks"] if blocks is None else (blocks,) if isinstance(blocks, str) else tuple(blocks)
    ensemble = preset["ensemble"] if ensemble is None else ensemble
    all_sites = hooks.sites(pipe)
    block_sites = _check(pipe, all_sites, timestep, blocks, ensemble, batch_size)
    if isinstance(images, Result):  # the generated images of a lab run, e.g. an AttributionRun
        if images.image_arrays is None:
            raise ValueError(f"this {type(images).__name__} holds no images to take features of")
        images = list(images.image_arrays)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError("give at least one image (PIL images or uint8 arrays)")
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images: give one prompt, or one per image")
    posteriors = [diffusion.latent_distribution(pipe, image) for image in images]  # refuses bad sizes and modes
    arrays = as_uint8_images(images)
    means = torch.cat([mean for mean, _ in posteriors])
    stds = torch.cat([std for _, std in posteriors])

    # Every (image, member) pair is one UNet row; the rows of one image are consecutive.
    rows = [(image, member) for image in range(len(arrays)) for member in range(ensemble)]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(rows), *means.shape[1:]), generator=generator).to(means.device, means.dtype)
    vae_noise = torch.randn((len(rows), *means.shape[1:]), generator=generator).to(means.device, torch.float32)
    # The text is encoded once, one row per image; each pass takes the rows of its images.
    height, width = (size * pipe.vae_scale_factor for size in means.shape[-2:])
    conditioning = diffusion.encode_prompt(pipe, prompts, guidance=False).unet_inputs(
        pipe, height, width, guidance=False
    )
    sums: dict[str, torch.Tensor] = {}
    order = [site.name for site in all_sites]
    stop_at = _site_after(all_sites, max(order.index(site.name) for site in block_sites))
    with hooks.trace(pipe, guidance="none", memory_limit=None) as tr:
        captures = {site.name: tr.capture(site.name, "output", reduce=Mean(), rows="all") for site in block_sites}
        _refuse_if_too_large(tr, means.shape[-2:], len(arrays), memory_limit)
        if stop_at is not None:
            tr.edit(stop_at, "output", _stop)
        chunks = range(0, len(rows), batch_size)
        for start in tqdm(chunks, desc="DIFT features", disable=not progress or len(chunks) < 2, leave=False):
            chunk = rows[start : start + batch_size]
            images_of_rows = [image for image, _ in chunk]
            # A posterior sample per member, as the reference encodes each copy of the image.
            z0 = (means[images_of_rows] + stds[images_of_rows] * vae_noise[start : start + len(chunk)]).to(means.dtype)
            x_t = diffusion.add_noise(pipe.scheduler, z0, noise[start : start + len(chunk)], timestep)
            inputs = _rows_of(conditioning, images_of_rows)
            t = torch.tensor(timestep, device=x_t.device)
            with torch.no_grad():
                try:
                    pipe.unet(x_t, t, **inputs, return_dict=False)
                except _Enough:
                    pass
            for name, capture in captures.items():
                output = capture[name]  # (rows, channels, h, w), float32 on the CPU
                index = torch.tensor(images_of_rows)
                total = sums.setdefault(name, torch.zeros(len(arrays), *output.shape[1:]))
                total.index_add_(0, index, output)
                capture.reset()
            if callback is not None:
                callback(min(start + batch_size, len(rows)), len(rows))
    features = _combine([sums[site.name] / ensemble for site in block_sites])
    settings = {
        "timestep": int(timestep),
        "blocks": list(blocks),
        "ensemble": int(ensemble),
        "seed": seed,
        "prompts": prompts,
        "preset": preset_for(pipe),
    }
    return DiftFeatures(features, tuple(arrays.shape[1:3]), settings, arrays)


def _check(pipe, all_sites, timestep, blocks, ensemble, batch_size):
    names = [site.name for site in all_sites if site.kind == "block"]
    unknown = [block for block in blocks if block not in names]
    if not blocks or unknown:
        raise ValueError(
            f"blocks {unknown or list(blocks)} are not blocks of this UNet; its blocks: {', '.join(names)}"
        )
    train_steps = pipe.scheduler.config.num_train_timesteps
    if isinstance(timestep, bool) or not isinstance(timestep, (int, np.integer)) or not 0 <= timestep < train_steps:
        raise ValueError(
            f"timestep must be an integer training timestep in 0..{train_steps - 1}, got {timestep!r} "
            "(the paper: 261 for SD 2.1)"
        )
    for name, value in (("ensemble", ensemble), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return [site for site in all_sites if site.name in blocks]


def _rows_of(conditioning: dict, rows: list[int]) -> dict:
    """The UNet's conditioning keywords for these rows (SDXL's added_cond_kwargs included)."""
    index = torch.tensor(rows)
    picked = {"encoder_hidden_states": conditioning["encoder_hidden_states"][index]}
    if "added_cond_kwargs" in conditioning:
        picked["added_cond_kwargs"] = {k: v[index] for k, v in conditioning["added_cond_kwargs"].items()}
    return picked


def _site_after(all_sites, index: int) -> str | None:
    """The first site with an output that runs after all_sites[index] has returned (None: the last up block).
    Merge sites have no "output" (they are a resnet's input), so the next attention or block site is taken."""
    later = [site for site in all_sites[index + 1 :] if site.kind != "merge"]
    return later[0].name if later else None


def _stop(x, ctx):
    raise _Enough


def _combine(per_block: list[torch.Tensor]) -> torch.Tensor:
    """L2-normalise each block's features, bring them to the finest grid, concatenate, normalise."""
    size = max((tuple(f.shape[-2:]) for f in per_block), key=lambda s: s[0] * s[1])
    parts = [F.normalize(f, dim=1) for f in per_block]
    parts = [p if tuple(p.shape[-2:]) == size else F.interpolate(p, size=size, mode="bilinear") for p in parts]
    return F.normalize(torch.cat(parts, dim=1), dim=1) if len(parts) > 1 else parts[0]


def _refuse_if_too_large(tr, latent_size, images: int, limit: int | None) -> None:
    estimate = tr.estimate(latent_size=tuple(latent_size), batch=images, steps=1, guidance=False)
    if limit is not None and estimate.total_bytes > limit:
        raise CaptureTooLarge(
            f"DIFT features of {images} images would hold {hooks.memory.human_bytes(estimate.total_bytes)}, over "
            f"the limit of {hooks.memory.human_bytes(limit)}:\n{estimate}\nExtract fewer images at a time, pick "
            "a coarser block, or raise memory_limit=."
        )


# -- Matching ---------------------------------------------------------------------------------


def similarity(
    source: DiftFeatures,
    point,
    target: DiftFeatures | None = None,
    *,
    source_index: int = 0,
    target_index: int | list[int] | None = None,
) -> torch.Tensor:
    """Cosine similarity of the source image's feature at pixel `point` = (x, y) with every pixel of the
    target image(s): float32 (targets, height, width). target: another DiftFeatures (default: the
    source's own images); target_index: one image, a list, or None for all."""
    vectors = _source_vectors(source, [point], source_index)
    target = source if target is None else target
    return torch.stack([_cosine(vectors, target, index)[0] for index in _indices(target, target_index)])


def match_points(
    source: DiftFeatures,
    points,
    target: DiftFeatures | None = None,
    *,
    source_index: int = 0,
    target_index: int | list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each point (x, y) of the source image lands in each target image: the pixel of highest cosine
    similarity. Returns (coordinates, scores): int64 (targets, points, 2) as (x, y), float32 (targets, points)."""
    vectors = _source_vectors(source, points, source_index)
    target = source if target is None else target
    where, scores = [], []
    for index in _indices(target, target_index):
        cosine = _cosine(vectors, target, index).flatten(1)  # (points, pixels)
        best, flat = cosine.max(dim=1)
        width = target.image_size[1]
        where.append(torch.stack([flat % width, flat // width], dim=1))
        scores.append(best)
    return torch.stack(where), torch.stack(scores)


def match(
    source: DiftFeatures, point, target: DiftFeatures | None = None, *, source_index: int = 0, target_index: int = 1
) -> tuple[tuple[int, int], float]:
    """One point into one target image: ((x, y), cosine similarity)."""
    if not isinstance(target_index, int):
        raise TypeError("match() takes one target_index; match_points() takes several")
    where, scores = match_points(source, [point], target, source_index=source_index, target_index=target_index)
    return (int(where[0, 0, 0]), int(where[0, 0, 1])), float(scores[0, 0])


def dense_matches(
    source: DiftFeatures, target: DiftFeatures | None = None, *, source_index: int = 0, target_index: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest neighbours at feature resolution: for every source cell, the target cell of highest cosine
    similarity. Returns int64 (h, w, 2) target cells as (column, row), and float32 (h, w) similarities."""
    target = source if target is None else target
    _indices(source, source_index)  # checks the indices
    _indices(target, target_index)
    src, tgt = source.features[source_index], target.features[target_index]
    if src.shape[0] != tgt.shape[0]:
        raise ValueError(
            f"the source has {src.shape[0]}-channel features, the target {tgt.shape[0]}: extract both "
            "with the same pipeline and blocks"
        )
    cosine = F.normalize(src.flatten(1), dim=0).T @ F.normalize(tgt.flatten(1), dim=0)  # (src cells, tgt cells)
    best, flat = cosine.max(dim=1)
    width = tgt.shape[-1]
    cells = torch.stack([flat % width, flat // width], dim=1)
    return cells.reshape(*src.shape[-2:], 2), best.reshape(src.shape[-2:])


def _indices(features: DiftFeatures, index) -> list[int]:
    n = len(features)
    chosen = list(range(n)) if index is None else [index] if isinstance(index, int) else list(index)
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad or not chosen:
        raise ValueError(f"image index {bad or index!r} is out of range: these features hold {n} image(s), 0..{n - 1}")
    return chosen


def _source_vectors(source: DiftFeatures, points, index: int) -> torch.Tensor:
    """(points, channels): the bilinearly upsampled features at each point's pixel, L2-normalised.
    Sampling at the pixel centre with grid_sample gives exactly what F.interpolate to the image size
    (align_corners=False) holds at that pixel, without building the whole upsampled map."""
    (index,) = _indices(source, index)
    height, width = source.image_size
    pixels = []
    for point in points:
        try:
            x, y = (float(value) for value in point)
        except (TypeError, ValueError):
            raise TypeError(f"a point is (x, y) in pixels, got {point!r}") from None
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(
                f"point (x={x:g}, y={y:g}) is outside the {width}x{height} image (0 <= x < {width}, 0 <= y < {height})"
            )
        pixels.append((math.floor(x), math.floor(y)))
    grid = torch.tensor([[((px + 0.5) / width * 2 - 1, (py + 0.5) / height * 2 - 1) for px, py in pixels]])
    sampled = F.grid_sample(
        source.features[index : index + 1],
        grid[None].float(),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )  # (1, channels, 1, points)
    return F.normalize(sampled[0, :, 0].T, dim=1)


def _cosine(vectors: torch.Tensor, target: DiftFeatures, index: int) -> torch.Tensor:
    """(points, height, width) cosine similarity with the target's features upsampled to its image size,
    channel chunk by channel chunk: dot products and squared norms add up over chunks."""
    features = target.features[index : index + 1]
    if features.shape[1] != vectors.shape[1]:
        raise ValueError(
            f"the source has {vectors.shape[1]}-channel features, the target {features.shape[1]}: "
            "extract both with the same pipeline and blocks"
        )
    height, width = target.image_size
    dots = torch.zeros(len(vectors), height * width)
    norms = torch.zeros(height * width)
    for start in range(0, features.shape[1], _CHANNEL_CHUNK):
        chunk = F.interpolate(
            features[:, start : start + _CHANNEL_CHUNK], size=(height, width), mode="bilinear", align_corners=False
        )[0].flatten(1)  # (chunk channels, pixels)
        dots += vectors[:, start : start + _CHANNEL_CHUNK] @ chunk
        norms += chunk.square().sum(dim=0)
    return (dots / norms.sqrt().clamp(min=1e-12)).reshape(len(vectors), height, width)
