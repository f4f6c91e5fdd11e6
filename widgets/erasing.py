"""The erasing explorer: a concept erased from the model by ESD or UCE, before against after, and a Concept Slider.

    import widgets
    explorer = widgets.ErasingExplorer()                  # embedded model: "star" erased by UCE (closed form)
    explorer                                              # last line of a cell: shows it
    explorer.run(concept="circle", method="esd_x")        # another concept or method (ESD trains: esd_iterations)
    explorer.result.after["a red star", 0]                # the images on display, as uint8 arrays
    with explorer.result.apply(explorer.pipe):            # the erased model again, from the saved weights
        ...
    explorer.train_slider(positive="large", negative="small")   # or ErasingExplorer(slider=Slider or folder)
    explorer.show_slider(scale=2.0, start_step=3)         # what dragging the scale slider does

Erasing. One run of lab's own function, used as a context:

    UCE      lab.uce.erase(pipe, [concept], preserve=..., guide=...)   closed form on every to_k / to_v (≈ 0.03 s)
    ESD-x    lab.esd.erase(pipe, concept, method="x", iterations, lr, eta)   fine-tunes the cross-attention
    ESD-u    lab.esd.erase(pipe, concept, method="u", ...)                   fine-tunes everything else

Inside the block the widget generates the held-out prompts (two naming the concept, two not: held_out_prompts)
and copies the changed weights out; leaving the block restores the pipeline bit for bit. Between two calls the
pipeline is always the one you passed in: no edit is ever left applied. The images, before and after, are read by
the TinyWorld judge (lab.tinyworld.judge.read_image), whose reading is written under each image.

Sliders. lab.sliders.apply(pipe, [slider], scales=[scale], start_step=...) around one generation per (scale, start
step, prompt, seed), cached, so dragging back to a scale already seen is answered at once (no model call,
`pipeline_runs` unchanged). A slider is passed in (a lab.sliders.Slider or a folder it was saved to) or trained here
with lab.sliders.train (slider_iterations). Scale 0 is the model without the slider (lab: bit for bit the same).

Everything new runs busy, with a progress bar over the training iterations and the denoising steps. Errors (an
empty concept, a concept both erased and preserved, a slider folder that holds none) are lab's own messages, shown
in the message line; the last good result stays on display and the pipeline is as it was.
"""

from __future__ import annotations

import io
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import traitlets
from PIL import Image

from widgets.base import LabWidget, Unanswerable, css, esm, label_font, png_bytes, progress_bars_off
from widgets.erasing_parts import (
    EraseSpec,
    ImageKey,
    Work,
    apply_tensors,
    as_array,
    comma_list,
    concept_seen,
    default_preserve,
    held_out_prompts,
    names_concept,
    reading_text,
)

__all__ = [
    "ErasingExplorer",
    "ErasingResult",
    "METHODS",
    "concept_seen",
    "default_preserve",
    "held_out_prompts",
    "reading_text",
]

# The erasing methods: label, whether it trains (ESD) or is solved in closed form (UCE), what it changes.
METHODS = {
    "uce": dict(label="UCE", trains=False, changes="every cross-attention to_k / to_v, in closed form"),
    "esd_x": dict(label="ESD-x", trains=True, changes="the cross-attention layers, fine-tuned"),
    "esd_u": dict(label="ESD-u", trains=True, changes="everything but the cross-attention, fine-tuned"),
}
MAX_EDITS = 8  # erasures whose weights are kept...
MAX_EDIT_BYTES = 4 * 2**30  # ...and at most this much of them (ESD-u's are most of the UNet: 3.4 GB for SD 1.5)
MAX_IMAGES = 512


@dataclass
class ErasingResult:
    """One erasure and the held-out images before and after it.

    spec       the EraseSpec (method, concept, preserve, guide, iterations, lr, eta)
    edit       lab's edit object, closed (lab.uce.Erasure: tokens, seconds; lab.esd.ESDEdit: losses, settings)
    tensors    {parameter name: value after the edit} for every weight it changed (CPU): apply() writes them back
    before     {(prompt, seed): uint8 (H, W, 3)} the model as loaded; after: the same under the edit
    readings   {("before" | "after", prompt, seed): the judge's reading as text}
    seconds    how long the edit took (training included, images not)
    """

    spec: EraseSpec
    edit: object
    tensors: dict
    seconds: float
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    readings: dict = field(default_factory=dict)

    def apply(self, pipe):
        """The erased weights written into `pipe` again: a lab.weights.WeightEdit, to use in `with`."""
        return apply_tensors(pipe, self.tensors)

    def __repr__(self):
        return f"<ErasingResult {METHODS[self.spec.method]['label']} erasing {self.spec.concept!r}, {len(self.tensors)} weights>"


