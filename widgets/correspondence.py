"""The correspondence explorer: DIFT features of a source image and its targets, matched live in Jupyter.

    import lab, widgets
    explorer = widgets.CorrespondenceExplorer()             # embedded model: a red star and three other stars
    explorer                                                # last line of a cell: shows it
    explorer.point = (30, 12)                               # what a click on the source does
    explorer.matched                                        # [[x, y, cosine], ...]: where it lands on each target
    explorer.recompute(timestep=601)                        # new features (busy, progress bar)

Why a click is instant: the features (`lab.dift.extract`, the expensive part: a UNet pass per image and
ensemble member) are computed once, when the explorer is built or "Recompute" is pressed. A click asks the
kernel for `lab.dift.similarity` of the clicked point against every target (the cosine with the target's
features upsampled to its pixels: about 2 ms per 64x64 target on a CPU) and sends, per target, the map as
one byte per pixel and its best pixel. The browser paints the maps over the targets and moves the markers;
opacity, colormap and the keypoint markers are redrawn by the browser alone.

The images are given as PIL images or uint8 arrays, or are TinyWorld renders (lab.tinyworld.world.render):
then the ground-truth keypoints of each shape are shown, a click near a source keypoint says how far each
match fell from that keypoint's true position, and the header gives the features' PCK@0.1 over all of them.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import traitlets
from PIL import Image, ImageDraw

from widgets.base import (
    COLORMAPS,
    MAX_SENT_SIZE,
    LabWidget,
    Unanswerable,
    as_numpy,
    colormap_tables,
    css,
    esm,
    heat_bytes,
    png_bytes,
)

__all__ = ["CorrespondenceExplorer", "PCK_ALPHA", "tinyworld_images", "tinyworld_labels"]

# A match is correct (PCK@alpha) within alpha * max(height, width) of the truth: 6.4 px on TinyWorld's 64x64
# images, as tests/test_dift.py and benchmarks/dift_pck.py count it.
PCK_ALPHA = 0.1
# A point this close to a source keypoint (a fraction of the image's larger side, at least a pixel) is that
# keypoint: the targets then show its true position and the distance of the match from it.
KEYPOINT_RADIUS = 0.02

# The default images: one shape class, four instances that differ in everything else.
DEFAULT_SHAPE = "star"
DEFAULT_SCENES = (
    dict(seed=1, color="red", size_label="large", texture="plain", background="plain"),  # the source
    dict(seed=2, color="blue", size_label="small", texture="plain", background="sky"),
    dict(seed=3, color="yellow", size_label="large", texture="striped", background="grass"),
    dict(seed=4, color="purple", size_label="small", texture="dotted", background="plain"),
)


def _default_scenes(shape: str):
    from lab.tinyworld import world

    return [world.sample_scene(n_objects=1, shape=shape, **scene) for scene in DEFAULT_SCENES]


def tinyworld_images(shape: str = DEFAULT_SHAPE):
    """The explorer's default images: TinyWorld renders (lab.tinyworld.world.Rendered, with .image and
    .keypoints) of four instances of `shape`: a large red plain one on a plain background first, then three
    that differ from it in colour, size, position, texture and background."""
    from lab.tinyworld import world

    return [world.render(scene) for scene in _default_scenes(shape)]


def tinyworld_labels(shape: str = DEFAULT_SHAPE) -> list[str]:
    """Captions of tinyworld_images(shape): "source: a large red star on plain", "target 1: ..."."""
    from lab.tinyworld import world

    captions = [f"{world.fixed_caption(scene)} on {scene.background}" for scene in _default_scenes(shape)]
    return [f"source: {captions[0]}"] + [f"target {i}: {text}" for i, text in enumerate(captions[1:], start=1)]


def _as_image_and_keypoints(image) -> tuple[np.ndarray, dict[str, tuple[float, float]] | None]:
    """A uint8 (h, w, 3) array, and the image's keypoints when it is a TinyWorld render (name -> (x, y))."""
    keypoints = None
    if hasattr(image, "keypoints") and hasattr(image, "image"):  # lab.tinyworld.world.Rendered
        objects = image.keypoints
        if len(objects) == 1:
            keypoints = dict(objects[0])
        else:  # several objects: "0:center", "1:center", ...
            keypoints = {f"{i}:{name}": xy for i, points in enumerate(objects) for name, xy in points.items()}
        image = image.image
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    else:
        array = as_numpy(image) if hasattr(image, "detach") else np.asarray(image)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)  # channels first
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=2)
        if array.dtype != np.uint8:
            scale = 255.0 if array.size and float(np.nanmax(array)) <= 1.0 else 1.0
            array = np.clip(np.round(array.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"an image is a PIL image or an (h, w, 3) array, got shape {tuple(array.shape)}")
    if keypoints is not None:
        keypoints = {name: (float(x), float(y)) for name, (x, y) in keypoints.items()}
    return np.ascontiguousarray(array[..., :3]), keypoints


class CorrespondenceExplorer(LabWidget):
    """Click a point on the source image: the DIFT similarity map and the matched point on every target.

    CorrespondenceExplorer(pipe=None, images=None, *, features=None, prompt=None, timestep=None, blocks=None,
                           ensemble=None, seed=0, keypoints=None, labels=None, point=None, shape="star")

    - images: the source first, then the targets: PIL images, uint8 arrays or TinyWorld renders
      (lab.tinyworld.world.render(...), whose keypoints are then shown). Targets of another size are
      resized to the source's. None: four TinyWorld renders of `shape` (tinyworld_images()).
    - pipe: the pipeline that makes the features (None: the embedded TinyWorld model).
    - features: a lab.dift.DiftFeatures to explore as is (its images, source = image 0); with pipe, it can
      be recomputed.
    - prompt, timestep, blocks, ensemble, seed: lab.dift.extract's settings (None: the pipeline's preset;
      prompt: "a {shape}" for the default images, "" otherwise).
    - keypoints: one dict name -> (x, y) per image (or None), for images that are not TinyWorld renders.

    From Python: `point` (x, y) in source pixels; `matched`, [x, y, cosine] per target; `similarity()`,
    the cosine maps; `recompute(...)`; `snapshot()`; `features`, the lab.dift.DiftFeatures behind it.
    """

    _esm = esm("correspondence.js")
    _css = css("correspondence.css")
    # Exported explorers share the class "sdlab-explorer-static" (and each has its own).
    static_css_class = "sdlab-explorer-static sdlab-correspondence-static"
    static_note = "Static copy of the correspondence explorer: run the notebook in JupyterLab to click points."
    requested_traits = ("point",)

    # -- what the browser draws (set by Python) ---------------------------------------------------------
    image_pngs = traitlets.List(traitlets.Bytes()).tag(sync=True)  # source first, at most 512 px a side
    image_size = traitlets.List(traitlets.Int(), [0, 0]).tag(sync=True)  # [width, height]: point's pixels
    sent_size = traitlets.List(traitlets.Int(), [0, 0]).tag(sync=True)  # [width, height] of PNGs and heats
    image_labels = traitlets.List(traitlets.Unicode()).tag(sync=True)
    keypoints = traitlets.List(traitlets.Dict()).tag(sync=True)  # per image: name -> [x, y] ({} if none)
    heats = traitlets.List(traitlets.Bytes()).tag(sync=True)  # per target: cosine map, min-max to 0..255
    matched = traitlets.List(traitlets.List()).tag(sync=True)  # per target: [x, y, cosine] (pixel indices)
    match_notes = traitlets.List(traitlets.Unicode()).tag(sync=True)  # per target: caption of the match
    query_keypoint = traitlets.Unicode("").tag(sync=True)  # the source keypoint at the point ("" if none)
    feature_settings = traitlets.Dict().tag(sync=True)  # of the features on display
    feature_summary = traitlets.Unicode("").tag(sync=True)  # "t=261 · up_blocks.1 · ensemble 8 · PCK..."
    block_names = traitlets.List(traitlets.Unicode()).tag(sync=True)
    num_train_timesteps = traitlets.Int(1000).tag(sync=True)
    can_recompute = traitlets.Bool(False).tag(sync=True)
    colormap_tables = traitlets.Dict().tag(sync=True)

    # -- what the controls choose (either side may set them) ---------------------------------------------
    point = traitlets.List(traitlets.Float(), [0.0, 0.0], minlen=2, maxlen=2).tag(sync=True)  # (x, y), pixels
    opacity = traitlets.Float(0.6).tag(sync=True)
    colormap = traitlets.Unicode("jet").tag(sync=True)
    show_keypoints = traitlets.Bool(True).tag(sync=True)
    display_size = traitlets.Int(192).tag(sync=True)  # pixels on screen of each image
    # lab.dift.extract's settings for the next recompute (feature_settings: those on display)
    prompt = traitlets.Unicode("").tag(sync=True)
    timestep = traitlets.Int(261).tag(sync=True)
    blocks = traitlets.List(traitlets.Unicode(), ["up_blocks.1"]).tag(sync=True)
    ensemble = traitlets.Int(8).tag(sync=True)
    seed = traitlets.Int(0).tag(sync=True)

    # The lab.dift.DiftFeatures on display (not synced: it lives in the kernel).
    features = traitlets.Any(None, allow_none=True)

    def __init__(
        self,
        pipe=None,
        images=None,
        *,
        features=None,
        prompt: str | None = None,
        timestep: int | None = None,
        blocks=None,
        ensemble: int | None = None,
        seed: int = 0,
        keypoints=None,
        labels: list[str] | None = None,
        point=None,
        shape: str = DEFAULT_SHAPE,
        **kwargs,
    ):
        super().__init__(colormap_tables=colormap_tables(COLORMAPS), seed=seed, **kwargs)
        from lab import dift

        self.pipe = pipe
        self._features_version = 0
        self.on_event("recompute", lambda content: self.recompute(), failure="feature extraction failed")
        default_images = images is None and features is None
        if features is not None:
            if features.image_arrays is None:
                raise ValueError("these DiftFeatures hold no images (image_arrays): pass images= as well")
            images = list(features.image_arrays) if images is None else images
        if default_images:
            images, labels = tinyworld_images(shape), labels or tinyworld_labels(shape)
        self._set_images(images, keypoints, labels)
        if self.pipe is None and features is None:
            from lab.pipelines import load_pipeline

            self.pipe = load_pipeline()
            self.pipe.set_progress_bar_config(disable=True)
        if self.pipe is not None:
            from lab import hooks

            self.block_names = [site.name for site in hooks.sites(self.pipe) if site.kind == "block"]
            self.num_train_timesteps = int(self.pipe.scheduler.config.num_train_timesteps)
            preset = dift.PRESETS[dift.preset_for(self.pipe)]
        else:
            preset = features.settings
        settings = features.settings if features is not None else {}
        if prompt is None:  # the features' own, "a {shape}" for the default images, else none (as the paper)
            prompt = settings["prompts"][0] if settings.get("prompts") else f"a {shape}" if default_images else ""
        self.prompt = prompt
        self.timestep = int(timestep if timestep is not None else settings.get("timestep", preset["timestep"]))
        chosen = blocks if blocks is not None else settings.get("blocks", preset["blocks"])
        self.blocks = [chosen] if isinstance(chosen, str) else list(chosen)
        self.ensemble = int(ensemble if ensemble is not None else settings.get("ensemble", preset["ensemble"]))
        if not self.block_names:
            self.block_names = list(self.blocks)
        self.can_recompute = self.pipe is not None
        with self.quietly():
            self.point = list(point) if point is not None else self._default_point()
        if features is not None:
            self._check_features(features)
            self.features = features
        else:
            self.recompute()

    # -- the images ------------------------------------------------------------------------------------

    def _set_images(self, images, keypoints, labels) -> None:
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(images) < 2:
            raise ValueError(f"give a source image and at least one target: got {len(images)} image(s)")
        arrays, points = (list(column) for column in zip(*(_as_image_and_keypoints(image) for image in images)))
        if keypoints is not None:
            if len(keypoints) != len(images):
                raise ValueError(f"{len(keypoints)} keypoint dicts for {len(images)} images: give one per image")
            points = [
                None if given is None else {name: tuple(map(float, xy)) for name, xy in given.items()}
                for given in keypoints
            ]
        height, width = arrays[0].shape[:2]
        for i, array in enumerate(arrays):
            if array.shape[:2] != (height, width):  # a target of another size: resized to the source's
                sx, sy = width / array.shape[1], height / array.shape[0]
                arrays[i] = np.asarray(Image.fromarray(array).resize((width, height), Image.BICUBIC))
                points[i] = points[i] and {name: (x * sx, y * sy) for name, (x, y) in points[i].items()}
        self._arrays = np.stack(arrays)
        self._keypoints = [dict(p) if p else {} for p in points]
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images: give one per image")
        pngs = [png_bytes(Image.fromarray(array), MAX_SENT_SIZE) for array in arrays]
        with self.hold_sync():
            self.image_pngs = pngs
            self.image_size = [width, height]
            self.sent_size = list(Image.open(io.BytesIO(pngs[0])).size)
            self.image_labels = list(labels) if labels else ["source"] + [f"target {i}" for i in range(1, len(images))]
            self.keypoints = [{name: [x, y] for name, (x, y) in p.items()} for p in self._keypoints]

    @property
    def images(self) -> list[Image.Image]:
        """The images as PIL images, the source first."""
        return [Image.fromarray(array) for array in self._arrays]

    @property
    def num_targets(self) -> int:
        return len(self._arrays) - 1

    def _default_point(self) -> list[float]:
        """The source's first keypoint that is not its centre (a star's top tip), else the image centre."""
        points = self._keypoints[0]
        name = next((name for name in points if not name.endswith("center")), next(iter(points), None))
        if name is not None:
            return list(points[name])
        width, height = self.image_size
        return [width / 2, height / 2]

    def pick(self, keypoint: str) -> None:
        """Put the point on a keypoint of the source, by name (e.g. "tip_top")."""
        if keypoint not in self._keypoints[0]:
            names = ", ".join(self._keypoints[0]) or "none: these images are not TinyWorld renders"
            raise KeyError(f"the source has no keypoint {keypoint!r}; its keypoints: {names}")
        self.point = list(self._keypoints[0][keypoint])

    # -- features --------------------------------------------------------------------------------------

    def recompute(
        self,
        *,
        prompt: str | None = None,
        timestep: int | None = None,
        blocks=None,
        ensemble: int | None = None,
        seed: int | None = None,
    ):
        """Extract new features (default: the widget's settings, e.g. as the browser's controls left them),
        one image at a time with a progress bar. Returns the lab.dift.DiftFeatures.

        Each image is lab.dift.extract(pipe, [image], ...) with the same seed, so every image sees the same
        noise draws (and image 0's features equal lab.dift.extract(pipe, images, ...)'s first)."""
        if self.pipe is None:
            raise RuntimeError("this explorer was built from features only: pass pipe= to recompute them")
        from lab import dift

        with self.hold_sync():
            self.prompt = self.prompt if prompt is None else prompt
            self.timestep = self.timestep if timestep is None else int(timestep)
            if blocks is not None:
                self.blocks = [blocks] if isinstance(blocks, str) else list(blocks)
            self.ensemble = self.ensemble if ensemble is None else int(ensemble)
            self.seed = self.seed if seed is None else int(seed)
        settings = dict(prompt=self.prompt, timestep=self.timestep, blocks=list(self.blocks), ensemble=self.ensemble)
        with self.working("extracting features…", failure="feature extraction failed", unit="image") as progress:
            parts = []
            for array in progress.track(self._arrays):
                parts.append(dift.extract(self.pipe, [array], seed=self.seed, progress=False, **settings))
            combined = dict(parts[0].settings, prompts=[self.prompt] * len(parts))
            features = dift.DiftFeatures(
                torch.cat([part.features for part in parts]), parts[0].image_size, combined, self._arrays.copy()
            )
            self.features = features
        return features

    def _check_features(self, features) -> None:
        if len(features) != len(self._arrays):
            raise ValueError(f"features of {len(features)} images for {len(self._arrays)} images")
        if tuple(features.image_size) != tuple(self.image_size[::-1]):
            raise ValueError(
                f"features of {features.image_size[1]}x{features.image_size[0]} images for "
                f"{self.image_size[0]}x{self.image_size[1]} images"
            )

    @traitlets.observe("features")
    def _on_new_features(self, change) -> None:
        features = change["new"]
        if features is None:
            return
        self._features_version += 1
        settings = features.settings
        with self.hold_sync():
            self.feature_settings = {
                "prompt": (settings.get("prompts") or [""])[0],
                "timestep": int(settings.get("timestep", 0)),
                "blocks": list(settings.get("blocks", [])),
                "ensemble": int(settings.get("ensemble", 0)),
                "seed": settings.get("seed", 0),
            }
            self.feature_summary = self._summarise(features)
        self.refresh(force=True)

    def pck(self, alpha: float = PCK_ALPHA) -> tuple[int, int] | None:
        """(correct, total) over every source keypoint that each target also has: a match is correct within
        alpha * max(height, width) of the true position. None without keypoints."""
        from lab import dift

        source = self._keypoints[0]
        correct = total = 0
        for target in range(1, len(self._arrays)):
            names = [name for name in source if name in self._keypoints[target]]
            if not names:
                continue
            where, _ = dift.match_points(self.features, [source[n] for n in names], target_index=target)
            for (x, y), name in zip(where[0].tolist(), names):
                correct += self._error(x, y, self._keypoints[target][name]) <= alpha * max(self.image_size)
                total += 1
        return (correct, total) if total else None

    @staticmethod
    def _error(x: int, y: int, truth) -> float:
        """Distance of a matched pixel (its centre) from a true position, in pixels."""
        return math.hypot(x + 0.5 - truth[0], y + 0.5 - truth[1])

    def _summarise(self, features) -> str:
        s = self.feature_settings
        parts = [f"t = {s['timestep']}", "+".join(s["blocks"]), f"ensemble {s['ensemble']}"]
        parts.append(f"prompt “{s['prompt']}”" if s["prompt"] else "empty prompt")
        score = self.pck()
        if score is not None:
            correct, total = score
            parts.append(f"PCK@{PCK_ALPHA:g} {correct}/{total} = {correct / total:.2f}")
        return " · ".join(parts)

    # -- matching (answering a click) ------------------------------------------------------------------

    def similarity(self) -> torch.Tensor:
        """The cosine maps of the point against every target: float32 (targets, height, width)
        (lab.dift.similarity on the features on display)."""
        from lab import dift

        return dift.similarity(self.features, tuple(self.point), target_index=list(range(1, len(self._arrays))))

    def requested_state(self):
        if self.features is None:
            return None
        return (tuple(self.point), self._features_version)

    def answer_request(self) -> None:
        """The maps and matches of the point: one similarity() call for all targets (a few ms)."""
        x, y = self.point
        width, height = self.image_size
        if not (0 <= x < width and 0 <= y < height):  # also NaN
            raise Unanswerable(
                f"the point (x={x:g}, y={y:g}) is outside the {width}x{height} source image: click on the source, "
                f"or set point to (x, y) with 0 <= x < {width}, 0 <= y < {height}"
            )
        cosine = self.similarity()
        flat = cosine.flatten(1)
        best, index = flat.max(dim=1)
        low = flat.min(dim=1).values
        normalized = (cosine - low[:, None, None]) / (best - low).clamp(min=1e-6)[:, None, None]
        matched = [[int(i % width), int(i // width), float(b)] for i, b in zip(index.tolist(), best.tolist())]
        query = self._keypoint_at(x, y)
        notes = []
        for target, (mx, my, score) in enumerate(matched, start=1):
            note = f"({mx}, {my}) · cosine {score:.2f}"
            truth = self._keypoints[target].get(query) if query else None
            if truth is not None:
                error = self._error(mx, my, truth)
                verdict = "✓" if error <= PCK_ALPHA * max(width, height) else "✗"
                note += f" · {error:.1f} px from the true {query} {verdict}"
            notes.append(note)
        sent = tuple(self.sent_size)
        self.heats = [heat_bytes(as_numpy(heat), sent) for heat in normalized]
        self.matched = matched
        self.match_notes = notes
        self.query_keypoint = query

    def _keypoint_at(self, x: float, y: float) -> str:
        points = self._keypoints[0]
        if not points:
            return ""
        name, (kx, ky) = min(points.items(), key=lambda item: math.hypot(item[1][0] - x, item[1][1] - y))
        radius = max(1.0, KEYPOINT_RADIUS * max(self.image_size))
        return name if math.hypot(kx - x, ky - y) <= radius else ""

    # -- a still picture (snapshot, static copy for exported notebooks) --------------------------------

    def snapshot(self, size: int | None = None) -> Image.Image:
        """The source (point marked) and the targets (similarity map over them, match marked) side by side,
        each `size` pixels wide (default display_size), drawn from what the browser was sent."""
        size = size or self.display_size
        width, height = self.image_size
        sent_width, sent_height = self.sent_size
        tall = round(size * height / width)
        table = np.frombuffer(self.colormap_tables[self.colormap], dtype=np.uint8).reshape(256, 3).astype(np.float32)
        gap = 6
        picture = Image.new("RGB", (len(self._arrays) * (size + gap) - gap, tall), (255, 255, 255))
        for index, png in enumerate(self.image_pngs):
            base = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
            if index > 0 and index - 1 < len(self.heats):
                heat = np.frombuffer(self.heats[index - 1], dtype=np.uint8).reshape(sent_height, sent_width)
                base = (1.0 - self.opacity) * base + self.opacity * table[heat]
            tile = Image.fromarray(np.clip(base + 0.5, 0, 255).astype(np.uint8)).resize((size, tall), Image.NEAREST)
            draw = ImageDraw.Draw(tile)
            scale_x, scale_y = size / width, tall / height
            if index == 0:
                _marker(draw, self.point[0] * scale_x, self.point[1] * scale_y, (255, 255, 255))
            elif index - 1 < len(self.matched):
                mx, my, _ = self.matched[index - 1]
                truth = self._keypoints[index].get(self.query_keypoint) if self.query_keypoint else None
                if truth is not None:
                    tx, ty = truth[0] * scale_x, truth[1] * scale_y
                    draw.rectangle([tx - 3, ty - 3, tx + 3, ty + 3], outline=(0, 0, 0), width=2)
                _marker(draw, (mx + 0.5) * scale_x, (my + 0.5) * scale_y, (255, 255, 255))
            picture.paste(tile, (index * (size + gap), 0))
        return picture

    def static_picture(self) -> Image.Image | None:
        return self.snapshot(160) if self.heats else None

    def static_caption(self) -> str:
        x, y = self.point
        where = f"point ({x:g}, {y:g})" + (f", the source's {self.query_keypoint}" if self.query_keypoint else "")
        return f"DIFT correspondence — {where} · {self.feature_summary}"


def _marker(draw: ImageDraw.ImageDraw, x: float, y: float, colour) -> None:
    """A ring with a dark outline: visible on any background and heat map."""
    for radius, fill, width in ((6, (0, 0, 0), 4), (6, colour, 2)):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=fill, width=width)
