"""The guidance explorer: one prompt and seed, plain against guided, and what the guidance method reads.

    import widgets
    explorer = widgets.GuidanceExplorer()                   # embedded model, "a red circle left of a blue square"
    explorer                                                # last line of a cell: shows it
    explorer.show("pag", 5.0)                               # what choosing PAG at scale 5 in the browser does
    explorer.result.data["difference"]                      # PAG's |cond - perturbed| per step, as tensors
    explorer.cached_scales()                                # the scales computed for these settings

Four methods, each through lab's own context manager or function, on the pipeline's own call:

    method          scale slider                                  what is shown beside the images
    Attend-and-     scale_factor α of lab.attend_and_excite       each subject's smoothed cross-attention map per
    Excite          (0: no update, the plain trajectory read)     step, and its per-step maximum, guided (solid)
                                                                  and plain (dashed), update steps shaded
    SAG             s of lab.sag                                  its mask per step (sag.masks), over the image
    PAG             s of lab.pag                                  the perturbed layers (pag.layers) and the
                                                                  per-step map mean over channels |cond - perturbed|
    FreeU           a strength t in [0, 1] of the chosen preset:  at each merge site FreeU edits, per step: mean
                    b = 1 + t (b_preset - 1), s = 1 + t (s_preset  over channels of |backbone| before and after
                    - 1) for both stages; t = 1 is the preset,    FreeU, |skip| and what its low-frequency filter
                    t = 0 changes nothing                         took away, and both as numbers

Why t for FreeU: a preset is four numbers (b1, b2, s1, s2); one slider moving all four along the straight
line from "off" (1, 1, 1, 1) to the preset keeps the preset's proportions, and its end is the published
setting. (Sliding b1 alone would leave s2 = 0.2, the strongest of FreeU's changes, fixed.)

Caching: every result is kept per (method, scale, prompt, seed, guidance, steps, the method's options), and
the plain image per (prompt, seed, guidance, steps), so scrubbing through scales already computed redraws at
once (the kernel answers from the cache: no pipeline call, `pipeline_runs` unchanged). An uncomputed scale
runs the plain image (if needed) and the guided one, busy with a progress bar over the denoising steps; the
browser keeps one request in flight, latest wins (widgets.base).

What the method reads is captured in the same generation through lab's hooks, no extra model code:
  - Attend-and-Excite: a lab.trace capture of the cross-attention probabilities at the attn_res x attn_res
    sites (rows "cond", heads averaged; the pipeline's own calls, not A&E's gradient passes), turned into
    the paper's smoothed subject maps by lab.attend_excite.subject_maps. So the guided curve is read after
    each step's update (what the update achieved) and the plain curve on the plain generation. A&E's own
    reading before its updates is in `result.details.max_attention`.
  - SAG: `sag.masks`. PAG: an edit of the UNet's output registered before lab.pag, which reads the cond and
    perturbed rows and returns them unchanged. FreeU: edits at the merge sites of FreeU's two stages that
    read "backbone" and "skip" and return them unchanged, one registered before lab.freeu (before) and one
    after (after: edits run in registration order).

Errors (a subject word not in the prompt, a PAG layer that is not self-attention...) are shown in the message
line; every hook is removed whatever happens (`lab.active_hooks(pipe) == []`).
"""

from __future__ import annotations

import io
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import traitlets
from PIL import Image

from widgets.base import (
    COLORMAPS,
    MAX_SENT_SIZE,
    LabWidget,
    Unanswerable,
    as_numpy,
    colormap_tables,
    coloured,
    css,
    esm,
    heat_bytes,
    labelled_strip,
    png_bytes,
    progress_bars_off,
)

__all__ = ["GuidanceExplorer", "GuidanceResult", "METHODS", "DEFAULT_PROMPT", "freeu_values", "default_subjects"]

DEFAULT_PROMPT = "a red circle left of a blue square"
# The scale slider of each method: range, step, the value it opens on and what the scale is.
METHODS = {
    "attend_excite": dict(label="Attend-and-Excite", scale="scale factor α", min=0.0, max=60.0, step=5.0, default=20.0),
    "sag": dict(label="SAG", scale="scale s", min=0.0, max=2.0, step=0.25, default=0.75),
    "pag": dict(label="PAG", scale="scale s", min=0.0, max=8.0, step=0.5, default=3.0),
    "freeu": dict(label="FreeU", scale="strength t", min=0.0, max=1.0, step=0.1, default=1.0),
}
SCHEDULES = ("paper", "adapted")  # Attend-and-Excite: its defaults (made for 50 steps), or schedule_for(steps)
MAX_CACHED = 64  # results kept (least recently shown dropped first); a TinyWorld result is ~100 kB
MAX_PLAIN = 16  # plain images kept (with A&E's reading of their cross-attention: ~1.6 MB at 16x16, 20 steps)
CHANGED = 0.1  # a pixel "changed" when one of its channels moved by more than this share of the full range


def freeu_values(preset: dict, t: float) -> dict:
    """FreeU's (b1, b2, s1, s2) at strength t: each value moved from 1 (off) toward the preset's, by t."""
    return {name: 1.0 + t * (value - 1.0) for name, value in preset.items()}


def default_subjects(prompt: str) -> list[str]:
    """Attend-and-Excite's subjects when none are given: the TinyWorld shape words of the prompt, in order."""
    from lab.tinyworld.world import SHAPES

    words = [word.strip(".,;:!?").lower() for word in prompt.split()]
    return list(dict.fromkeys(word for word in words if word in SHAPES))


