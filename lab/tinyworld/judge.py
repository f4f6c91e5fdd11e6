"""The judge: an analytic reader of TinyWorld images.

Given any 64x64 image, rendered or generated, it finds the objects and reports each one's
class, colour, size, texture and position. No learning: it knows the world's palette and
backgrounds, segments by colour, and recognises shapes by fitting each class's outline to
the region (the best-overlapping template wins) using scikit-image region properties.
It tolerates the blur and colour drift of generated images: the background is fitted
(type + colour offset) per image, and every decision is a vote over the region's pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage.measure import label, regionprops

from .world import (
    BACKGROUNDS,
    COLORS,
    RELATIONS,
    SHAPES,
    SIZE_RANGES,
    TEXTURE_INK,
    TEXTURES,
    Scene,
    WorldObject,
    _coverage,
    background_image,
    relation_holds,
    unit_outline,
)

PALETTE = np.array(list(COLORS.values()), float)
COLOR_NAMES = list(COLORS)
INK = np.array(TEXTURE_INK, float)
FOREGROUND_DISTANCE = 55.0  # RGB distance from the fitted background beyond which a pixel is an object's
MIN_REGION_PIXELS = 15  # smaller specks are noise (the smallest object covers ~100 pixels)
SMALL_LARGE_BOUNDARY = (SIZE_RANGES["small"][1] + SIZE_RANGES["large"][0]) / 2


@dataclass
class Detection:
    shape: str
    color: str
    texture: str
    size: float  # extent in pixels, as in world.WorldObject.size
    cx: float
    cy: float
    mask: np.ndarray = field(repr=False)
    shape_score: float = 0.0  # IoU of the best template with the region

    @property
    def size_label(self) -> str:
        return "small" if self.size < SMALL_LARGE_BOUNDARY else "large"


@dataclass
class Reading:
    background: str
    objects: list[Detection]


def _unit_bbox(shape: str) -> tuple[float, float, float, float]:
    pts = unit_outline(shape)
    return pts[:, 0].min(), pts[:, 0].max(), pts[:, 1].min(), pts[:, 1].max()


_UNIT_BBOXES = {s: _unit_bbox(s) for s in SHAPES}


def fit_background(img: np.ndarray) -> tuple[str, np.ndarray]:
    """Which known background, and its colour-corrected image: the one most pixels agree with."""
    best = None
    for name in BACKGROUNDS:
        bg = background_image(name, img.shape[0])
        dist = np.linalg.norm(img - bg, axis=-1)
        near = dist < 30
        if near.sum() < 16:
            continue
        offset = np.median((img - bg)[near], axis=0)  # colour drift of a generated image
        corrected = bg + offset
        score = (np.linalg.norm(img - corrected, axis=-1) < 25).mean()
        if best is None or score > best[0]:
            best = (score, name, corrected)
    if best is None:  # nothing looks like a known background: fall back to the median border colour
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        return "unknown", np.broadcast_to(np.median(border, axis=0), img.shape).copy()
    return best[1], best[2]


def _classify_shape(region_mask: np.ndarray, bbox: tuple[int, int, int, int]) -> tuple[str, float, float, float, float]:
    """Fit each class's outline to the region; return the best (class, IoU, size, cx, cy).

    The template is scaled from the region's bounding box, then enlarged a little in case thin
    parts (a star's tips) fell below the foreground threshold, and centred on the region's centroid."""
    y0, x0, y1, x1 = bbox
    # Work in a window around the region (templates may be up to 1.2x larger than its bounding box).
    pad = int(0.3 * max(y1 - y0, x1 - x0)) + 2
    wy0, wx0 = max(0, y0 - pad), max(0, x0 - pad)
    region_mask = region_mask[wy0 : y1 + pad, wx0 : x1 + pad]
    y0, x0, y1, x1 = y0 - wy0, x0 - wx0, y1 - wy0, x1 - wx0
    h, w = region_mask.shape
    ys, xs = np.nonzero(region_mask)
    my, mx = ys.mean() + 0.5, xs.mean() + 0.5
    best = ("circle", -1.0, 0.0, 0.0, 0.0)
    for shape, (ux0, ux1, uy0, uy1) in _UNIT_BBOXES.items():
        outline = unit_outline(shape)
        base = ((x1 - x0) / (ux1 - ux0) + (y1 - y0) / (uy1 - uy0)) / 2  # pixels per unit
        for ppu in (base, base * 1.1, base * 1.2):
            offset = _UNIT_CENTROIDS[shape] * ppu
            cx, cy = mx - offset[0], my - offset[1]
            template = _coverage(outline * ppu + np.array([cx, cy]), (0, h, 0, w)) >= 0.5
            inter = np.logical_and(template, region_mask).sum()
            union = np.logical_or(template, region_mask).sum()
            iou = inter / max(union, 1)
            if iou > best[1]:
                best = (shape, float(iou), float(2 * ppu), float(cx + wx0), float(cy + wy0))
    return best


def _unit_centroid(shape: str) -> np.ndarray:
    """Area centroid of the unit shape (where the region's centroid should fall)."""
    n = 128
    grid = (np.arange(n) + 0.5) / n * 2.4 - 1.2
    cover = _coverage((unit_outline(shape) + 1.2) / 2.4 * n, (0, n, 0, n)) >= 0.5
    ys, xs = np.nonzero(cover)
    return np.array([grid[xs].mean(), grid[ys].mean()])


_UNIT_CENTROIDS = {s: _unit_centroid(s) for s in SHAPES}


def _texture(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> str:
    """plain / striped / dotted from the ink inside the object: how much, and whether it is oriented."""
    inner = ndimage.binary_erosion(mask, iterations=1)
    if inner.sum() < 8:
        inner = mask
    # How far each pixel has moved from the object's colour toward the ink (partly inked pixels count too).
    towards_ink = ((img - colour) @ (INK - colour)) / float((INK - colour) @ (INK - colour))
    ink = towards_ink > 0.35
    if ink[inner].mean() < 0.06:
        return "plain"
    # Stripes are diagonal lines: the ink varies along one diagonal only; dots vary along both. The ink map
    # is ~0 on the background as on plain colour, so the object's outline adds no false orientation.
    gy, gx = np.gradient(np.clip(towards_ink, 0, 1))
    d1, d2 = (gx + gy)[inner], (gx - gy)[inner]
    e1, e2 = (d1**2).sum(), (d2**2).sum()
    anisotropy = abs(e1 - e2) / max(e1 + e2, 1e-6)
    return "striped" if anisotropy > 0.3 else "dotted"


def read_image(image) -> Reading:
    """Find the objects in a TinyWorld image (PIL image or HxWx3 uint8/float array in [0, 255])."""
    img = np.asarray(image, dtype=float)[..., :3]
    if img.ndim != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {img.shape}")
    if img.shape[0] != img.shape[1]:
        raise ValueError(f"the judge reads square TinyWorld images; got {img.shape[1]}x{img.shape[0]}")
    background, bg = fit_background(img)
    foreground = np.linalg.norm(img - bg, axis=-1) > FOREGROUND_DISTANCE
    foreground = ndimage.binary_opening(foreground, iterations=1) | (foreground & ndimage.binary_erosion(foreground))
    foreground = ndimage.binary_fill_holes(foreground)
    # Each object pixel is its colour, partly covered by ink (textures, blurred): score every palette colour
    # by the distance from the pixel to the segment colour -> ink, so a blurred yellow stripe stays yellow.
    to_ink = INK - PALETTE  # (C, 3)
    along = np.clip(((img[..., None, :] - PALETTE) * to_ink).sum(-1) / (to_ink**2).sum(-1), 0.0, 0.7)
    dist_segment = np.linalg.norm(img[..., None, :] - (PALETTE + along[..., None] * to_ink), axis=-1)
    nearest_colour = dist_segment.argmin(axis=-1)
    clean = dist_segment.min(axis=-1) < 40
    labels = label(foreground, connectivity=2)
    objects = []
    for region in regionprops(labels):
        if region.area < MIN_REGION_PIXELS:
            continue
        mask = labels == region.label
        colour_pixels = mask & clean
        if colour_pixels.sum() < 4:
            colour_pixels = mask
        votes = np.bincount(nearest_colour[colour_pixels], minlength=len(COLOR_NAMES))
        shape, score, size, cx, cy = _classify_shape(mask, region.bbox)
        colour = int(votes.argmax())
        objects.append(
            Detection(
                shape=shape,
                color=COLOR_NAMES[colour],
                texture=_texture(img, mask, PALETTE[colour]),
                size=size,
                cx=cx,
                cy=cy,
                mask=mask,
                shape_score=score,
            )
        )
    objects.sort(key=lambda d: -d.mask.sum())
    return Reading(background, objects)


# ----------------------------------------------------------------------------- matching and scoring


def match(expected: list[WorldObject], found: list[Detection]) -> list[Detection | None]:
    """For each expected object, in order, the remaining detection that best agrees with it: most
    attributes in common (shape, colour), then nearest. Each detection is used once."""
    remaining = list(found)
    out: list[Detection | None] = []
    for e in expected:
        if not remaining:
            out.append(None)
            continue
        best = max(
            remaining,
            key=lambda d: ((d.shape == e.shape) + (d.color == e.color), -float(np.hypot(d.cx - e.cx, d.cy - e.cy))),
        )
        out.append(best)
        remaining.remove(best)
    return out


@dataclass
class PromptSpec:
    """What a TinyWorld prompt asks for: objects (attributes may be None = unspecified) and a relation."""

    objects: list[dict]
    relation: str | None = None
    background: str | None = None


_SIZE_WORDS = {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large"}
_REL_PATTERNS = [
    (r"\b(?:to the |on the )?left of\b", "left of"),
    (r"\b(?:to the |on the )?right of\b", "right of"),
    (r"\b(?:above|over|on top of)\b", "above"),
    (r"\b(?:below|under|beneath)\b", "below"),
]


def parse_prompt(prompt: str) -> PromptSpec:
    """Read a TinyWorld caption back into the attributes it names (unknown words are ignored)."""
    text = prompt.lower()
    background = None
    for bg, pat in (("sky", r"\bsky\b"), ("grass", r"\bgrass\b"), ("plain", r"\b(?:plain|white) background\b")):
        if re.search(pat, text):
            background = bg
            text = re.sub(
                r"\b(?:on|in|against) (?:a |the )?(?:plain |white |sky |grass )?(?:background|sky|grass|field of grass)\b",
                " ",
                text,
            )
    relation = None
    for pat, rel in _REL_PATTERNS:
        if re.search(pat, text):
            relation = rel
            text = re.sub(pat, " | ", text, count=1)
            break
    objects = []
    for chunk in re.split(r"\||,|\band\b", text):
        words = re.findall(r"[a-z]+", chunk)
        shape = next((w for w in words if w in SHAPES), None)
        if shape is None:
            continue
        objects.append(
            {
                "shape": shape,
                "color": next((w for w in words if w in COLORS), None),
                "texture": next((w for w in words if w in TEXTURES), None),
                "size_label": next((_SIZE_WORDS[w] for w in words if w in _SIZE_WORDS), None),
            }
        )
    if len(objects) != 2:
        relation = None
    return PromptSpec(objects, relation, background)


def score_prompt(prompt: str | PromptSpec, image) -> dict:
    """How well an image follows a TinyWorld prompt, attribute by attribute (None = not asked)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    reading = read_image(image)
    expected = [
        WorldObject(
            shape=o["shape"],
            color=o["color"] or "",
            size=0.0,
            texture=o["texture"] or "",
            cx=float("nan"),
            cy=float("nan"),
        )
        for o in spec.objects
    ]
    found = match(expected, reading.objects)
    per_object = []
    for want, got in zip(spec.objects, found):
        r = {
            "present": got is not None
            and got.shape == want["shape"]
            and (want["color"] is None or got.color == want["color"])
        }
        r["shape"] = got is not None and got.shape == want["shape"]
        r["color"] = None if want["color"] is None else (got is not None and got.color == want["color"])
        r["texture"] = None if want["texture"] is None else (got is not None and got.texture == want["texture"])
        r["texture_read"] = None if want["texture"] is None or got is None else got.texture
        r["size"] = None if want["size_label"] is None else (got is not None and got.size_label == want["size_label"])
        r["centre"] = None if got is None else (float(got.cx), float(got.cy))
        per_object.append(r)
    result = {
        "objects": per_object,
        "n_found": len(reading.objects),
        "all_present": all(r["present"] for r in per_object),
        "relation": None,
    }
    if spec.relation is not None and len(found) == 2:
        a, b = found
        result["relation"] = bool(
            a is not None
            and b is not None
            and per_object[0]["present"]
            and per_object[1]["present"]
            and relation_holds(spec.relation, (a.cx, a.cy), (b.cx, b.cy))
        )
    return result


def judge_rendered(scene: Scene, image) -> dict:
    """Judge accuracy on a rendered scene: every attribute of every object against ground truth."""
    reading = read_image(image)
    found = match(scene.objects, reading.objects)
    rows = []
    for obj, det in zip(scene.objects, found):
        rows.append(
            {
                "truth": {"shape": obj.shape, "color": obj.color, "texture": obj.texture, "size_label": obj.size_label},
                "found": None
                if det is None
                else {
                    "shape": det.shape,
                    "color": det.color,
                    "texture": det.texture,
                    "size_label": det.size_label,
                    "position_error": float(np.hypot(det.cx - obj.cx, det.cy - obj.cy)),
                },
            }
        )
    return {"background": (scene.background, reading.background), "objects": rows, "n_found": len(reading.objects)}


__all__ = [
    "Detection",
    "Reading",
    "PromptSpec",
    "read_image",
    "parse_prompt",
    "score_prompt",
    "judge_rendered",
    "fit_background",
    "match",
    "RELATIONS",
]
