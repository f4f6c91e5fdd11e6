"""The attribution explorer: DAAM heat maps of one generation, explored live in Jupyter.

    import lab, widgets
    pipe = lab.pipelines.load_pipeline()                    # the embedded TinyWorld model
    explorer = widgets.AttributionExplorer(pipe, prompt="a red circle left of a blue square")
    explorer                                                # last line of a cell: shows it
    explorer.run                                            # the lab.daam run behind it, as a script gets it
    explorer.word = "square"; explorer.heat_map()           # drive it from Python too

Why scrubbing is instant: a generation is traced once, keeping the maps of every step, site and head
(`lab.daam.trace_generation(..., per_step=True, trajectory=True)`). Nothing the controls change afterwards
runs the model again:
  - word, step range, layer group, head, image: Python asks the run for that heat map (a few ms) and sends
    it to the browser as one byte per pixel;
  - opacity, colormap, threshold, mask, trajectory scrubber: the browser redraws on its own, without a round
    trip to the kernel (the colormaps' lookup tables and the x̂0 frames were sent once, with the run).
The front end is plain JavaScript shipped in this package (widgets/static/attribution.js, on the helpers of
widgets/static/base.js): no network. What all sdlab widgets share (busy/progress/message, the one-request-
in-flight throttle, encoders, the static copy) is widgets.base.LabWidget.
"""

from __future__ import annotations

import io

import numpy as np
import traitlets
from PIL import Image

from widgets.base import (
    COLORMAPS,
    MAX_SENT_SIZE,
    STATIC,  # noqa: F401  (where the front end's files are; kept importable from here)
    LabWidget,
    Unanswerable,
    as_numpy,
    colormap_tables,
    css,
    esm,
    heat_bytes,
    png_bytes,
)

DEFAULT_PROMPT = "a red circle left of a blue square"
MAX_TRAJECTORY_FRAME_SIZE = 256
# Words that rarely carry a map worth looking at first; the explorer opens on the prompt's first other word.
FUNCTION_WORDS = frozenset(
    "a an the of and or on in at to with without left right above below under over next behind front "
    "is are it its this that".split()
)

__all__ = ["AttributionExplorer", "COLORMAPS", "DEFAULT_PROMPT"]


def _trajectory(run, image: int) -> list[Image.Image]:
    """The x̂0 frames of one image; none for runs traced without per_step (lab.daam raises ValueError then)."""
    try:
        return run.x0[image]
    except ValueError:
        return []


def _first_content_word(words: list[str]) -> str:
    return next((word for word in words if word.lower() not in FUNCTION_WORDS), words[0] if words else "")