@dataclass(frozen=True)
class _Spec:
    """One cached result: the method, its scale, the generation's settings and the method's options."""

    method: str
    scale: float
    prompt: str
    seed: int
    guidance_scale: float
    num_inference_steps: int
    options: tuple = ()  # (name, value) pairs

    @property
    def plain_key(self) -> tuple:
        return (self.prompt, self.seed, self.guidance_scale, self.num_inference_steps)

    def option(self, name: str):
        return dict(self.options)[name]


@dataclass
class GuidanceResult:
    """One guided generation and what the method read, as the explorer shows it.

    method, scale, settings  what was run (settings: prompt, seed, guidance, steps, the method's options)
    plain, guided            PIL images (plain: the same prompt, seed and guidance without the method)
    data                     the method's readings as tensors, one row per entry of `steps`:
        attend_excite  maps (steps, subjects, h, w), max_attention (steps, subjects), plain_maps,
                       plain_max_attention; subjects [(word, token)], updated [bool per step],
                       refinements [int per step]
        sag            masks (steps, h, w) bool, masked_share (steps,)
        pag            difference (steps, h, w): mean over channels |cond - perturbed| of the UNet output,
                       mean_difference (steps,), scales (steps,) s_t, layers [names]
        freeu          sites: per merge site of FreeU's stages, backbone_before / backbone_after / skip_before /
                       skip_removed (steps, h, w), mean over channels of |x| (skip_removed: |h - h'|),
                       backbone_mean_abs and skip_low_frequency_share (steps, 2) [before, after];
                       values: FreeU's {b1, b2, s1, s2} at this strength
    steps, timesteps         denoising step index and timestep of each row
    details                  the technique's own object: the AttendExciteResult, the lab.sag / lab.pag context
                             manager (masks, layers, scales), FreeU's values
    seconds                  time the generation(s) took
    """

    method: str
    scale: float
    settings: dict
    plain: Image.Image
    guided: Image.Image
    data: dict
    steps: list[int]
    timesteps: list[int]
    details: Any = None
    seconds: float = 0.0
    display: dict = field(default_factory=dict, repr=False)  # what the browser is sent for it (pngs, frames)

    def __repr__(self):
        return (
            f"<GuidanceResult {METHODS[self.method]['label']} {METHODS[self.method]['scale']} = {self.scale:g}, "
            f"{len(self.steps)} steps, {self.seconds:.1f} s>"
        )


class _Steps:
    """callback_on_step_end for the pipeline: the widget's progress bar, counted over every generation of a job."""

    def __init__(self, progress, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, pipe, step, timestep, tensors):
        self.done += 1
        self.progress(self.done, self.total)
        return {}


