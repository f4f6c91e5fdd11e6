"""The editing explorer: a real image inverted into the model's noise, then edited by Prompt-to-Prompt.

    import widgets
    explorer = widgets.EditingExplorer()              # embedded model, the TinyWorld render of seed 0
    explorer                                          # last line of a cell: shows it
    explorer.pick(3)                                  # another rendered image (its caption becomes the prompt)
    explorer.upload("photo.png")                      # or your own (PNG/JPEG bytes, a path, a PIL image, an array)
    explorer.show(method="edict", target_prompt="a small green square", local_blend="square")
    explorer.result.edit.masks                        # the LocalBlend mask of every step, (steps, 1, h, w)

Two stages, each through lab's own function:

    inversion   lab.inversion.<method>_inversion(pipe, image, source_prompt, num_inference_steps, guidance_scale)
                and its reconstruct(): the source, the reconstruction and |reconstruction - source|, with PSNR
    edit        lab.prompt_to_prompt(pipe, source_prompt, target_prompt, inversion=..., edit, cross_steps,
                self_steps, reweight, local_blend, blend_threshold): P2P's source row (the image regenerated
                inside the same batch), the edit, |edit - source|, and LocalBlend's mask after every step

Caching: inversions are kept per (image, method, steps, guidance, source prompt), edits per all their settings,
so moving a control back to a value already computed redraws at once (the kernel answers from the cache: no
model call, `pipeline_runs` unchanged), and the step slider over the LocalBlend mask is redrawn by the browser
alone. Anything new runs busy, with a progress bar over the UNet calls (null-text's optimisation counts its
inner steps: the bar jumps where a step converged early). The browser keeps one request in flight, latest
wins (widgets.base).

Errors (an uploaded image of the wrong size or mode, a reweighted word not in the prompt, null-text at
guidance 1...) are lab's own messages, shown in the message line; the last good result stays on display and
a failed upload leaves the previous image chosen.
"""

from __future__ import annotations

import base64
import hashlib
import io
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import traitlets
from PIL import Image

from widgets.base import (
    COLORMAPS,
    MAX_SENT_SIZE,
    LabWidget,
    Unanswerable,
    colormap_tables,
    coloured,
    css,
    esm,
    heat_bytes,
    labelled_strip,
    png_bytes,
    progress_bars_off,
)
from widgets.editing_parts import (
    EditSpec,
    InversionSpec,
    UNetCalls,
    open_image,
    psnr,
    run_prompt_to_prompt,
    suggest_edit,
)

__all__ = ["EditingExplorer", "EditingResult", "METHODS", "EDITS", "suggest_edit", "psnr"]

# The inversion methods: label, and the guidance each opens on (the papers' settings, scaled to TinyWorld).
METHODS = {
    "ddim": dict(label="DDIM", guidance=1.0),
    "null_text": dict(label="null-text", guidance=5.0),
    "negative_prompt": dict(label="negative-prompt", guidance=5.0),
    "edict": dict(label="EDICT", guidance=3.0),
}
EDITS = ("auto", "replace", "refine", "reweight")  # reweight: lab.prompt_to_prompt(edit="auto", reweight=...)
MAX_INVERSIONS = 16
MAX_EDITS = 64


@dataclass
class EditingResult:
    """One inversion and one edit of it, as the explorer shows them.

    inversion        the lab.inversion.Inversion (inversion.image_arrays[0]: the source image)
    reconstruction   uint8 (H, W, 3): inversion.reconstruct(); reconstruction_psnr against the source (dB)
    edit             the lab.p2p.PromptToPromptResult (image_arrays: [P2P's source row, edited]; masks)
    seconds          {"inversion": ..., "edit": ...} as first computed
    """

    inversion: object
    reconstruction: np.ndarray
    reconstruction_psnr: float
    edit: object
    seconds: dict = field(default_factory=dict)
    display: dict = field(default_factory=dict, repr=False)

    def __repr__(self):
        return f"<EditingResult {self.inversion!r} -> {self.edit!r}>"