class ErasingExplorer(LabWidget):
    """Erase a concept (UCE, ESD-x, ESD-u) and compare held-out prompts before and after; drag a Concept Slider.

    ErasingExplorer(pipe=None, concept="star", *, method="uce", run=None, prompts=None, seeds=(0, 1),
                    preserve=None, guide="", esd_iterations=100, esd_lr=5e-4, eta=1.0, slider=None,
                    slider_positive="large", slider_negative="small", slider_target="", slider_iterations=100,
                    slider_lr=2e-4, slider_prompt="a red star", slider_seed=1, max_scale=4.0, scale=2.0,
                    start_step=0, num_inference_steps=20, guidance_scale=5.0)

    - pipe: an SD 1.x / 2.x / XL text-to-image pipeline (None: the embedded TinyWorld model).
    - concept, method ("uce", "esd_x", "esd_u"); run: erase it now (None: when the method is UCE, which takes a
      fraction of a second; ESD trains for esd_iterations, so the Run button starts it).
    - prompts: the held-out prompts (None: held_out_prompts(concept), two naming it and two not); seeds: one image
      per prompt and seed. Prompts and preserve that are a concept's defaults follow the concept when it changes.
    - preserve (UCE): concepts to keep, a list or "circle, square" (None: default_preserve(concept)); guide (UCE):
      what the concept gives instead ("" nothing). esd_iterations, esd_lr, eta: lab.esd.erase's.
    - slider: a lab.sliders.Slider or a folder (or .safetensors file) one was saved to; None: train one here with
      slider_positive / slider_negative / slider_target, slider_iterations and slider_lr (lab.sliders.train's).
    - max_scale: the scale slider's range, [-max_scale, max_scale]; scale and start_step: where it starts.
    - The training defaults are short runs for a CPU, 100 iterations where the papers train 1000. ESD's learning rate
      is raised from the paper's 1e-5 until the edit showed on TinyWorld (looked at on a few seeds of the held-out
      prompts, not tuned on a validation split): at 5e-4 ESD-u erases "star" in part where ESD-x hardly does. The
      slider's is the paper's 2e-4 (1e-3 turned stars into other shapes). See notebooks/04_erasing_and_sliders.

    From Python: `run(**controls)`, `result` (the ErasingResult on display), `load_slider(slider)`,
    `train_slider(...)`, `show_slider(...)`, `slider` (the Slider in use), `snapshot()`; every control is a trait.
    """

    _esm = esm("erasing.js")
    _css = css("erasing.css")
    static_css_class = "sdlab-explorer-static sdlab-erasing-static"
    static_note = "Static copy of the erasing explorer: run the notebook in JupyterLab to erase and to drag the slider."
    requested_traits = ("slider_scale", "start_step", "slider_prompt", "slider_seed")

    # -- what the browser draws (set by Python) ---------------------------------------------------------
    method_info = traitlets.Dict().tag(sync=True)
    # One tile per held-out prompt and seed: {prompt, seed, names (bool), before, after (PNG bytes; b"" before a
    # run), before_reading, after_reading, before_seen, after_seen (the concept read in the image; None: not a word
    # the judge reads), before_asked, after_asked (the prompt's objects drawn as asked; None: it names none)}
    tiles = traitlets.List(traitlets.Dict()).tag(sync=True)
    sent_size = traitlets.List(traitlets.Int(), [0, 0]).tag(sync=True)  # [width, height] of the PNGs
    erase_label = traitlets.Unicode("").tag(sync=True)  # what was erased, how, how long
    summary = traitlets.Unicode("").tag(sync=True)  # the judge's counts, before → after
    slider_loaded = traitlets.Bool(False).tag(sync=True)
    slider_label = traitlets.Unicode("").tag(sync=True)
    slider_base_png = traitlets.Bytes(b"").tag(sync=True)  # the prompt without the slider (scale 0)
    slider_png = traitlets.Bytes(b"").tag(sync=True)  # at the scale and start step chosen
    slider_base_reading = traitlets.Unicode("").tag(sync=True)
    slider_reading = traitlets.Unicode("").tag(sync=True)
    slider_cached = traitlets.List(traitlets.Float()).tag(sync=True)  # scales computed for this step / prompt / seed
    cached_note = traitlets.Unicode("").tag(sync=True)
    from_cache = traitlets.Bool(False).tag(sync=True)  # the last answer (either part) came from the cache
    pipeline_runs = traitlets.Int(0).tag(sync=True)  # generations, erasures and trainings this widget ran
    shown_version = traitlets.Int(0).tag(sync=True)  # +1 with every erasure shown
    slider_version = traitlets.Int(0).tag(sync=True)  # +1 with every slider image shown

    # -- what the controls choose ------------------------------------------------------------------------
    concept = traitlets.Unicode("star").tag(sync=True)
    method = traitlets.Unicode("uce").tag(sync=True)
    preserve = traitlets.Unicode("").tag(sync=True)  # UCE, comma-separated
    guide = traitlets.Unicode("").tag(sync=True)  # UCE
    esd_iterations = traitlets.Int(100).tag(sync=True)
    esd_lr = traitlets.Float(5e-4).tag(sync=True)
    eta = traitlets.Float(1.0).tag(sync=True)
    prompts = traitlets.List(traitlets.Unicode()).tag(sync=True)
    seeds = traitlets.List(traitlets.Int(), [0, 1]).tag(sync=True)
    num_inference_steps = traitlets.Int(20).tag(sync=True)
    guidance_scale = traitlets.Float(5.0).tag(sync=True)
    slider_positive = traitlets.Unicode("large").tag(sync=True)
    slider_negative = traitlets.Unicode("small").tag(sync=True)
    slider_target = traitlets.Unicode("").tag(sync=True)
    slider_iterations = traitlets.Int(100).tag(sync=True)
    slider_lr = traitlets.Float(2e-4).tag(sync=True)
    slider_scale = traitlets.Float(2.0).tag(sync=True)
    max_scale = traitlets.Float(4.0).tag(sync=True)
    start_step = traitlets.Int(0).tag(sync=True)
    slider_prompt = traitlets.Unicode("a red star").tag(sync=True)
    slider_seed = traitlets.Int(1).tag(sync=True)
    display_size = traitlets.Int(96).tag(sync=True)

    def __init__(
        self,
        pipe=None,
        concept: str = "star",
        *,
        method: str = "uce",
        run: bool | None = None,
        prompts=None,
        seeds=(0, 1),
        preserve=None,
        guide: str = "",
        esd_iterations: int = 100,
        esd_lr: float = 5e-4,
        eta: float = 1.0,
        slider=None,
        slider_positive: str = "large",
        slider_negative: str = "small",
        slider_target: str = "",
        slider_iterations: int = 100,
        slider_lr: float = 2e-4,
        slider_prompt: str = "a red star",
        slider_seed: int = 1,
        max_scale: float = 4.0,
        scale: float = 2.0,
        start_step: int = 0,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        **kwargs,
    ):
        import lab

        if method not in METHODS:
            raise ValueError(f"unknown erasing method {method!r}: choose one of {', '.join(METHODS)}")
        if pipe is None:
            pipe = lab.load_pipeline()
            pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.slider = None  # the lab.sliders.Slider in use (a folder passed in is loaded into one)
        self._slider_id = 0  # +1 with every slider loaded or trained: part of the image cache key
        self._edits: OrderedDict[EraseSpec, ErasingResult] = OrderedDict()
        self._images: OrderedDict[ImageKey, dict] = OrderedDict()
        self._failure: tuple[object, str] | None = None
        self._computed = None  # the slider key computed last (its answer is not from the cache)
        self.result: ErasingResult | None = None
        super().__init__(method_info=METHODS, **kwargs)
        self.on_event("run", lambda content: self._run(), failure="erasing failed")
        self.on_event("train_slider", lambda content: self.train_slider(), failure="slider training failed")
        with self.quietly(), self.hold_trait_notifications():
            self.concept, self.method, self.guide = concept, method, guide
            words = default_preserve(concept) if preserve is None else preserve
            self.preserve = words if isinstance(words, str) else ", ".join(words)
            self.prompts = held_out_prompts(concept) if prompts is None else list(prompts)
            self.seeds = [int(s) for s in seeds]
            self.esd_iterations, self.esd_lr, self.eta = int(esd_iterations), float(esd_lr), float(eta)
            self.slider_positive, self.slider_negative = slider_positive, slider_negative
            self.slider_target = slider_target
            self.slider_iterations, self.slider_lr = int(slider_iterations), float(slider_lr)
            self.slider_prompt, self.slider_seed = slider_prompt, int(slider_seed)
            self.max_scale, self.slider_scale, self.start_step = float(max_scale), float(scale), int(start_step)
            self.num_inference_steps, self.guidance_scale = int(num_inference_steps), float(guidance_scale)
        self._show_before()
        if run if run is not None else not METHODS[method]["trains"]:
            self._run()
        if slider is not None:
            self.load_slider(slider)

    # -- from Python -----------------------------------------------------------------------------------

    def run(self, **controls) -> ErasingResult | None:
        """Set controls (traits: concept="circle", method="esd_u", preserve="square", esd_iterations=50, ...) and
        erase, as the Run button does; from the cache when this erasure was computed. Returns the result on display;
        raises the message if it failed (the previous result stays on display, the pipeline as it was)."""
        allowed = self._erase_controls()
        with self.hold_trait_notifications():
            for name, value in controls.items():
                if name not in allowed:
                    raise ValueError(f"unknown control {name!r}: choose from {', '.join(allowed)}")
                if name == "preserve" and not isinstance(value, str):
                    value = ", ".join(value)
                setattr(self, name, value)
        self._run()
        if self.message:
            raise RuntimeError(self.message)
        return self.result

    def load_slider(self, slider) -> None:
        """Use a slider: a lab.sliders.Slider, or a folder (or .safetensors file) written by Slider.save or
        diffusers' save_lora_weights. A folder that holds none is lab's message; the slider in use stays."""
        from pathlib import Path

        import lab.sliders

        try:
            if not isinstance(slider, lab.sliders.Slider):
                path = Path(slider)
                slider = lab.sliders.Slider.load(path.parent if path.is_file() else path)
            lab.sliders.check_fits(self.pipe, slider)  # another architecture: lab's message, nothing loaded
        except Exception as error:
            self.show_error(error, "loading the slider failed")
            return
        self._use_slider(slider)

    def train_slider(self, **controls):
        """Train a slider with lab.sliders.train (slider_positive / _negative / _target, slider_iterations,
        slider_lr; set any of them here) and use it. Returns the Slider; None if it failed (in message)."""
        import lab.sliders

        allowed = ("positive", "negative", "target", "iterations", "lr")
        with self.quietly(), self.hold_trait_notifications():
            for name, value in controls.items():
                if name.removeprefix("slider_") not in allowed:
                    raise ValueError(f"unknown slider setting {name!r}: choose from {', '.join(allowed)}")
                setattr(self, f"slider_{name.removeprefix('slider_')}", value)
        iterations = int(self.slider_iterations)
        try:
            with (
                self.working("training the slider…", failure="slider training failed") as progress,
                progress_bars_off(self.pipe),
                Work(self.pipe, progress, iterations=iterations, steps=self.num_inference_steps) as work,
            ):
                work.text = f"slider “{self.slider_positive}” vs “{self.slider_negative}”"
                self.pipeline_runs += 1
                slider = lab.sliders.train(
                    self.pipe,
                    target=self.slider_target,
                    positive=self.slider_positive,
                    negative=self.slider_negative,
                    iterations=iterations,
                    lr=float(self.slider_lr),
                    progress=False,
                )
        except Exception:
            return None
        self._use_slider(slider)
        return slider

    def show_slider(self, **controls) -> np.ndarray | None:
        """Set the slider's controls (scale=..., start_step=..., prompt=..., seed=...) as dragging does; computes
        unless cached. Returns the image at that scale (uint8); raises the message if it failed."""
        names = {"scale": "slider_scale", "prompt": "slider_prompt", "seed": "slider_seed"}
        with self.hold_trait_notifications():
            for name, value in controls.items():
                name = names.get(name, name)
                if name not in self.requested_traits:
                    raise ValueError(f"unknown slider control {name!r}: scale, start_step, prompt or seed")
                setattr(self, name, value)
        if self.message:
            raise RuntimeError(self.message)
        spec = self.requested_state()
        return self._images[spec]["image"] if isinstance(spec, ImageKey) and spec in self._images else None

    def cached_edits(self) -> int:
        """How many erasures the cache holds (their weights; images are cached apart)."""
        return len(self._edits)

    def cached_images(self) -> int:
        return len(self._images)

    # -- erasing ---------------------------------------------------------------------------------------

    def _erase_controls(self) -> list[str]:
        return ["concept", "method", "preserve", "guide", "esd_iterations", "esd_lr", "eta", "prompts", "seeds",
                "num_inference_steps", "guidance_scale"]  # fmt: skip

    @traitlets.observe("concept")
    def _follow_concept(self, change) -> None:
        # The defaults follow a new concept: the held-out prompts and UCE's preserved concepts, when they were the
        # old concept's defaults (so "circle" is not erased and preserved at once); what was typed stays.
        if getattr(self, "_quiet", 1) or not change["new"].strip():
            return  # (a blank concept is refused by Run: the defaults stay for the next one)
        if self.preserve == ", ".join(default_preserve(change["old"])):
            self.preserve = ", ".join(default_preserve(change["new"]))
        if list(self.prompts) == held_out_prompts(change["old"]):
            self.prompts = held_out_prompts(change["new"])

    def _erase_spec(self) -> EraseSpec:
        if self.method not in METHODS:
            raise ValueError(f"unknown erasing method {self.method!r}: choose one of {', '.join(METHODS)}")
        uce = self.method == "uce"
        return EraseSpec(
            self.method,
            self.concept,
            tuple(comma_list(self.preserve)) if uce else (),
            self.guide if uce else "",
            0 if uce else int(self.esd_iterations),
            0.0 if uce else float(self.esd_lr),
            0.0 if uce else float(self.eta),
        )

    def _image_key(self, prompt: str, seed: int, edit=None, slider=None) -> ImageKey:
        return ImageKey(
            edit, slider, prompt, int(seed), int(self.num_inference_steps), round(float(self.guidance_scale), 6)
        )

    def _shown(self) -> list[tuple[str, int]]:
        return [(prompt, int(seed)) for prompt in self.prompts for seed in self.seeds]

    def _run(self) -> None:
        """Erase with the current controls (or answer from the cache) and show before and after."""
        try:
            spec = self._erase_spec()
        except ValueError as error:
            self.show_error(error, "erasing failed")
            return
        shown = self._shown()
        if not shown:
            self.show_message("erasing failed: no held-out prompts (or no seeds) to show before and after")
            return
        before = [self._image_key(p, s) for p, s in shown if self._image_key(p, s) not in self._images]
        after = [self._image_key(p, s, spec) for p, s in shown if self._image_key(p, s, spec) not in self._images]
        train = spec not in self._edits
        if not before and not after and not train:
            self._edits.move_to_end(spec)
            self.show_message("")
            self._show(self._edits[spec], from_cache=True)
            return
        label = METHODS[spec.method]["label"]
        iterations = spec.iterations if train else 0
        try:
            with (
                self.working(f"{label}: erasing “{spec.concept}”…", failure=f"{label} failed") as progress,
                progress_bars_off(self.pipe),
                Work(
                    self.pipe, progress, iterations=iterations, images=len(before) + len(after),
                    steps=self.num_inference_steps,
                ) as work,
            ):  # fmt: skip
                work.text = "before"
                for key in before:
                    self._generate(key, work)
                work.text = f"{label} erasing “{spec.concept}”"
                if train:
                    result = self._erase(spec, after, work)
                else:
                    result = self._edits[spec]
                    with result.apply(self.pipe):
                        for key in after:
                            self._generate(key, work)
        except Exception:
            return  # working() has shown it; the previous result stays on display
        self._edits[spec] = result
        self._edits.move_to_end(spec)
        while len(self._edits) > 1 and (len(self._edits) > MAX_EDITS or self._edit_bytes() > MAX_EDIT_BYTES):
            self._edits.popitem(last=False)  # the oldest; the one on display stays
        self._show(result, from_cache=False)

    def _edit_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for r in self._edits.values() for t in r.tensors.values())

    def _erase(self, spec: EraseSpec, after: list[ImageKey], work: Work) -> ErasingResult:
        """Run lab's erasure as a context: the after images and the changed weights are taken inside the block, and
        leaving it restores the pipeline (also on an error)."""
        import lab.esd
        import lab.uce

        started = time.perf_counter()
        self.pipeline_runs += 1
        if spec.method == "uce":
            edit = lab.uce.erase(self.pipe, [spec.concept], **spec.arguments())
        else:
            edit = lab.esd.erase(self.pipe, spec.concept, progress=False, **spec.arguments())
        seconds = time.perf_counter() - started
        with edit:
            tensors = {name: edit.parameters[name].detach().to("cpu", copy=True) for name in edit.changed()}
            work.text = "after"
            for key in after:
                self._generate(key, work)
        return ErasingResult(spec, edit, tensors, seconds)

    def _generate(self, key: ImageKey, work: Work | None = None) -> dict:
        """One image of the pipeline as it is now (the caller applies the edit or slider), read by the judge."""
        from lab.tinyworld.judge import parse_prompt, read_image, score_prompt

        self.pipeline_runs += 1
        image = self.pipe(
            key.prompt,
            num_inference_steps=key.num_inference_steps,
            guidance_scale=key.guidance_scale,
            generator=torch.Generator().manual_seed(key.seed),
            callback_on_step_end=work.step if work is not None else None,
        ).images[0]
        array = as_array(image)
        reading, asked = read_image(array), parse_prompt(key.prompt)
        entry = {
            "image": array,
            "png": png_bytes(image),
            "reading": reading,
            "text": reading_text(reading),
            # the prompt's objects drawn as asked (shape, colour...); None: it names no TinyWorld object to check
            "asked": score_prompt(asked, array)["all_present"] if asked.objects else None,
        }
        self._images[key] = entry
        while len(self._images) > MAX_IMAGES:
            self._images.popitem(last=False)
        return entry

    def _show_before(self) -> None:
        """The held-out prompts before any erasure (the widget opens on them)."""
        keys = [self._image_key(p, s) for p, s in self._shown()]
        missing = [key for key in keys if key not in self._images]
        if missing:
            try:
                with (
                    self.working("before…", failure="generation failed") as progress,
                    progress_bars_off(self.pipe),
                    Work(self.pipe, progress, images=len(missing), steps=self.num_inference_steps) as work,
                ):
                    work.text = "before"
                    for key in missing:
                        self._generate(key, work)
            except Exception:
                return
        self._show(None, from_cache=not missing)

    def _show(self, result: ErasingResult | None, *, from_cache: bool) -> None:
        spec = result.spec if result is not None else None
        concept = spec.concept if spec else self.concept
        tiles = []
        for prompt, seed in self._shown():
            before = self._images[self._image_key(prompt, seed)]
            after = self._images.get(self._image_key(prompt, seed, spec)) if spec is not None else None
            tiles.append(
                {
                    "prompt": prompt,
                    "seed": seed,
                    "names": names_concept(prompt, concept),
                    "before": before["png"],
                    "after": after["png"] if after else b"",
                    "before_reading": before["text"],
                    "after_reading": after["text"] if after else "",
                    "before_seen": concept_seen(before["reading"], concept),
                    "after_seen": concept_seen(after["reading"], concept) if after else None,
                    "before_asked": before["asked"],
                    "after_asked": after["asked"] if after else None,
                }
            )
            if result is not None:
                result.before[prompt, seed], result.after[prompt, seed] = before["image"], after["image"]
                result.readings["before", prompt, seed] = before["text"]
                result.readings["after", prompt, seed] = after["text"]
        sent = Image.open(io.BytesIO(tiles[0]["before"])).size if tiles else (0, 0)
        with self.hold_sync():
            self.tiles, self.sent_size = tiles, list(sent)
            self.erase_label = self._erase_label(result)
            self.summary = _summary(tiles, concept) if result is not None else ""
            self.result = result
            self.from_cache = from_cache
            self.cached_note = self._cached_note()
            self.shown_version += 1

    def _erase_label(self, result: ErasingResult | None) -> str:
        if result is None:
            return "before: the model as loaded (Run to erase)"
        spec, label = result.spec, METHODS[result.spec.method]["label"]
        if spec.method == "uce":
            kept = f", preserving {', '.join(spec.preserve)}" if spec.preserve else ""
            towards = f" towards “{spec.guide}”" if spec.guide else ""
            how = f"closed form{kept}{towards}"
        else:
            losses = getattr(result.edit, "losses", [])
            how = f"{spec.iterations} iterations, lr {spec.lr:g}, η {spec.eta:g}"
            if losses:
                how += f", loss {losses[0]:.3g} → {losses[-1]:.3g}"
        took = f"{result.seconds * 1000:.0f} ms" if result.seconds < 1 else f"{result.seconds:.1f} s"
        return f"{label} erased “{spec.concept}”: {how} · {len(result.tensors)} weights · {took}"

    def _cached_note(self) -> str:
        return f"cached: {len(self._edits)} erasures, {len(self._images)} images"

    # -- the slider ------------------------------------------------------------------------------------

    def _use_slider(self, slider) -> None:
        settings = getattr(slider, "settings", {}) or {}
        self.slider, self._slider_id = slider, self._slider_id + 1
        self._failure = None
        with self.hold_sync():
            self.slider_loaded = True
            ends = f"“{settings.get('positive', '?')}” vs “{settings.get('negative', '')}”"
            where = f" on “{settings['target']}”" if settings.get("target") else ""
            trained = f", {settings['iterations']} iterations" if "iterations" in settings else ""
            self.slider_label = f"slider {ends}{where}{trained}"
            self.show_message("")
        self._compute_slider()
        self.refresh(force=True)

    def requested_state(self):
        if self.slider is None:
            return None
        scale = round(float(self.slider_scale), 6)
        if scale == 0:  # the model without the slider (lab.sliders: scale 0 is it, bit for bit)
            return self._image_key(self.slider_prompt, self.slider_seed)
        start = int(self.start_step)
        if not 0 <= start < int(self.num_inference_steps):
            return ("invalid", f"start step {start} is outside the {self.num_inference_steps} denoising steps")
        return self._image_key(self.slider_prompt, self.slider_seed, slider=(self._slider_id, scale, start))

    @traitlets.observe(*requested_traits)
    def _compute_before_answering(self, change) -> None:
        # As widgets.guidance: an uncached image is computed here, outside refresh()'s hold_sync, so busy and the
        # progress bar reach the browser while it runs; refresh() then answers from the cache.
        if getattr(self, "_quiet", 1):
            return
        key = self.requested_state()
        if key == self._answered_state:
            self._failure = None
            self.show_message("")
        elif isinstance(key, ImageKey):
            if self._failure is not None and self._failure[0] == key:
                return  # failed already for another trait of the same change: answer_request() shows why
            self._compute_slider()

    def _compute_slider(self) -> None:
        """The base image and the image at the current scale, whichever is not cached (busy, progress bar)."""
        import lab.sliders

        key = self.requested_state()
        if not isinstance(key, ImageKey):
            return
        base = self._image_key(key.prompt, key.seed)
        missing = [k for k in dict.fromkeys([base, key]) if k not in self._images]
        if not missing:
            return
        self._failure = None
        try:
            with (
                self.working("slider…", failure="slider failed") as progress,
                progress_bars_off(self.pipe),
                Work(self.pipe, progress, images=len(missing), steps=self.num_inference_steps) as work,
            ):
                for k in missing:
                    if k.slider is None:
                        work.text = "without the slider"
                        self._generate(k, work)
                        continue
                    _, scale, start = k.slider
                    work.text = f"scale {scale:g}"
                    with lab.sliders.apply(self.pipe, [self.slider], scales=[scale], start_step=start):
                        self._generate(k, work)
        except Exception as error:
            self._failure = (key, self.message or f"slider failed: {type(error).__name__}: {error}")
            return
        self._computed = key

    def answer_request(self) -> None:
        key = self.requested_state()
        if not isinstance(key, ImageKey):
            raise Unanswerable(key[1])
        if key not in self._images:
            if self._failure is None or self._failure[0] != key:
                self._compute_slider()
            if key not in self._images:
                raise Unanswerable(self._failure[1] if self._failure else "slider failed")
        base = self._images[self._image_key(key.prompt, key.seed)]
        shown = self._images[key]
        from_cache, self._computed = self._computed != key, None
        self.slider_base_png, self.slider_png = base["png"], shown["png"]
        self.slider_base_reading, self.slider_reading = base["text"], shown["text"]
        self.slider_cached = self._cached_scales(key)
        self.from_cache = from_cache
        self.cached_note = self._cached_note()
        self.slider_version += 1

    def _cached_scales(self, key: ImageKey) -> list[float]:
        start = int(self.start_step)
        scales = {0.0}
        for cached in self._images:
            same = (cached.prompt, cached.seed, cached.num_inference_steps, cached.guidance_scale) == (
                key.prompt, key.seed, key.num_inference_steps, key.guidance_scale,
            )  # fmt: skip
            if same and cached.edit is None and cached.slider is not None:
                slider, scale, step = cached.slider
                if slider == self._slider_id and step == start:
                    scales.add(scale)
        return sorted(scales)

    # -- a still picture (snapshot, static copy for exported notebooks) --------------------------------

    def snapshot(self, size: int | None = None) -> Image.Image:
        """The held-out prompts before (top row) and after (below), the judge's reading under each image, and the
        slider's image without it and at its scale when one is loaded: `size` pixels wide each, prompts above."""
        size = size or self.display_size

        def pictures(when: str) -> list[tuple]:
            return [(Image.open(io.BytesIO(t[when])) if t[when] else None, t[f"{when}_reading"]) for t in self.tiles]

        rows = [pictures("before")] + ([pictures("after")] if any(t["after"] for t in self.tiles) else [])
        several = len(set(self.seeds)) > 1
        titles = [tile["prompt"] + (f" ({tile['seed']})" if several else "") for tile in self.tiles]
        grids = [_grid(titles, rows, size)]
        if self.slider_png:
            slider = [
                (Image.open(io.BytesIO(self.slider_base_png)), f"0: {self.slider_base_reading}"),
                (Image.open(io.BytesIO(self.slider_png)), f"{self.slider_scale:g}: {self.slider_reading}"),
            ]
            grids.append(_grid([f"{self.slider_prompt}, scale 0", f"scale {self.slider_scale:g}"], [slider], size))
        picture = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), (255, 255, 255))
        y = 0
        for grid in grids:
            picture.paste(grid, (0, y))
            y += grid.height
        return picture

    def static_picture(self) -> Image.Image | None:
        return self.snapshot(96) if self.tiles else None

    def static_caption(self) -> str:
        rows = "top row before, below after" if any(t["after"] for t in self.tiles) else "before"
        return f"Erasing explorer — {self.erase_label} · {rows}" + (f" · {self.summary}" if self.summary else "")