class AttributionExplorer(LabWidget):
    """Heat maps of which image regions attend to which prompt word, with every slice one control away.

    AttributionExplorer(pipe=None, run=None, prompt=None, *, seed=0, num_inference_steps=20, guidance_scale=5.0)

    - run given: explore it (a `lab.daam.trace_generation` result); pass pipe too to enable "generate".
    - pipe given, no run: generate `prompt` (default: a TinyWorld prompt) right away.
    - neither: load the embedded TinyWorld model and generate.

    busy / progress / progress_text / message and the request throttle (request, answered_request) come
    from widgets.base.LabWidget.
    """

    _esm = esm("attribution.js")
    _css = css("attribution.css")
    static_css_class = "sdlab-explorer-static"
    static_note = "Static copy of the attribution explorer: run the notebook in JupyterLab to explore."
    # The controls whose change asks the kernel for a new heat map (the browser sends them with a request).
    requested_traits = ("word", "occurrence", "step_start", "step_stop", "site_group", "head")

    # -- what the browser draws (set by Python) ---------------------------------------------------------
    image_png = traitlets.Bytes(b"").tag(sync=True)
    image_size = traitlets.List(traitlets.Int(), [0, 0]).tag(sync=True)  # [width, height] as sent
    image_prompt = traitlets.Unicode("").tag(sync=True)
    heat = traitlets.Bytes(b"").tag(sync=True)  # HeatMap.normalized(), one byte per pixel, row-major
    heat_label = traitlets.Unicode("").tag(sync=True)
    trajectory_pngs = traitlets.List(traitlets.Bytes()).tag(sync=True)  # x̂0 at each step
    colormap_tables = traitlets.Dict().tag(sync=True)  # name -> 768 bytes (256 RGB entries)
    words = traitlets.List(traitlets.Unicode()).tag(sync=True)
    num_images = traitlets.Int(0).tag(sync=True)
    num_steps = traitlets.Int(0).tag(sync=True)
    num_heads = traitlets.Int(0).tag(sync=True)  # heads of the chosen layer group
    can_slice = traitlets.Bool(True).tag(sync=True)  # False for runs traced without per_step (running means)
    site_group_names = traitlets.List(traitlets.Unicode()).tag(sync=True)
    can_generate = traitlets.Bool(False).tag(sync=True)

    # -- what the controls choose (either side may set them) ---------------------------------------------
    image_index = traitlets.Int(0).tag(sync=True)
    word = traitlets.Unicode("").tag(sync=True)  # a prompt word, or any word (open-vocabulary map)
    occurrence = traitlets.Int(-1).tag(sync=True)  # n-th occurrence of a repeated word (0-based); -1: all
    step_start = traitlets.Int(0).tag(sync=True)  # heat map over range(step_start, step_stop)
    step_stop = traitlets.Int(0).tag(sync=True)
    site_group = traitlets.Unicode("all").tag(sync=True)
    head = traitlets.Int(-1).tag(sync=True)  # -1: all heads
    opacity = traitlets.Float(0.5).tag(sync=True)
    colormap = traitlets.Unicode("jet").tag(sync=True)
    threshold = traitlets.Float(0.4).tag(sync=True)
    show_mask = traitlets.Bool(False).tag(sync=True)  # main view: the image dimmed outside the mask, no overlay
    trajectory_step = traitlets.Int(0).tag(sync=True)
    display_size = traitlets.Int(320).tag(sync=True)  # pixels on screen of the main view

    # -- the generate controls ---------------------------------------------------------------------------
    prompt = traitlets.Unicode(DEFAULT_PROMPT).tag(sync=True)
    seed = traitlets.Int(0).tag(sync=True)
    num_inference_steps = traitlets.Int(20).tag(sync=True)
    guidance_scale = traitlets.Float(5.0).tag(sync=True)

    # The lab.daam run on display (not synced: it lives in the kernel).
    run = traitlets.Any(None, allow_none=True)

    def __init__(
        self,
        pipe=None,
        run=None,
        prompt: str | None = None,
        *,
        seed: int = 0,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        **kwargs,
    ):
        super().__init__(
            seed=seed,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            colormap_tables=colormap_tables(COLORMAPS),
            **kwargs,
        )
        self.pipe = pipe
        self.on_event("generate", lambda content: self.generate(), failure="generation failed")
        if run is not None:
            # "Generate" starts from the run's own settings (lab.daam runs record them in run.settings).
            settings = getattr(run, "settings", {}) or {}
            self.prompt = prompt or run.prompts[0]
            self.num_inference_steps = run.num_steps
            self.seed = settings.get("seed") if isinstance(settings.get("seed"), int) else seed
            self.guidance_scale = float(settings.get("guidance_scale", guidance_scale))
            self.run = run
        else:
            self.prompt = prompt or DEFAULT_PROMPT
            if self.pipe is None:
                from lab.pipelines import load_pipeline

                self.pipe = load_pipeline()
            self.generate()
        self.can_generate = self.pipe is not None

    # -- from Python -----------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        seed: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
    ):
        """Run the model on a prompt (default: the widget's settings) and show the new run. Returns it."""
        if self.pipe is None:
            raise RuntimeError("this explorer was built from a run only: pass pipe= to generate")
        from lab import daam

        with self.hold_sync():
            self.prompt = self.prompt if prompt is None else prompt
            self.seed = self.seed if seed is None else seed
            self.num_inference_steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
            self.guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        with self.working("starting…", failure="generation failed") as progress:
            # per_step=True keeps every step, layer and head (what the sliders slice), the x̂0 trajectory
            # and the queries that open-vocabulary maps need. progress(step, total) after every step.
            run = daam.trace_generation(
                self.pipe,
                self.prompt,
                seed=self.seed,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                per_step=True,
                callback=progress,
            )
            self.run = run
        return run

    def heat_map(self):
        """The HeatMap on display (lab.daam's object: .values, .normalized(), .mask(), .overlay(), .plot())."""
        run, image = self.run, self.image_index
        steps = range(self.step_start, self.step_stop)
        if steps == range(run.num_steps):
            steps = None
        heads = None if self.head < 0 else self.head
        if self.word in run.words(image):
            occurrence = None if self.occurrence < 0 else self.occurrence
            return run.heat_map(
                self.word, image=image, steps=steps, sites=self.site_group, heads=heads, occurrence=occurrence
            )
        return run.open_vocab_map(self.word, image=image, steps=steps, sites=self.site_group, heads=heads)

    def mask(self) -> np.ndarray:
        """The mask on display, exactly: HeatMap.mask(threshold) (the browser thresholds 8-bit values)."""
        return self.heat_map().mask(threshold=self.threshold)

    def snapshot(self, size: int | None = None) -> Image.Image:
        """The main view as a PIL image (overlay, or the masked image), upscaled with nearest neighbours.

        Drawn from what the browser was sent, with the browser's arithmetic: the same picture.
        """
        width, height = self.image_size
        base = np.asarray(Image.open(io.BytesIO(self.image_png)).convert("RGB"), dtype=np.float32)
        heat = np.frombuffer(self.heat, dtype=np.uint8).reshape(height, width)
        if self.show_mask:
            inside = (heat / 255.0 > self.threshold)[..., None]  # HeatMap.mask's comparison
            view = np.where(inside, base, base * 0.25)  # outside the mask dimmed, as in the browser
        else:
            table = np.frombuffer(self.colormap_tables[self.colormap], dtype=np.uint8).reshape(256, 3)
            view = (1.0 - self.opacity) * base + self.opacity * table[heat].astype(np.float32)
        picture = Image.fromarray(np.clip(view + 0.5, 0, 255).astype(np.uint8))
        size = size or self.display_size
        return picture.resize((size, round(size * height / width)), Image.NEAREST)

    # -- keeping the display in step with the run and the controls -------------------------------------

    @traitlets.observe("run")
    def _on_new_run(self, change) -> None:
        run = change["new"]
        if run is None:
            return
        with self.quietly(), self.hold_sync():  # controls move to fit the run, without a redraw each
            self.num_images = len(run.prompts)
            self.num_steps = run.num_steps
            self.can_slice = getattr(run, "per_step", True)
            self.site_group_names = list(run.site_groups)
            # Keep the user's slices where the new run allows them (e.g. after changing only the seed).
            if self.site_group not in run.site_groups:
                self.site_group = "all" if "all" in run.site_groups else next(iter(run.site_groups))
            self._count_heads()
            self.step_start, self.step_stop = 0, run.num_steps
            self.trajectory_step = run.num_steps - 1
            if self.image_index >= len(run.images):
                self.image_index = 0
            self._show_image()
        self.refresh(force=True)

    @traitlets.observe("image_index")
    def _on_image_index(self, change) -> None:
        if self.run is None or self._quiet:
            return
        with self.quietly():
            self._show_image()
        self.refresh(force=True)

    def _show_image(self) -> None:
        """Send the picture, prompt words and x̂0 frames of the selected image (the heat map follows)."""
        run, image = self.run, self.image_index
        words = run.words(image)
        with self.hold_sync():
            self.image_png = png_bytes(run.images[image], MAX_SENT_SIZE)
            self.image_size = list(Image.open(io.BytesIO(self.image_png)).size)
            self.image_prompt = run.prompts[image]
            self.trajectory_pngs = [png_bytes(frame, MAX_TRAJECTORY_FRAME_SIZE) for frame in _trajectory(run, image)]
            self.words = words
            if self.word not in words or self.occurrence >= words.count(self.word):
                self.word, self.occurrence = _first_content_word(words), -1

    def _count_heads(self) -> None:
        # Layers of different depths may have different head counts (SD 2.x, SDXL): lab.daam gives, per layer
        # group, the heads that every layer of the group has, and the slider covers those.
        heads = self.run.num_heads
        self.num_heads = heads[self.site_group] if isinstance(heads, dict) else int(heads)
        if self.head >= self.num_heads:
            self.head = -1

    @traitlets.observe("site_group")
    def _on_site_group(self, change) -> None:
        # Runs before LabWidget's request observer (see LabWidget.__init__): the head is clamped first.
        if self.run is not None and not self._quiet:
            self._count_heads()

    @traitlets.validate("step_start", "step_stop")
    def _clamp_steps(self, proposal):
        return min(max(proposal["value"], 0), self.num_steps) if self.num_steps else proposal["value"]

    @traitlets.validate("head")
    def _clamp_head(self, proposal):
        return min(max(proposal["value"], -1), self.num_heads - 1) if self.num_heads else proposal["value"]

    # -- answering the browser's requests (LabWidget.refresh calls these) ------------------------------

    def requested_state(self):
        """The heat map on display, as the selection that made it (None: nothing to show yet)."""
        if self.run is None or not self.word:
            return None
        return (
            self.image_index,
            self.word,
            self.occurrence,
            self.step_start,
            self.step_stop,
            self.site_group,
            self.head,
        )

    def answer_request(self) -> None:
        """Compute and send the heat map of the current selection."""
        if self.step_stop <= self.step_start:
            raise Unanswerable("the step range is empty: move the end handle past the start")
        heat_map = self.heat_map()
        self.heat = heat_bytes(as_numpy(heat_map.normalized()), tuple(self.image_size))
        self.heat_label = self._describe_selection()

    def _describe_selection(self) -> str:
        run = self.run
        in_prompt = self.word in run.words(self.image_index)
        word = f"“{self.word}”" + ("" if in_prompt else " (open vocabulary: not in the prompt)")
        if in_prompt and self.occurrence >= 0:
            word += f" #{self.occurrence + 1}"
        steps = (
            f"all {run.num_steps} steps"
            if (self.step_start, self.step_stop) == (0, run.num_steps)
            else f"steps {self.step_start}–{self.step_stop - 1}"
        )
        sites = "all layers" if self.site_group == "all" else f"{self.site_group} layers"
        heads = "all heads" if self.head < 0 else f"head {self.head}"
        return " · ".join([word, steps, sites, heads])

    # -- static copy for exported notebooks (nbconvert HTML, GitHub): a picture of the explorer ---------

    def static_picture(self) -> Image.Image | None:
        return self.snapshot() if self.run is not None else None

    def static_caption(self) -> str:
        return f"{self.image_prompt} — {self.heat_label}"