class EditingExplorer(LabWidget):
    """Invert a rendered TinyWorld image (or an uploaded one), see its reconstruction, edit it with Prompt-to-Prompt.

    EditingExplorer(pipe=None, seed=0, *, method="null_text", num_inference_steps=20, guidance_scale=None,
                    source_prompt=None, target_prompt=None, edit="auto", cross_steps=0.8, self_steps=0.4,
                    reweight=None, local_blend=None, blend_threshold=0.3)

    - pipe: an SD 1.x / 2.x / XL text-to-image pipeline (None: the embedded TinyWorld model).
    - seed: the TinyWorld render shown first; source_prompt: its caption (None: lab.tinyworld's fixed_caption);
      target_prompt: the edited prompt (None: suggest_edit(caption), a colour swapped).
    - method: "ddim", "null_text", "negative_prompt" or "edict"; guidance_scale None: METHODS[method]'s.
    - edit: "auto", "replace", "refine" or "reweight" (reweight=(word, scale), a word of the target prompt).
    - local_blend: words (a list or "square, circle"); empty: no LocalBlend.

    From Python: `pick(seed)`, `upload(image)`, `show(**controls)`, `result` (the EditingResult on display),
    `snapshot()`; every control is a trait.
    """

    _esm = esm("editing.js")
    _css = css("editing.css")
    static_css_class = "sdlab-explorer-static sdlab-editing-static"
    static_note = "Static copy of the editing explorer: run the notebook in JupyterLab to invert and edit."
    requested_traits = (
        "source",
        "upload_id",
        "seed",
        "source_prompt",
        "method",
        "num_inference_steps",
        "guidance_scale",
        "target_prompt",
        "edit",
        "reweight_word",
        "reweight_scale",
        "cross_steps",
        "self_steps",
        "blend_words",
        "blend_threshold",
    )

    # -- what the browser draws (set by Python) ---------------------------------------------------------
    method_info = traitlets.Dict().tag(sync=True)
    colormap_tables = traitlets.Dict().tag(sync=True)
    source_png = traitlets.Bytes(b"").tag(sync=True)
    reconstruction_png = traitlets.Bytes(b"").tag(sync=True)
    edit_source_png = traitlets.Bytes(b"").tag(sync=True)  # P2P's source row
    edited_png = traitlets.Bytes(b"").tag(sync=True)
    reconstruction_difference = traitlets.Bytes(b"").tag(sync=True)  # max over RGB |a - b| / 255, a byte a pixel
    edit_difference = traitlets.Bytes(b"").tag(sync=True)
    sent_size = traitlets.List(traitlets.Int(), [0, 0]).tag(sync=True)  # [width, height] of the PNGs
    mask_frames = traitlets.List(traitlets.Bytes()).tag(sync=True)  # LocalBlend's mask per step, 0/255
    mask_size = traitlets.List(traitlets.Int(), [0, 0]).tag(sync=True)  # [width, height]: the latent grid
    mask_notes = traitlets.List(traitlets.Unicode()).tag(sync=True)  # one line per step
    blend_panels = traitlets.List(traitlets.Dict()).tag(sync=True)  # {label, width, height, frame}: final maps
    inversion_label = traitlets.Unicode("").tag(sync=True)
    reconstruction_label = traitlets.Unicode("").tag(sync=True)
    edit_label = traitlets.Unicode("").tag(sync=True)
    difference_label = traitlets.Unicode("").tag(sync=True)
    cached_note = traitlets.Unicode("").tag(sync=True)
    from_cache = traitlets.Bool(False).tag(sync=True)
    pipeline_runs = traitlets.Int(0).tag(sync=True)  # inversions, reconstructions and edits this widget ran
    shown_version = traitlets.Int(0).tag(sync=True)

    # -- what the controls choose ------------------------------------------------------------------------
    source = traitlets.Unicode("seed").tag(sync=True)  # "seed" | "upload"
    upload_id = traitlets.Unicode("").tag(sync=True)  # the uploaded image chosen (its hash)
    seed = traitlets.Int(0).tag(sync=True)
    source_prompt = traitlets.Unicode("").tag(sync=True)
    method = traitlets.Unicode("null_text").tag(sync=True)
    num_inference_steps = traitlets.Int(20).tag(sync=True)
    guidance_scale = traitlets.Float(5.0).tag(sync=True)
    target_prompt = traitlets.Unicode("").tag(sync=True)
    edit = traitlets.Unicode("auto").tag(sync=True)
    reweight_word = traitlets.Unicode("").tag(sync=True)
    reweight_scale = traitlets.Float(2.0).tag(sync=True)
    cross_steps = traitlets.Float(0.8).tag(sync=True)
    self_steps = traitlets.Float(0.4).tag(sync=True)
    blend_words = traitlets.Unicode("").tag(sync=True)  # comma-separated
    blend_threshold = traitlets.Float(0.3).tag(sync=True)
    step = traitlets.Int(0).tag(sync=True)  # LocalBlend frame on display (browser-side; kept for snapshot())
    opacity = traitlets.Float(0.55).tag(sync=True)
    colormap = traitlets.Unicode("inferno").tag(sync=True)
    display_size = traitlets.Int(160).tag(sync=True)

    def __init__(
        self,
        pipe=None,
        seed: int = 0,
        *,
        method: str = "null_text",
        num_inference_steps: int = 20,
        guidance_scale: float | None = None,
        source_prompt: str | None = None,
        target_prompt: str | None = None,
        edit: str = "auto",
        cross_steps: float = 0.8,
        self_steps: float = 0.4,
        reweight: tuple | None = None,
        local_blend=None,
        blend_threshold: float = 0.3,
        **kwargs,
    ):
        import lab

        if method not in METHODS:
            raise ValueError(f"unknown inversion method {method!r}: choose one of {', '.join(METHODS)}")
        if edit not in EDITS:
            raise ValueError(f"edit must be one of {EDITS}, got {edit!r}")
        if pipe is None:
            pipe = lab.load_pipeline()
            pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self._inversions: OrderedDict[InversionSpec, dict] = OrderedDict()
        self._cache: OrderedDict[EditSpec, EditingResult] = OrderedDict()
        self._uploads: dict[str, dict] = {}  # upload_id -> {"image": PIL image, "name": file name}
        self._failure: tuple[EditSpec, str] | None = None
        self._computed: EditSpec | None = None
        self.result: EditingResult | None = None
        super().__init__(method_info=METHODS, colormap_tables=colormap_tables(COLORMAPS), **kwargs)
        self.on_event("pick", lambda content: self._quietly_shown(self.pick, int(content.get("seed", 0))))
        self.on_event("upload", self._upload_event, failure="upload failed")
        caption = self.caption(seed)
        with self.quietly(), self.hold_trait_notifications():
            self.seed, self.method, self.num_inference_steps = int(seed), method, int(num_inference_steps)
            self.guidance_scale = float(METHODS[method]["guidance"] if guidance_scale is None else guidance_scale)
            self.source_prompt = caption if source_prompt is None else source_prompt
            self.target_prompt = suggest_edit(self.source_prompt) if target_prompt is None else target_prompt
            self.edit, self.cross_steps, self.self_steps = edit, float(cross_steps), float(self_steps)
            if reweight:
                self.reweight_word, self.reweight_scale = reweight[0], float(reweight[1])
            words = [local_blend] if isinstance(local_blend, str) else list(local_blend or [])
            self.blend_words, self.blend_threshold = ", ".join(words), float(blend_threshold)
        self.refresh()

    # -- from Python -----------------------------------------------------------------------------------

    @staticmethod
    def caption(seed: int) -> str:
        from lab.tinyworld.world import fixed_caption, sample_scene

        return fixed_caption(sample_scene(int(seed)))

    def pick(self, seed: int, source_prompt: str | None = None, target_prompt: str | None = None):
        """Show the TinyWorld render of `seed`: its caption as the source prompt, a colour swapped as the target."""
        source_prompt = self.caption(seed) if source_prompt is None else source_prompt
        return self.show(
            source="seed",
            seed=int(seed),
            source_prompt=source_prompt,
            target_prompt=suggest_edit(source_prompt) if target_prompt is None else target_prompt,
        )

    def upload(self, image, name: str = "", source_prompt: str | None = None) -> EditingResult | None:
        """Invert and edit your own image: PNG or JPEG bytes, a path, a PIL image or a uint8 array. The image goes
        to lab.inversion as it is: a wrong size or mode is its error, in message; the previous image stays chosen."""
        try:
            picture = open_image(image)
        except ValueError as error:
            self.show_message(f"Upload failed: {error}")
            return self.result
        data = np.asarray(picture).tobytes() + picture.mode.encode() + str(picture.size).encode()
        sha = hashlib.sha1(data).hexdigest()[:16]
        self._uploads[sha] = {"image": picture, "name": name or "uploaded image"}
        while len(self._uploads) > MAX_INVERSIONS:
            self._uploads.pop(next(iter(self._uploads)))
        previous = (self.source, self.upload_id, self.source_prompt)
        with self.hold_trait_notifications():
            if source_prompt is not None:
                self.source_prompt = source_prompt
            self.source, self.upload_id = "upload", sha
        if self.requested_state() != self._answered_state:  # it failed: back to the image on display
            message = self.message
            with self.quietly():
                self.source, self.upload_id, self.source_prompt = previous
            self.show_message(message)
        return self.result

    def show(self, **controls) -> EditingResult | None:
        """Set controls (traits, e.g. method="edict", cross_steps=0.6, local_blend="square") as the browser does;
        computes unless cached. Returns the result on display; raises the message if it failed."""
        if "local_blend" in controls:
            words = controls.pop("local_blend")
            controls["blend_words"] = ", ".join([words] if isinstance(words, str) else list(words or []))
        if "reweight" in controls:
            word, scale = controls.pop("reweight") or ("", self.reweight_scale)
            controls.update(reweight_word=word, reweight_scale=float(scale))
        with self.hold_trait_notifications():
            for name, value in controls.items():
                if name not in self.requested_traits:
                    raise ValueError(f"unknown control {name!r}: choose from {', '.join(self.requested_traits)}")
                setattr(self, name, value)
        if self.message:
            raise RuntimeError(self.message)
        return self.result

    def cached_inversions(self) -> int:
        """How many inversions the cache holds (each with its reconstruction)."""
        return len(self._inversions)

    def _upload_event(self, content: dict) -> None:
        """The browser's file, base64 in the message (a few kB for TinyWorld-sized images)."""
        self.upload(base64.b64decode(content.get("data", "")), content.get("name", ""))

    @staticmethod
    def _quietly_shown(action, *args) -> None:
        try:
            action(*args)
        except RuntimeError:
            pass  # already in the message line

    # -- the cache keys of the current controls ----------------------------------------------------------

    def _spec(self) -> EditSpec:
        if self.method not in METHODS:
            raise ValueError(f"unknown inversion method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.edit not in EDITS:
            raise ValueError(f"edit must be one of {', '.join(EDITS)}, got {self.edit!r}")
        if self.source == "upload" and self.upload_id in self._uploads:
            image = ("upload", self.upload_id)
        else:
            image = ("seed", int(self.seed))
        inversion = InversionSpec(
            image, self.method, int(self.num_inference_steps), round(float(self.guidance_scale), 6), self.source_prompt
        )
        word = self.reweight_word.strip()
        reweight = (word, round(float(self.reweight_scale), 6)) if self.edit == "reweight" and word else ()
        if self.edit == "reweight" and not word:
            raise ValueError("reweight needs a word of the target prompt (and its strength)")
        blend = tuple(w.strip() for w in self.blend_words.split(",") if w.strip())
        return EditSpec(
            inversion,
            self.target_prompt,
            self.edit,
            round(float(self.cross_steps), 6),
            round(float(self.self_steps), 6),
            reweight,
            blend,
            round(float(self.blend_threshold), 6),
        )

    def requested_state(self):
        try:
            return self._spec()
        except ValueError as error:
            return ("invalid", str(error))

    # -- computing: before LabWidget's refresh, so that busy and the progress bar reach the browser --------

    @traitlets.observe(*requested_traits)
    def _compute_before_answering(self, change) -> None:
        # As widgets.guidance: an uncached state is computed here, outside refresh()'s hold_sync, so busy and
        # progress are sent while it runs; refresh() then answers from the cache.
        if getattr(self, "_quiet", 1):
            return
        spec = self.requested_state()
        if spec == self._answered_state:  # back to what is on display: asked again, a failed state runs again
            self._failure = None
            self.show_message("")
        elif isinstance(spec, EditSpec) and spec not in self._cache:
            if self._failure is not None and self._failure[0] == spec:
                return  # failed already for another trait of the same change: answer_request() shows why
            try:
                self._result_of(spec)
            except Exception:
                pass  # working() has shown it; answer_request() shows it again

    def _result_of(self, spec: EditSpec) -> EditingResult:
        if spec in self._cache:
            self._cache.move_to_end(spec)
            return self._cache[spec]
        steps, invert = spec.inversion.num_inference_steps, spec.inversion not in self._inversions
        coupled = 2 if spec.inversion.method == "edict" else 1
        total = steps * coupled  # the edit
        if invert:  # + the inversion (null-text: at most every inner step) + its reconstruction
            inner = 12 if spec.inversion.method == "null_text" else 0
            total += steps * coupled * 2 + steps * inner
        failure = "inversion failed" if invert else "edit failed"
        self._failure = None
        try:
            with (
                self.working("inverting…" if invert else "editing…", failure=failure) as progress,
                progress_bars_off(self.pipe),
                UNetCalls(self.pipe, progress, total),
            ):
                entry = self._inversion_of(spec.inversion)
                started = time.perf_counter()
                self.pipeline_runs += 1
                edit = run_prompt_to_prompt(self.pipe, spec, entry["inversion"])
                seconds = {"inversion": entry["seconds"], "edit": time.perf_counter() - started}
        except Exception as error:
            self._failure = (spec, self.message or f"{failure}: {type(error).__name__}: {error}")
            raise
        result = EditingResult(entry["inversion"], entry["reconstruction"], entry["psnr"], edit, seconds)
        result.display = self._display(result, spec)
        self._cache[spec] = result
        self._computed = spec
        while len(self._cache) > MAX_EDITS:
            self._cache.popitem(last=False)
        return result

    def _inversion_of(self, spec: InversionSpec) -> dict:
        """{"inversion", "reconstruction", "psnr", "seconds"} (cached)."""
        import lab.inversion

        if spec in self._inversions:
            self._inversions.move_to_end(spec)
            return self._inversions[spec]
        started = time.perf_counter()
        invert = getattr(lab.inversion, f"{spec.method}_inversion")
        self.pipeline_runs += 1
        inversion = invert(
            self.pipe,
            self._source_image(spec.image),
            spec.prompt,
            num_inference_steps=spec.num_inference_steps,
            guidance_scale=spec.guidance_scale,
            progress=False,
        )
        self.pipeline_runs += 1
        images, _ = inversion.reconstruct(self.pipe, output_type="np", progress=False)
        source = inversion.image_arrays[0]
        entry = {
            "inversion": inversion,
            "reconstruction": images[0],
            "psnr": psnr(source, images[0]),
            "seconds": time.perf_counter() - started,
        }
        self._inversions[spec] = entry
        while len(self._inversions) > MAX_INVERSIONS:
            self._inversions.popitem(last=False)
        return entry

    def _source_image(self, key: tuple):
        if key[0] == "upload":
            return self._uploads[key[1]]["image"]
        from lab.tinyworld.world import render, sample_scene

        return render(sample_scene(int(key[1]))).image

    def answer_request(self) -> None:
        spec = self.requested_state()
        if not isinstance(spec, EditSpec):
            raise Unanswerable(spec[1])
        # A failure is kept until the controls come back to what is on display: one change of several traits
        # (an upload sets source and upload_id) observes each of them, and must not run the failing job again.
        if spec not in self._cache and self._failure is not None and self._failure[0] == spec:
            raise Unanswerable(self._failure[1])
        try:
            result = self._result_of(spec)
        except Exception as error:
            raise Unanswerable(self._failure[1] if self._failure else f"{type(error).__name__}: {error}") from None
        from_cache, self._computed = self._computed != spec, None
        for name, value in result.display.items():
            setattr(self, name, value)
        self.step = min(max(self.step, 0), max(len(self.mask_frames) - 1, 0))
        self.from_cache = from_cache
        self.result = result
        self.cached_note = f"cached: {len(self._inversions)} inversions, {len(self._cache)} edits"
        self.shown_version += 1

    # -- what the browser gets -------------------------------------------------------------------------

    def _display(self, result: EditingResult, spec: EditSpec) -> dict:
        """PNGs, differences, the mask frames and the labels of a result, encoded once."""
        source = result.inversion.image_arrays[0]
        edit_source, edited = result.edit.image_arrays[0], result.edit.image_arrays[-1]
        pngs = [png_bytes(Image.fromarray(a), MAX_SENT_SIZE) for a in (source, result.reconstruction)]
        pngs += [png_bytes(Image.fromarray(a), MAX_SENT_SIZE) for a in (edit_source, edited)]
        sent = Image.open(io.BytesIO(pngs[0])).size
        recon_change = np.abs(result.reconstruction.astype(np.float32) - source).max(-1) / 255.0
        edit_change = np.abs(edited.astype(np.float32) - edit_source).max(-1) / 255.0
        inv, label = spec.inversion, METHODS[spec.inversion.method]["label"]
        where = f"seed {inv.image[1]}" if inv.image[0] == "seed" else self._uploads[inv.image[1]]["name"]
        display = {
            "source_png": pngs[0],
            "reconstruction_png": pngs[1],
            "edit_source_png": pngs[2],
            "edited_png": pngs[3],
            "reconstruction_difference": heat_bytes(recon_change, sent),
            "edit_difference": heat_bytes(edit_change, sent),
            "sent_size": list(sent),
            "inversion_label": (
                f"{label} inversion of {where} · {inv.num_inference_steps} steps · guidance {inv.guidance_scale:g} · "
                f"{result.seconds['inversion']:.1f} s"
            ),
            "reconstruction_label": (
                f"PSNR {result.reconstruction_psnr:.1f} dB against the source · mean |Δ| {recon_change.mean():.3f}"
            ),
            "edit_label": f"{result.edit.settings['edit']} · “{spec.target_prompt}” · {result.seconds['edit']:.1f} s",
            "difference_label": f"max over RGB |edit − source|: mean {edit_change.mean():.3f}",
            "mask_frames": [],
            "mask_size": [0, 0],
            "mask_notes": [],
            "blend_panels": [],
        }
        masks = result.edit.masks
        if masks is not None:
            frames = masks[:, 0].float().numpy()
            height, width = frames.shape[-2:]
            start = int(result.edit.settings["blend_start"] * len(frames))  # lab.p2p's first blended step
            display["mask_frames"] = [heat_bytes(frame, (width, height)) for frame in frames]
            display["mask_size"] = [int(width), int(height)]
            display["mask_notes"] = [
                f"{int(frame.sum())} of {height * width} latent positions follow the edit"
                + ("" if i >= start else " (before blend_start: no blend yet)")
                for i, frame in enumerate(frames)
            ]
            maps = result.edit.blend_maps[0].float().numpy()  # (2, h', w'): source's, target's
            display["blend_panels"] = [
                {"label": f"{who}: {', '.join(spec.local_blend)}", "width": int(m.shape[1]), "height": int(m.shape[0]),
                 "frame": heat_bytes(m, (m.shape[1], m.shape[0]))}
                for who, m in zip(("source's attention", "target's attention"), maps)
            ]  # fmt: skip
        return display

    # -- a still picture (snapshot, static copy for exported notebooks) --------------------------------

    def snapshot(self, size: int | None = None) -> Image.Image:
        """Source, reconstruction, P2P's source, edit, |edit − source| and the LocalBlend mask of the current step,
        `size` pixels wide each, drawn from what the browser was sent, labels above."""
        size = size or self.display_size
        width, height = self.sent_size
        tall = round(size * height / max(width, 1))
        table = np.frombuffer(self.colormap_tables[self.colormap], dtype=np.uint8).reshape(256, 3).astype(np.float32)
        edited = Image.open(io.BytesIO(self.edited_png)).convert("RGB")
        tiles = [
            ("source", Image.open(io.BytesIO(self.source_png)).convert("RGB")),
            ("reconstruction", Image.open(io.BytesIO(self.reconstruction_png)).convert("RGB")),
            ("P2P source row", Image.open(io.BytesIO(self.edit_source_png)).convert("RGB")),
            ("edit", edited),
            ("|edit − source|", coloured(np.frombuffer(self.edit_difference, np.uint8).reshape(height, width), table)),
        ]
        if self.mask_frames:
            w, h = self.mask_size
            frame = np.frombuffer(self.mask_frames[min(self.step, len(self.mask_frames) - 1)], np.uint8).reshape(h, w)
            inside = np.asarray(Image.fromarray(frame).resize((width, height), Image.NEAREST))[..., None] > 127
            base = np.asarray(edited, dtype=np.float32)
            view = np.where(inside, (1 - self.opacity) * base + self.opacity * table[-1], base * 0.45)
            tiles.append((f"LocalBlend mask, step {self.step}", Image.fromarray(view.astype(np.uint8))))
        return labelled_strip(tiles, size, tall)

    def static_picture(self) -> Image.Image | None:
        return self.snapshot(128) if self.edited_png else None

    def static_caption(self) -> str:
        return f"Editing explorer — “{self.source_prompt}” → “{self.target_prompt}” · {self.inversion_label}"