def _grid(titles: list[str], rows: list[list[tuple]], size: int) -> Image.Image:
    """Columns of `size`-pixel images (nearest), a title above each column and a caption under each image."""
    from PIL import ImageDraw

    gap, line = 6, 15
    width = len(titles) * (size + gap) - gap
    picture = Image.new("RGB", (max(width, 1), line + len(rows) * (size + line + gap)), (255, 255, 255))
    draw, font = ImageDraw.Draw(picture), label_font(11)

    def write(x: int, y: int, text: str, colour) -> None:
        while len(text) > 4 and draw.textlength(text, font=font) > size:
            text = text[:-2] + "…"
        draw.text((x, y), text, fill=colour, font=font)

    for column, title in enumerate(titles):
        write(column * (size + gap), 1, title, (30, 30, 30))
    for r, row in enumerate(rows):
        y = line + r * (size + line + gap)
        for column, (image, caption) in enumerate(row):
            x = column * (size + gap)
            if image is not None:
                picture.paste(image.convert("RGB").resize((size, size), Image.NEAREST), (x, y))
            write(x, y + size + 1, caption, (90, 90, 90))
    return picture


def _summary(tiles: list[dict], concept: str) -> str:
    """The judge's counts, before → after: the concept read in images of prompts naming it (when the judge reads
    such a word), and the other prompts' objects drawn as asked (those naming TinyWorld objects)."""
    parts = []
    naming = [t for t in tiles if t["names"] and t["before_seen"] is not None]
    if naming:
        before, after = (sum(bool(t[f"{w}_seen"]) for t in naming) for w in ("before", "after"))
        parts.append(f"naming “{concept}”: the judge reads it in {before} of {len(naming)} before, {after} after")
    others = [t for t in tiles if not t["names"] and t["before_asked"] is not None]
    if others:
        before, after = (sum(bool(t[f"{w}_asked"]) for t in others) for w in ("before", "after"))
        parts.append(f"other prompts drawn as asked: {before} of {len(others)} before, {after} after")
    return " · ".join(parts)