class GuidanceExplorer(LabWidget):
    """Plain against guided generation for Attend-and-Excite, SAG, PAG and FreeU, with what each method reads.

    GuidanceExplorer(pipe=None, prompt=DEFAULT_PROMPT, *, method="attend_excite", scale=None, seed=0,
                     num_inference_steps=20, guidance_scale=5.0, subjects=None, schedule="paper",
                     layers="mid", preset=None, attn_res=None)

    - pipe: any SD 1.x / 2.x / XL text-to-image pipeline (None: the embedded TinyWorld model).
    - method: "attend_excite", "sag", "pag" or "freeu"; scale: its scale (None: METHODS[method]["default"]).
    - subjects (A&E): words of the prompt to excite, a list or "circle, square" (None: the prompt's TinyWorld
      shape words); schedule: "paper" (lab.attend_and_excite's defaults) or "adapted" (schedule_for(steps));
      attn_res: the cross-attention map size read (None: the paper's 16).
    - layers (PAG): a lab selector of self-attention layers (default "mid", diffusers' and the paper's).
    - preset (FreeU): a lab.FREEU_PRESETS key (None: the pipeline's family, lab.freeu's preset_for(pipe)).

    From Python: `show(method, scale)`, `result` (the GuidanceResult on display), `compute(method, scale)`,
    `cached_scales()`, `snapshot()`; every control is a trait (method, prompt, seed, guidance_scale, ...; the
    scale of each method is in `scales`, the current one is `scale`).
    """

    _esm = esm("guidance.js")
    _css = css("guidance.css")
    static_css_class = "sdlab-explorer-static sdlab-guidance-static"
    static_note = "Static copy of the guidance explorer: run the notebook in JupyterLab to change method and scale."
    requested_traits = (
        "method",
        "scales",
        "prompt",
        "seed",
        "guidance_scale",
        "num_inference_steps",
        "subjects",
        "ae_schedule",
        "pag_layers",
        "freeu_preset",
    )

    # -- what the browser draws (set by Python) ---------------------------------------------------------
    method_info = traitlets.Dict().tag(sync=True)  # METHODS
    freeu_presets = traitlets.Dict().tag(sync=True)  # name -> {b1, b2, s1, s2}
    colormap_tables = traitlets.Dict().tag(sync=True)
    plain_png = traitlets.Bytes(b"").tag(sync=True)
    guided_png = traitlets.Bytes(b"").tag(sync=True)
    difference = traitlets.Bytes(b"").tag(sync=True)  # max over channels |guided - plain| / 255, a byte a pixel
    sent_size = traitlets.List(traitlets.Int(), [0, 0]).tag(sync=True)  # [width, height] of the PNGs
    result_label = traitlets.Unicode("").tag(sync=True)
    difference_label = traitlets.Unicode("").tag(sync=True)
    overlay_steps = traitlets.List(traitlets.Int()).tag(sync=True)  # the denoising step of each frame
    overlay_timesteps = traitlets.List(traitlets.Int()).tag(sync=True)
    # Panels: {label, group, width, height, mode ("heat" | "mask"), over ("guided" | "none"), frames: [bytes]}
    overlay_panels = traitlets.List(traitlets.Dict()).tag(sync=True)
    # Lines of the small plot: {label, group, values: [float | None per frame], dashed, color, ymax}
    overlay_series = traitlets.List(traitlets.Dict()).tag(sync=True)
    overlay_shaded = traitlets.List(traitlets.Int()).tag(sync=True)  # frames shaded in the plot (A&E's updates)
    overlay_notes = traitlets.List(traitlets.Unicode()).tag(sync=True)  # one line per frame
    group_notes = traitlets.Dict().tag(sync=True)  # group -> one line per frame (FreeU: per merge site)
    overlay_groups = traitlets.List(traitlets.Unicode()).tag(sync=True)  # e.g. FreeU's merge sites
    overlay_text = traitlets.Unicode("").tag(sync=True)  # what the panels are (e.g. PAG's layers)
    plot_label = traitlets.Unicode("").tag(sync=True)
    cached = traitlets.List(traitlets.Float()).tag(sync=True)  # scales computed for the current settings
    from_cache = traitlets.Bool(False).tag(sync=True)  # the last answer came from the cache
    pipeline_runs = traitlets.Int(0).tag(sync=True)  # pipeline calls this widget made
    shown_version = traitlets.Int(0).tag(sync=True)  # +1 with every answer (the browser redraws once)

    # -- what the controls choose (either side may set them) ---------------------------------------------
    method = traitlets.Unicode("attend_excite").tag(sync=True)
    scales = traitlets.Dict().tag(sync=True)  # method -> its scale (the slider of each method keeps its own)
    prompt = traitlets.Unicode(DEFAULT_PROMPT).tag(sync=True)
    seed = traitlets.Int(0).tag(sync=True)
    guidance_scale = traitlets.Float(5.0).tag(sync=True)
    num_inference_steps = traitlets.Int(20).tag(sync=True)
    subjects = traitlets.Unicode("").tag(sync=True)  # A&E, comma-separated; "": the prompt's shape words
    ae_schedule = traitlets.Unicode("paper").tag(sync=True)
    pag_layers = traitlets.Unicode("mid").tag(sync=True)
    freeu_preset = traitlets.Unicode("sd15").tag(sync=True)
    step = traitlets.Int(0).tag(sync=True)  # frame of the overlay (browser-side; kept for snapshot())
    group = traitlets.Unicode("").tag(sync=True)  # overlay group on display
    opacity = traitlets.Float(0.55).tag(sync=True)
    colormap = traitlets.Unicode("jet").tag(sync=True)
    display_size = traitlets.Int(192).tag(sync=True)

    def __init__(
        self,
        pipe=None,
        prompt: str = DEFAULT_PROMPT,
        *,
        method: str = "attend_excite",
        scale: float | None = None,
        seed: int = 0,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        subjects=None,
        schedule: str = "paper",
        layers: str = "mid",
        preset: str | None = None,
        attn_res: int | None = None,
        **kwargs,
    ):
        import lab
        from lab.attend_excite import PAPER
        from lab.freeu import preset_for

        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if pipe is None:
            pipe = lab.load_pipeline()
            pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.attn_res = attn_res if attn_res is not None else PAPER["attn_res"]
        self._cache: OrderedDict[_Spec, GuidanceResult] = OrderedDict()
        self._plain: OrderedDict[tuple, dict] = OrderedDict()
        self._failure: tuple[_Spec, str] | None = None  # the last computation that failed, and why
        self._computed: _Spec | None = None  # what the last computation made (the next answer is not cached)
        self.result: GuidanceResult | None = None
        scales = {name: info["default"] for name, info in METHODS.items()}
        if scale is not None:
            scales[method] = float(scale)
        if isinstance(subjects, (list, tuple)):
            subjects = ", ".join(subjects)
        super().__init__(
            method_info=METHODS,
            freeu_presets=dict(lab.FREEU_PRESETS),
            colormap_tables=colormap_tables(COLORMAPS),
            **kwargs,
        )
        with self.quietly(), self.hold_trait_notifications():  # the controls set, nothing computed yet
            self.method, self.scales, self.prompt, self.seed = method, scales, prompt, seed
            self.guidance_scale, self.num_inference_steps = float(guidance_scale), num_inference_steps
            self.subjects, self.ae_schedule, self.pag_layers = subjects or "", schedule, layers
            self.freeu_preset = preset if preset is not None else preset_for(pipe)
        self.refresh()  # the first result, computed now: the widget opens on it

    # -- from Python -----------------------------------------------------------------------------------

    @property
    def scale(self) -> float:
        """The current method's scale (a view of scales[method])."""
        return self.scales[self.method]

    @scale.setter
    def scale(self, value: float) -> None:
        self.scales = {**self.scales, self.method: float(value)}

    def show(self, method: str | None = None, scale: float | None = None) -> GuidanceResult | None:
        """Choose a method and/or its scale, as the browser's controls do; computes unless cached. Returns the
        result on display."""
        with self.hold_trait_notifications():
            if method is not None:
                self.method = method
            if scale is not None:
                self.scales = {**self.scales, self.method: float(scale)}
        if self.message:
            raise RuntimeError(self.message)
        return self.result

    def compute(self, method: str | None = None, scale: float | None = None) -> GuidanceResult:
        """The result of a method at a scale with the current settings (cached), without showing it."""
        spec = self._spec(method or self.method, scale)
        return self._result_of(spec)

    def cached_scales(self, method: str | None = None) -> list[float]:
        """The scales of `method` (default the current one) computed for the current settings."""
        spec = self._spec(method or self.method)
        same = [cached for cached in self._cache if cached == _with_scale(cached, spec)]
        return sorted(cached.scale for cached in same)

    # -- the cache key of the current controls ---------------------------------------------------------

    def _spec(self, method: str, scale: float | None = None) -> _Spec:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
        scale = self.scales.get(method, METHODS[method]["default"]) if scale is None else scale
        if method == "attend_excite":
            words = [word.strip() for word in self.subjects.split(",") if word.strip()]
            options = (("subjects", tuple(words or default_subjects(self.prompt))), ("schedule", self.ae_schedule))
        elif method == "pag":
            options = (("layers", self.pag_layers.strip()),)
        elif method == "freeu":
            options = (("preset", self.freeu_preset),)
        else:
            options = ()
        return _Spec(
            method,
            round(float(scale), 6),
            self.prompt,
            int(self.seed),
            round(float(self.guidance_scale), 6),
            int(self.num_inference_steps),
            options,
        )

    def requested_state(self):
        try:
            return self._spec(self.method)
        except ValueError:
            return ("unknown method", self.method)

    # -- computing: before LabWidget's refresh, so that busy and the progress bar reach the browser --------

    @traitlets.observe(*requested_traits)
    def _compute_before_answering(self, change) -> None:
        # Runs before LabWidget's request observer (registered in its __init__, after this one): an uncached
        # state is computed here, outside the hold_sync of refresh(), so busy and progress are sent as it
        # runs; refresh() then answers from the cache. A failure is kept for answer_request to show.
        if getattr(self, "_quiet", 1):  # (also while LabWidget.__init__ runs)
            return
        spec = self.requested_state()
        if spec == self._answered_state:  # back to what is on display: a failure of another state no longer applies
            self.show_message("")
        elif isinstance(spec, _Spec) and spec not in self._cache:
            try:
                self._result_of(spec)
            except Exception:
                pass  # working() has shown it; answer_request() shows it again (and keeps the old result)

    def _result_of(self, spec: _Spec) -> GuidanceResult:
        """The cached result of spec, or a new one (busy, progress bar over the denoising steps)."""
        if spec in self._cache:
            self._cache.move_to_end(spec)
            return self._cache[spec]
        plain_needed = spec.plain_key not in self._plain or (
            spec.method == "attend_excite" and self._plain[spec.plain_key].get("attention") is None
        )
        total = spec.num_inference_steps * (2 if plain_needed else 1)
        label = METHODS[spec.method]["label"]
        self._failure = None
        try:
            with (
                self.working(f"{label}…", failure=f"{label} failed") as progress,
                progress_bars_off(self.pipe),
            ):
                started = time.perf_counter()
                steps = _Steps(progress, total)
                result = getattr(self, f"_run_{spec.method}")(spec, steps)
                result.seconds = time.perf_counter() - started
        except Exception as error:
            self._failure = (spec, self.message or f"{label} failed: {type(error).__name__}: {error}")
            raise
        result.display = self._display(result)
        self._cache[spec] = result
        self._computed = spec
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        return result

    def answer_request(self) -> None:
        spec = self.requested_state()
        if not isinstance(spec, _Spec):
            raise Unanswerable(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        failure, self._failure = self._failure, None  # once: asked again later, it is computed again
        if spec not in self._cache and failure is not None and failure[0] == spec:
            raise Unanswerable(failure[1])
        try:
            result = self._result_of(spec)
        except Exception as error:  # e.g. refresh(force=True) of a state that cannot be computed
            raise Unanswerable(self._failure[1] if self._failure else f"{type(error).__name__}: {error}") from None
        from_cache, self._computed = self._computed != spec, None
        self._show_result(result, from_cache)

    # -- the generations -------------------------------------------------------------------------------

    def _generate(self, spec: _Spec, steps: _Steps, **extra):
        """One pipeline call with the spec's prompt, seed, guidance and steps; counted in pipeline_runs."""
        self.pipeline_runs += 1
        return self.pipe(
            spec.prompt,
            num_inference_steps=spec.num_inference_steps,
            guidance_scale=spec.guidance_scale,
            generator=torch.Generator().manual_seed(spec.seed),
            callback_on_step_end=steps,
            **extra,
        )

    def _plain_image(self, spec: _Spec, steps: _Steps, *, attention: bool = False) -> dict:
        """{"image", "attention"} of the plain generation (cached). attention=True: with A&E's reading of the
        cross-attention maps, (steps, h*w, keys), captured in the same call."""
        import lab

        key = spec.plain_key
        cached = self._plain.get(key)
        if cached is not None and (cached["attention"] is not None or not attention):
            self._plain.move_to_end(key)
            return cached
        if attention:
            with lab.trace(self.pipe) as tr:
                capture = self._capture_attention(tr)
                image = self._generate(spec, steps).images[0]
                attention_maps = self._attention(capture)
        else:
            image, attention_maps = self._generate(spec, steps).images[0], None
        entry = {"image": image, "attention": attention_maps}
        self._plain[key] = entry
        while len(self._plain) > MAX_PLAIN:
            self._plain.popitem(last=False)
        return entry

    def _timesteps(self) -> list[int]:
        return [int(t) for t in self.pipe.scheduler.timesteps]

    # Attend-and-Excite ---------------------------------------------------------------------------------

    def _capture_attention(self, tr):
        """A&E's sites (cross-attention at attn_res x attn_res), the pipeline's cond rows, heads averaged."""
        import lab

        size = f"{self.attn_res}x{self.attn_res}"
        return tr.capture(f"cross {size}", "probs", reduce=lab.Stack(over=("heads",)), rows="cond")

    def _attention(self, capture) -> torch.Tensor:
        """(steps, h*w, keys): the captured maps averaged over sites and heads, every (site, head) alike, as
        Attend-and-Excite averages them."""
        import lab

        heads = {site.name: site.module.heads for site in lab.sites(self.pipe) if site.is_attention}
        maps = capture.result()
        total = sum(heads[name] for name in maps)
        return sum(heads[name] * probs[:, 0] for name, probs in maps.items()) / total

    def _subject_columns(self, spec: _Spec) -> tuple[list[tuple[str, int]], int]:
        """[(word, token)] of the subjects (each piece and occurrence of a word a column, as lab.attend_and_excite
        takes them), and where the text tokens of its softmax end (normalize_eot "auto")."""
        import lab

        words = spec.option("subjects")
        if not words:
            raise ValueError(
                "Attend-and-Excite needs subjects: type the words of the prompt to excite, e.g. 'circle, square' "
                "(the default finds TinyWorld's shape words, and this prompt has none)"
            )
        columns: list[tuple[str, int]] = []
        for word in words:
            try:
                positions = lab.token_indices(self.pipe, spec.prompt, word)
            except ValueError as error:
                raise ValueError(f"subject {word!r}: {error}") from None
            columns += [(word, p) for p in positions if p not in [q for _, q in columns]]
        tokenizer = self.pipe.tokenizer
        end = -1
        if tokenizer.pad_token != tokenizer.eos_token:  # SD 2.x: the prompt's own tokens only (normalize_eot)
            end = len(tokenizer(spec.prompt, truncation=True)["input_ids"]) - 1
        return columns, end

    def _subject_maps(self, attention: torch.Tensor, columns, end: int) -> torch.Tensor:
        """(steps, subjects, h, w): lab.attend_excite.subject_maps of every step's averaged maps."""
        from lab.attend_excite import subject_maps

        size = (self.attn_res, self.attn_res)
        tokens = [token for _, token in columns]
        return torch.stack([subject_maps([step[None, None]], tokens, end, size) for step in attention])

    def _run_attend_excite(self, spec: _Spec, steps: _Steps) -> GuidanceResult:
        import lab
        from lab.attend_excite import schedule_for

        columns, end = self._subject_columns(spec)  # a word not in the prompt: an error before anything runs
        plain = self._plain_image(spec, steps, attention=True)
        schedule = schedule_for(spec.num_inference_steps) if spec.option("schedule") == "adapted" else {}
        details = None
        with lab.trace(self.pipe) as tr:
            capture = self._capture_attention(tr)
            if spec.scale > 0:
                self.pipeline_runs += 1
                details = lab.attend_and_excite(
                    self.pipe,
                    spec.prompt,
                    list(spec.option("subjects")),
                    scale_factor=spec.scale,
                    attn_res=self.attn_res,
                    num_inference_steps=spec.num_inference_steps,
                    guidance_scale=spec.guidance_scale,
                    generator=torch.Generator().manual_seed(spec.seed),
                    callback_on_step_end=steps,
                    **schedule,
                )
                guided = details.images[0]
            else:  # no update: the plain trajectory (its maps are the plain ones)
                guided = self._generate(spec, steps).images[0]
            attention = self._attention(capture)
        maps = self._subject_maps(attention, columns, end)
        plain_maps = self._subject_maps(plain["attention"], columns, end)
        count = spec.num_inference_steps
        updated, refinements = [False] * count, [0] * count
        if details is not None:
            last = details.settings["max_iter_to_alter"]
            for row, step in enumerate(details.steps):
                updated[step] = step < last
                refinements[step] = int(details.refinements[row, 0])
        data = {
            "maps": maps,
            "max_attention": maps.flatten(2).amax(2),
            "plain_maps": plain_maps,
            "plain_max_attention": plain_maps.flatten(2).amax(2),
            "subjects": columns,
            "updated": updated,
            "refinements": refinements,
        }
        settings = {**_settings(spec), **(details.settings if details is not None else {})}
        return GuidanceResult(
            spec.method,
            spec.scale,
            settings,
            plain["image"],
            guided,
            data,
            list(range(count)),
            self._timesteps(),
            details,
        )

    # SAG ---------------------------------------------------------------------------------------------

    def _run_sag(self, spec: _Spec, steps: _Steps) -> GuidanceResult:
        import lab

        plain = self._plain_image(spec, steps)
        with lab.sag(self.pipe, scale=spec.scale) as sag:
            guided = self._generate(spec, steps).images[0]
        masks = torch.stack([mask[0] for mask in sag.masks])
        data = {"masks": masks, "masked_share": masks.flatten(1).float().mean(1)}
        return GuidanceResult(
            spec.method,
            spec.scale,
            _settings(spec),
            plain["image"],
            guided,
            data,
            list(range(len(masks))),
            self._timesteps(),
            sag,
        )

    # PAG ---------------------------------------------------------------------------------------------

    def _run_pag(self, spec: _Spec, steps: _Steps) -> GuidanceResult:
        import lab

        plain = self._plain_image(spec, steps)
        differences = []

        def read_cond_and_perturbed(prediction, ctx):
            """Mean over channels |cond - perturbed| of the first image; the prediction unchanged."""
            cond, perturbed = list(ctx.rows("cond")), list(ctx.rows("perturbed"))
            difference = (prediction[cond[0]] - prediction[perturbed[0]]).float().abs().mean(0)
            differences.append(difference.cpu())
            return prediction

        with lab.trace(self.pipe) as tr:
            # Registered before lab.pag's own edit of the output: it sees the rows before PAG folds its term.
            tr.edit("unet", "output", read_cond_and_perturbed, rows="all", passes="main")
            with lab.pag(self.pipe, scale=spec.scale, layers=spec.option("layers")) as pag:
                guided = self._generate(spec, steps).images[0]
        difference = torch.stack(differences)
        data = {
            "difference": difference,
            "mean_difference": difference.flatten(1).mean(1),
            "scales": torch.tensor(pag.scales, dtype=torch.float32),
            "layers": list(pag.layers),
        }
        return GuidanceResult(
            spec.method,
            spec.scale,
            _settings(spec),
            plain["image"],
            guided,
            data,
            list(range(len(difference))),
            self._timesteps(),
            pag,
        )

    # FreeU -------------------------------------------------------------------------------------------

    def _run_freeu(self, spec: _Spec, steps: _Steps) -> GuidanceResult:
        import lab
        from lab.freeu import STAGES

        preset = spec.option("preset")
        if preset not in lab.FREEU_PRESETS:
            raise ValueError(f"unknown FreeU preset {preset!r}: choose one of {', '.join(lab.FREEU_PRESETS)}")
        values = freeu_values(lab.FREEU_PRESETS[preset], spec.scale)
        plain = self._plain_image(spec, steps)
        sites = [
            site.name
            for site in lab.sites(self.pipe)
            if site.kind == "merge" and site.name.rsplit(".resnets.", 1)[0] in STAGES
        ]
        records = {name: {} for name in sites}  # site -> UNet call -> {"backbone": (before, after), "skip": ...}
        before: dict[tuple[str, str], torch.Tensor] = {}

        def read_before(what):
            def reader(x, ctx):
                before[ctx.site.name, what] = x[0].float()  # the first image's cond rows
                return x

            reader.__name__ = f"read {what} before FreeU"
            return reader

        def read_after(what):
            def reader(x, ctx):
                was = before.pop((ctx.site.name, what))
                records[ctx.site.name].setdefault(ctx.call, {})[what] = (was.cpu(), x[0].float().cpu())
                return x

            reader.__name__ = f"read {what} after FreeU"
            return reader

        with lab.trace(self.pipe) as tr:
            for what in ("backbone", "skip"):
                tr.edit(sites, what, read_before(what), rows="cond", passes="main")
            with lab.freeu(self.pipe, **values):
                for what in ("backbone", "skip"):  # after FreeU's own edits (registration order)
                    tr.edit(sites, what, read_after(what), rows="cond", passes="main")
                guided = self._generate(spec, steps).images[0]
        readings = {name: _freeu_readings([calls[call] for call in sorted(calls)]) for name, calls in records.items()}
        data = {"sites": readings, "values": values}
        count = len(next(iter(records.values()))) if records else 0
        return GuidanceResult(
            spec.method,
            spec.scale,
            {**_settings(spec), "freeu": values},
            plain["image"],
            guided,
            data,
            list(range(count)),
            self._timesteps(),
            values,
        )

    # -- what the browser gets -------------------------------------------------------------------------

    def _display(self, result: GuidanceResult) -> dict:
        """PNGs, the difference and the overlay of a result, encoded once (a cached result is sent as is)."""
        plain_png, guided_png = png_bytes(result.plain, MAX_SENT_SIZE), png_bytes(result.guided, MAX_SENT_SIZE)
        sent = Image.open(io.BytesIO(guided_png)).size
        plain = np.asarray(result.plain.convert("RGB"), dtype=np.float32)
        guided = np.asarray(result.guided.convert("RGB"), dtype=np.float32)
        change = np.abs(guided - plain).max(axis=-1) / 255.0
        label = METHODS[result.method]
        display = {
            "plain_png": plain_png,
            "guided_png": guided_png,
            "difference": heat_bytes(change, sent),
            "sent_size": list(sent),
            "difference_label": (
                f"max over RGB |guided − plain|: mean {change.mean():.3f}, {(change > CHANGED).mean():.0%} of pixels "
                f"moved by more than {CHANGED:g}"
            ),
            "result_label": (
                f"{label['label']} · {label['scale']} = {result.scale:g} · seed {result.settings['seed']} · guidance "
                f"{result.settings['guidance_scale']:g} · {result.settings['num_inference_steps']} steps · "
                f"{result.seconds:.1f} s"
            ),
            "overlay_steps": list(result.steps),
            "overlay_timesteps": [result.timesteps[i] if i < len(result.timesteps) else -1 for i in result.steps],
        }
        display.update(getattr(self, f"_overlay_{result.method}")(result))
        return display

    def _overlay_attend_excite(self, result: GuidanceResult) -> dict:
        data = result.data
        words = [word for word, _ in data["subjects"]]
        names = _column_names(data["subjects"])
        panels = [
            _panel(f"“{name}”: smoothed attention (0–1)", data["maps"][:, k], mode="heat", over="guided")
            for k, name in enumerate(names)
        ]
        series = []
        for k, name in enumerate(names):
            series.append(_series(f"{name}: guided", data["max_attention"][:, k], color=k, ymax=1.0))
            series.append(_series(f"{name}: plain", data["plain_max_attention"][:, k], color=k, dashed=True, ymax=1.0))
        notes = []
        for row, step in enumerate(result.steps):
            values = ", ".join(
                f"{name} {float(data['max_attention'][row, k]):.2f} (plain {float(data['plain_max_attention'][row, k]):.2f})"
                for k, name in enumerate(names)
            )
            what = "A&E moved the latent before this step" if data["updated"][step] else "no A&E update"
            if data["refinements"][step]:
                what += f", after {data['refinements'][step]} refinement steps"
            notes.append(f"max attention: {values} · {what}")
        settings = result.settings
        if result.details is not None:
            last = min(settings["max_iter_to_alter"], settings["num_inference_steps"]) - 1
            updates = "no updates" if last < 0 else f"updates before steps 0–{last}"
            refinements = ", ".join(f"{tau:g} at step {step}" for step, tau in settings["thresholds"])
            schedule = f"{updates}; refinement until the max attention reaches {refinements or 'never'}"
        else:
            schedule = "scale 0: no update (the plain trajectory)"
        return {
            "overlay_panels": panels,
            "overlay_series": series,
            "overlay_shaded": [row for row, step in enumerate(result.steps) if data["updated"][step]],
            "overlay_notes": notes,
            "overlay_groups": [],
            "overlay_text": (
                f"subjects {', '.join(dict.fromkeys(words))}: each one's cross-attention ({self.attn_res}×{self.attn_res} "
                f"sites, softmax over the text tokens, Gaussian-smoothed), read from the pipeline's conditional pass "
                f"at every step. {schedule}."
            ),
            "plot_label": "max attention per step (solid: guided, dashed: plain; shaded: A&E updated the latent)",
        }

    def _overlay_sag(self, result: GuidanceResult) -> dict:
        data = result.data
        masks = data["masks"]
        h, w = masks.shape[-2:]
        notes = [
            f"{int(mask.sum())} of {h * w} positions masked: blurred in x̂₀ before the degraded pass" for mask in masks
        ]
        return {
            "overlay_panels": [
                _panel("SAG's mask (mid-block self-attention > 1)", masks.float(), mode="mask", over="guided")
            ],
            "overlay_series": [_series("share of positions masked", data["masked_share"], color=0, ymax=1.0)],
            "overlay_shaded": [],
            "overlay_notes": notes,
            "overlay_groups": [],
            "overlay_text": (
                f"mask on the {h}×{w} grid of {_short('mid_block.attentions.0.transformer_blocks.0.attn1')}: where the "
                "attention every position receives exceeds 1 (the uncond rows under CFG)"
            ),
            "plot_label": "share of the positions SAG blurs, per step",
        }

    def _overlay_pag(self, result: GuidanceResult) -> dict:
        data = result.data
        difference = data["difference"]
        peak = float(difference.max()) or 1.0
        notes = [
            f"mean |cond − perturbed| {float(mean):.4f} · s_t = {float(s):g}"
            for mean, s in zip(data["mean_difference"], data["scales"])
        ]
        return {
            "overlay_panels": [
                _panel(f"|cond − perturbed| (0–{peak:.3g})", difference / peak, mode="heat", over="guided")
            ],
            "overlay_series": [_series("mean |cond − perturbed|", data["mean_difference"], color=0)],
            "overlay_shaded": [],
            "overlay_notes": notes,
            "overlay_groups": [],
            "overlay_text": (
                f"perturbed layers (self-attention replaced by the identity): {', '.join(data['layers'])}. The map: "
                "mean over channels of the UNet's cond output minus its perturbed output, the term PAG adds × s_t"
            ),
            "plot_label": "mean |cond − perturbed| per step",
        }

    def _overlay_freeu(self, result: GuidanceResult) -> dict:
        panels, series, notes_of = [], [], {}
        sites = list(result.data["sites"])
        for name in sites:
            site = result.data["sites"][name]
            peak = max(float(site["backbone_before"].max()), float(site["backbone_after"].max())) or 1.0
            skip_peak = float(site["skip_before"].max()) or 1.0
            panels += [
                _panel(f"|backbone| before (0–{peak:.3g})", site["backbone_before"] / peak, group=name),
                _panel("|backbone| after FreeU", site["backbone_after"] / peak, group=name),
                _panel(f"|skip| before (0–{skip_peak:.3g})", site["skip_before"] / skip_peak, group=name),
                _panel("|skip − skip'|: what the filter removed", site["skip_removed"] / skip_peak, group=name),
            ]
            mean, low = site["backbone_mean_abs"], site["skip_low_frequency_share"]
            series += [
                _series("mean |backbone| before", mean[:, 0], color=0, dashed=True, group=name),
                _series("mean |backbone| after", mean[:, 1], color=0, group=name),
            ]
            notes_of[name] = [
                f"mean |backbone| {b0:.3f} → {b1:.3f} · skip low-frequency energy {100 * l0:.1f}% → {100 * l1:.1f}%"
                for (b0, b1), (l0, l1) in zip(mean.tolist(), low.tolist())
            ]
        values = result.data["values"]
        # One line per frame: the first site's numbers (the browser shows the chosen site's, see overlay_groups).
        notes = ["  |  ".join(f"{_short(name)}: {notes_of[name][row]}" for name in sites[:1]) for row in result.steps]
        return {
            "overlay_panels": panels,
            "overlay_series": series,
            "overlay_shaded": [],
            "overlay_notes": notes,
            "overlay_group_notes": {name: notes_of[name] for name in sites},
            "overlay_groups": sites,
            "overlay_text": (
                "FreeU at strength t: "
                + ", ".join(f"{name} = {value:.3g}" for name, value in values.items())
                + ". Mean over channels, first image's cond rows, at the merge site chosen; before and after FreeU's "
                "edits in the same call"
            ),
            "plot_label": "mean |backbone| per step (dashed: before FreeU, solid: after)",
        }

    def _show_result(self, result: GuidanceResult, from_cache: bool) -> None:
        """Everything the browser draws for a result, in one message (refresh() holds the sync)."""
        display = dict(result.display)
        group_notes = display.pop("overlay_group_notes", {})
        for name, value in display.items():
            setattr(self, name, value)
        self.group_notes = group_notes
        if self.group not in self.overlay_groups:
            self.group = self.overlay_groups[0] if self.overlay_groups else ""
        self.step = min(max(self.step, 0), max(len(self.overlay_steps) - 1, 0))
        self.from_cache = from_cache
        self.result = result
        self.cached = self.cached_scales()
        self.shown_version += 1

    # -- a still picture (snapshot, static copy for exported notebooks) --------------------------------

    def snapshot(self, size: int | None = None) -> Image.Image:
        """Plain, guided, difference and the overlay panels of the current step and group, `size` pixels wide each
        (default display_size), drawn from what the browser was sent, labels above."""
        size = size or self.display_size
        width, height = self.sent_size
        tall = round(size * height / max(width, 1))
        table = np.frombuffer(self.colormap_tables[self.colormap], dtype=np.uint8).reshape(256, 3).astype(np.float32)
        guided = np.asarray(Image.open(io.BytesIO(self.guided_png)).convert("RGB"), dtype=np.float32)
        tiles = [
            ("plain", Image.open(io.BytesIO(self.plain_png)).convert("RGB")),
            ("guided", Image.fromarray(guided.astype(np.uint8))),
            ("difference", coloured(np.frombuffer(self.difference, np.uint8).reshape(height, width), table)),
        ]
        for panel in self.overlay_panels:
            if panel.get("group", "") not in ("", self.group) or not panel["frames"]:
                continue
            frame = np.frombuffer(panel["frames"][min(self.step, len(panel["frames"]) - 1)], np.uint8)
            frame = frame.reshape(panel["height"], panel["width"])
            resample = Image.NEAREST if panel["mode"] == "mask" else Image.BILINEAR
            up = np.asarray(Image.fromarray(frame).resize((width, height), resample), dtype=np.float32)
            if panel["mode"] == "mask":
                inside = (up > 127)[..., None]
                view = np.where(inside, (1 - self.opacity) * guided + self.opacity * table[-1], guided * 0.45)
            elif panel["over"] == "guided":
                view = (1 - self.opacity) * guided + self.opacity * table[up.astype(np.uint8)]
            else:
                view = table[up.astype(np.uint8)]
            tiles.append((panel["label"], Image.fromarray(np.clip(view + 0.5, 0, 255).astype(np.uint8))))
        return labelled_strip(tiles, size, tall)

    def static_picture(self) -> Image.Image | None:
        return self.snapshot(160) if self.guided_png else None

    def static_caption(self) -> str:
        step = self.overlay_steps[self.step] if self.overlay_steps else 0
        note = self.overlay_notes[self.step] if self.step < len(self.overlay_notes) else ""
        return f"Guidance explorer — “{self.prompt}” · {self.result_label} · step {step}: {note}"


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def _with_scale(cached: _Spec, spec: _Spec) -> _Spec:
    """spec with cached's scale: equal to cached when they differ only by scale."""
    return _Spec(
        spec.method,
        cached.scale,
        spec.prompt,
        spec.seed,
        spec.guidance_scale,
        spec.num_inference_steps,
        spec.options,
    )


def _settings(spec: _Spec) -> dict:
    return {
        "prompt": spec.prompt,
        "seed": spec.seed,
        "guidance_scale": spec.guidance_scale,
        "num_inference_steps": spec.num_inference_steps,
        **dict(spec.options),
    }


def _panel(label: str, frames: torch.Tensor, *, mode: str = "heat", over: str = "none", group: str = "") -> dict:
    """A panel of the overlay: frames (steps, h, w) with values in 0..1, one byte a pixel at their own size."""
    frames = as_numpy(frames)
    height, width = frames.shape[-2:]
    return {
        "label": label,
        "group": group,
        "width": int(width),
        "height": int(height),
        "mode": mode,
        "over": over,
        "frames": [heat_bytes(np.nan_to_num(frame), (width, height)) for frame in frames],
    }


def _series(label: str, values, *, color: int, dashed: bool = False, group: str = "", ymax: float | None = None):
    values = [None if not math.isfinite(v) else round(float(v), 5) for v in as_numpy(values).tolist()]
    return {"label": label, "group": group, "values": values, "color": color, "dashed": dashed, "ymax": ymax}


def _column_names(columns: list[tuple[str, int]]) -> list[str]:
    """Column labels: the word, with its token position where a word has several columns."""
    counts = {}
    for word, _ in columns:
        counts[word] = counts.get(word, 0) + 1
    return [word if counts[word] == 1 else f"{word} (token {token})" for word, token in columns]


def _short(site: str) -> str:
    return site.replace("transformer_blocks.", "tb.").replace("attentions.", "attn.")


def _low_frequency_share(x: torch.Tensor) -> float:
    """Share of the spectrum's energy in the centred 2x2 box FreeU scales (benchmarks/guidance.py's measure)."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x).abs() ** 2, dim=(-2, -1))
    h, w = spectrum.shape[-2:]
    low = spectrum[..., h // 2 - 1 : h // 2 + 1, w // 2 - 1 : w // 2 + 1].sum()
    return float(low / spectrum.sum().clamp(min=1e-30))


def _freeu_readings(rows: list[dict]) -> dict:
    """Per step maps and numbers of one merge site from (before, after) tensors (channels, h, w)."""
    backbone = [row["backbone"] for row in rows]
    skip = [row["skip"] for row in rows]
    return {
        "backbone_before": torch.stack([b.abs().mean(0) for b, _ in backbone]).cpu(),
        "backbone_after": torch.stack([a.abs().mean(0) for _, a in backbone]).cpu(),
        "skip_before": torch.stack([b.abs().mean(0) for b, _ in skip]).cpu(),
        "skip_removed": torch.stack([(b - a).abs().mean(0) for b, a in skip]).cpu(),
        "backbone_mean_abs": torch.tensor([[float(b.abs().mean()), float(a.abs().mean())] for b, a in backbone]),
        "skip_low_frequency_share": torch.tensor([[_low_frequency_share(b), _low_frequency_share(a)] for b, a in skip]),
    }
