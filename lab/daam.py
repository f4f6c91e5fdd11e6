"""Attribution maps: where in the image each word of the prompt acts, and how the image forms.

    import lab
    pipe = lab.pipelines.load_pipeline()
    run = lab.daam.trace_generation(pipe, "a red circle left of a blue square", seed=0)
    run.heat_map("circle").overlay().save("circle.png")       # DAAM word heat map
    run.heat_map("circle", steps=range(0, 10), sites="16x16")  # sliced (needs per_step=True for steps/heads)
    run.save("run/");  run = lab.daam.AttributionRun.load("run/")

    with lab.daam.trace(pipe) as t:                            # when you call the pipeline yourself
        out = pipe(prompt, num_inference_steps=20)
    run = t.result(prompt, images=out.images)

Everything is recorded with lab's hooks (`lab.trace` captures); nothing in diffusers is patched and
the UNet is left exactly as it was, also when the generation raises.

DAAM  (Tang et al., "What the DAAM: Interpreting Stable Diffusion Using Cross Attention", ACL 2023)
    At denoising step t, cross-attention layer l and head h, every latent position attends to the
    prompt's 77 tokens: F[t, l, h] has shape (h_l * w_l, 77). The map of token k is the column
    F[t, l, h][:, k] laid out on the layer's grid and upsampled bicubically to the image size
    (the paper's F-up), summed over steps, layers and heads:

        D_k = sum over t, l, h of  upsample(F[t, l, h][:, k])

    A word the tokenizer splits into several tokens gets the mean of its tokens' maps. The paper
    segments a word by min-max normalising the map to [0, 1] (as its reference code does) and
    thresholding at tau = 0.4:

        mask_k = (D_k - min D_k) / (max D_k - min D_k) > tau

    Defaults follow the paper: all steps, all cross-attention layers, all heads, and the
    conditional half of classifier-free guidance. `HeatMap.values` is the paper's sum divided by
    the number of (step, layer, head) terms: the mean attention a pixel pays to the word. It is
    the same map with the same mask, and its scale does not change when you slice fewer steps.
    Negative bicubic overshoot is clamped to zero once, after the sum.

Self-attention
    For a query pixel, where the image attends: the row of each self-attention layer's
    probabilities at the latent cell containing the pixel, a distribution over the layer's grid,
    spread over the image's pixels and averaged over layers, steps and heads. It sums to 1.

Open-vocabulary maps  (Marcos-Manchon et al., "Open-Vocabulary Attention Maps with Token
Optimization for Semantic Segmentation in Diffusion Models", CVPR 2024; OVAM)
    A map for a word that need not be in the generation prompt. The queries Q of every
    cross-attention layer are stored at every step; afterwards an attribution prompt holding the
    word is encoded with the pipeline's own text encoder(s), projected by each layer's `to_k`, and
        F_ovam[t, l, h] = softmax(Q[t, l, h] K_l[h]^T * scale_l)    (over the attribution tokens)
    takes the place of F in the DAAM sum. With the generation prompt as attribution prompt this is
    exactly the DAAM map. Token optimisation (the paper's section 3.2): run.optimize_token(word,
    mask) fits the word's rows of the attribution prompt's text embedding so the map's min-max
    normalisation matches a mask (binary cross-entropy); the resulting OptimizedToken gives
    sharper maps of that concept on other images: other_run.open_vocab_map(token).

Trajectory  (the "predicted clean image" of Diffusion Explainer; the "Diffusion Target" of
"Distilling Diversity and Control")
    At each step the UNet's guided prediction and its input x_t give the predicted clean latent
        epsilon:       x0_hat = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)
        v-prediction:  x0_hat = sqrt(abar_t) * x_t - sqrt(1 - abar_t) * v
    decoded with the pipeline's VAE: `run.x0[image][step]`. x_t and the prediction are lab captures at
    the "unet" site (the UNet call's "input" and "output", both CFG halves, one per step).

Memory. By default only running means are kept (one map per layer, whatever the number of
steps). `per_step=True` keeps every step and head, so any step range, layer group and head can be
summed on demand in milliseconds (what the notebook widget does); it also turns on, unless told
otherwise, `open_vocabulary` (keeps the queries) and `trajectory` (decodes x0_hat at every step).
lab's memory guard refuses captures that would not fit before anything runs, and the error says
what to narrow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from lab import diffusion, hooks, ovam
from lab.heatmap import DAAM_THRESHOLD, HeatMap, plot_grid, upsample_and_add
from lab.hooks import CaptureTooLarge, Mean, Selector, Site, Stack
from lab.ovam import OptimizedToken
from lab.results import Result, as_uint8_images
from lab.tokens import clip_tokenizer, prompt_tokens, token_indices

__all__ = [
    "PAPER_THRESHOLD",
    "HeatMap",
    "AttributionRun",
    "AttributionTrace",
    "TracedSite",
    "OptimizedToken",
    "trace",
    "trace_generation",
    "plot_grid",
    "predicted_clean_latents",
]

PAPER_THRESHOLD = DAAM_THRESHOLD  # tau of DAAM, section 3
# Self-attention probabilities are (queries x queries) per layer: 64x64-latent layers of real SD hold
# 16.8 M numbers each. By default only layers with at most 32x32 queries at the UNet's native size are
# recorded (SD 1.5 at 512 px: 32x32, 16x16 and 8x8; TinyWorld: all of them).
DEFAULT_SELF_ATTENTION_QUERIES = 32 * 32

_NARROWING_ADVICE = (
    "lab.daam: the attribution captures would not fit in memory. Narrow them with "
    "trace_generation(...) / lab.daam.trace(...) arguments: per_step=False (running means only), "
    "open_vocabulary=False (no stored queries), sites='cross 16x16' (fewer cross-attention layers), "
    "self_attention_sites=None or a lower resolution such as 'self 8x8', downsample=2 or 4 (pool the "
    "maps), fewer images per call, or raise memory_limit=. What lab's guard measured:"
)


# ----------------------------------------------------------------------------------------------
# Choosing layers at trace time
# ----------------------------------------------------------------------------------------------


def _attention_selector(pipe, selector, kind: str, argument: str):
    """The capture selector for `selector`, limited to attention layers of `kind` ("cross" or "self").

    A shorthand means the `kind` part of what it picks, so that sites="16x16" records cross-attention
    only (its resolution is resolved by lab at the first UNet call, when the latent size is known).
    Names, globs, regexes, predicates and lists must pick layers of `kind` only. Checked now, so a bad
    choice fails before anything runs.
    """
    parsed = Selector.parse(selector)
    if isinstance(parsed, hooks.selectors.Shorthand) or parsed.needs_latent_size:
        limited = parsed & hooks.kind(kind)
        try:
            limited.resolve(hooks.sites(pipe), None)
        except ValueError:
            raise ValueError(f"{argument}={selector!r} picks no {kind}-attention layers") from None
        return limited
    chosen = parsed.resolve(hooks.sites(pipe, unet=True))
    wrong = [site.name for site in chosen if site.kind != kind]
    if wrong:
        raise ValueError(f"{argument}= must pick {kind}-attention layers; these are not: {', '.join(wrong)}")
    return [site.name for site in chosen]


def _low_resolution_self_attention(pipe) -> Callable[[Site], bool]:
    """Selector of the self-attention layers with few enough queries at the UNet's native size."""
    native = pipe.unet.config.sample_size
    native = (native, native) if isinstance(native, int) else tuple(native)

    def low_resolution_self_attention(site: Site) -> bool:
        height, width = site.spatial_size(native)
        return site.kind == "self" and height * width <= DEFAULT_SELF_ATTENTION_QUERIES

    return low_resolution_self_attention


# ----------------------------------------------------------------------------------------------
# The trajectory: predicted clean latents at every step
# ----------------------------------------------------------------------------------------------


def predicted_clean_latents(
    sample: torch.Tensor, model_output: torch.Tensor, alpha_bar: float, prediction_type: str
) -> torch.Tensor:
    """x0_hat from the UNet's input x_t and its (guided) prediction: lab.diffusion.predicted_x0."""
    return diffusion.predicted_x0(
        model_output=model_output, sample=sample, alpha_bar=alpha_bar, prediction_type=prediction_type
    )


# ----------------------------------------------------------------------------------------------
# Recording: the context manager
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TracedSite:
    """An attention layer that was recorded, with what reading its maps needs (saved with the run)."""

    name: str
    kind: str  # "cross" or "self"
    place: str  # "down", "mid" or "up"
    level: int
    heads: int
    attention_size: tuple[int, int]  # (height, width) of the layer's queries in this run
    grid: tuple[int, int]  # (height, width) of the stored maps (attention_size unless downsampled)
    scale: float  # the layer's softmax scale (head_dim ** -0.5), for open-vocabulary maps

    @property
    def resolution(self) -> str:
        """The layer's resolution group, e.g. "16x16"."""
        return "%dx%d" % self.attention_size

    def as_lab_site(self) -> Site:
        """A lab.Site (without its module), for selector predicates."""
        return Site(self.name, self.kind, self.place, self.level, None)


def trace(
    pipe,
    *,
    per_step: bool = False,
    open_vocabulary: bool | None = None,
    trajectory: bool | None = None,
    sites="cross",
    self_attention_sites="auto",
    downsample: int | None = None,
    memory_limit: int | None = hooks.DEFAULT_MEMORY_LIMIT,
) -> "AttributionTrace":
    """Record attribution maps of the pipeline call run inside `with`; see AttributionTrace."""
    return AttributionTrace(
        pipe,
        per_step=per_step,
        open_vocabulary=open_vocabulary,
        trajectory=trajectory,
        sites=sites,
        self_attention_sites=self_attention_sites,
        downsample=downsample,
        memory_limit=memory_limit,
    )


class AttributionTrace:
    """Records, for one pipeline call inside `with`, what the attribution maps are computed from.

    per_step              keep every step and head of the cross-attention maps (any step range or
                          head can then be sliced). Off: running means.
    open_vocabulary       keep every step's cross-attention queries, for run.open_vocab_map.
                          None: same as per_step.
    trajectory            record and decode x0_hat at every step, for run.x0 (one VAE decode per
                          step and image). None: same as per_step.
    sites                 which cross-attention layers (any lab selector; "16x16" means
                          "cross 16x16"). Default: all.
    self_attention_sites  which self-attention layers, for run.self_attention_map. "auto": those
                          with at most 32x32 queries at the UNet's native size; None: none.
    downsample            average-pool the recorded maps (and queries) by this factor. Open-vocabulary
                          maps then attend from pooled queries: an approximation.
    memory_limit          lab's guard: bytes the captures may hold for one generation.

    Only the conditional half of classifier-free guidance is recorded (as in the paper). Use one
    `with` block per pipeline call; result(prompt, images=...) gives the AttributionRun.
    """

    def __init__(
        self,
        pipe,
        *,
        per_step=False,
        open_vocabulary=None,
        trajectory=None,
        sites="cross",
        self_attention_sites="auto",
        downsample=None,
        memory_limit=hooks.DEFAULT_MEMORY_LIMIT,
    ):
        if not hasattr(pipe, "unet") or not hasattr(pipe, "vae"):
            raise TypeError(f"expected a diffusers Stable Diffusion pipeline, got {type(pipe).__name__}")
        if downsample is not None and (not isinstance(downsample, int) or downsample < 1):
            raise ValueError(f"downsample must be a positive int, got {downsample!r}")
        self.pipe = pipe
        self.per_step = bool(per_step)
        self.open_vocabulary = self.per_step if open_vocabulary is None else bool(open_vocabulary)
        self.trajectory = self.per_step if trajectory is None else bool(trajectory)
        self.downsample = downsample
        self.cross_selector = _attention_selector(pipe, sites, "cross", "sites")
        if self_attention_sites is None:
            self.self_selector = None
        elif isinstance(self_attention_sites, str) and self_attention_sites == "auto":
            self.self_selector = _low_resolution_self_attention(pipe)
        else:
            self.self_selector = _attention_selector(pipe, self_attention_sites, "self", "self_attention_sites")
        self._trace = hooks.trace(pipe, memory_limit=memory_limit)
        self._cross = self._self = self._queries = self._unet_input = self._unet_output = None

    def __enter__(self) -> "AttributionTrace":
        self._trace.__enter__()
        try:
            # Running means average the heads too; per-step storage keeps them so they can be sliced.
            # Self-attention always averages its heads (a per-head queries x queries map is too big).
            downsample = self.downsample
            running_mean = Mean(over=("steps", "heads"), downsample=downsample)
            cross_reduce = Stack(downsample=downsample) if self.per_step else running_mean
            self._cross = self._trace.capture(self.cross_selector, "probs", reduce=cross_reduce, cfg="cond")
            if self.self_selector is not None:
                self_reduce = Stack(over=("heads",), downsample=downsample) if self.per_step else running_mean
                self._self = self._trace.capture(self.self_selector, "probs", reduce=self_reduce, cfg="cond")
            if self.open_vocabulary:
                self._queries = self._trace.capture(
                    self.cross_selector, "q", reduce=Stack(downsample=downsample), cfg="cond"
                )
            if self.trajectory:
                # The denoising step's input x_t and prediction, both CFG halves: x0_hat needs the guided one.
                self._unet_input = self._trace.capture("unet", "input", reduce=Stack(), cfg="both")
                self._unet_output = self._trace.capture("unet", "output", reduce=Stack(), cfg="both")
        except BaseException:
            self._trace.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        self._trace.__exit__(exc_type, exc, traceback)
        if isinstance(exc, CaptureTooLarge):
            raise CaptureTooLarge(f"{_NARROWING_ADVICE}\n{exc}") from exc
        return False

    def _guided_clean_latents(self, sample, prediction, ctx: hooks.StepContext) -> torch.Tensor:
        """x0_hat from the UNet's input and the guided prediction the pipeline handed to its scheduler."""
        pipe = self.pipe
        if getattr(pipe, "do_classifier_free_guidance", False):
            # The pipeline's own guidance, rows [uncond, cond]; both halves of the input are the same x_t.
            uncond, cond = prediction.chunk(2)
            prediction = diffusion.guided_prediction(
                uncond, cond, pipe.guidance_scale, getattr(pipe, "guidance_rescale", 0.0)
            )
            sample = sample.chunk(2)[1]
        alpha_bar = diffusion.input_alpha_bar(pipe.scheduler, ctx.step, ctx.timestep)
        return diffusion.predicted_x0(
            model_output=prediction,
            sample=sample,
            alpha_bar=alpha_bar,
            prediction_type=pipe.scheduler.config.prediction_type,
        )

    # -- the result -----------------------------------------------------------------------------

    def result(self, prompt: str | list[str], images=None, settings: dict | None = None) -> "AttributionRun":
        """The AttributionRun of the traced pipeline call.

        prompt  the prompt(s) given to the pipeline: one per image, or one per prompt when the
                pipeline ran num_images_per_prompt > 1 (each is repeated, as the pipeline does).
        images  the pipeline's output images (PIL or uint8 arrays), for overlays; optional.
        """
        contexts = self._cross.contexts if self._cross is not None else []
        if not contexts:
            raise RuntimeError("nothing was traced: call the pipeline inside `with lab.daam.trace(pipe) as t:`")
        timesteps = [ctx.timestep for ctx in contexts]
        if any(later >= earlier for earlier, later in zip(timesteps, timesteps[1:])):
            raise RuntimeError(
                f"the UNet ran {len(timesteps)} times with timesteps {timesteps}: that is more than one "
                "generation (or a loop calling the UNet twice per step). Use one `with lab.daam.trace(pipe)` "
                "per pipeline call."
            )
        latent_size = contexts[0].latent_size
        cross = self._cross.result()
        rows = next(iter(cross.values())).shape[1 if self.per_step else 0]
        prompts = _prompts_per_image(prompt, rows)

        all_sites = {site.name: site for site in hooks.sites(self.pipe)}
        traced: dict[str, TracedSite] = {}
        for capture in (self._cross, self._self):
            if capture is None:
                continue
            for name in capture.result():
                site, attn = all_sites[name], all_sites[name].module
                traced[name] = TracedSite(
                    name,
                    site.kind,
                    site.place,
                    site.level,
                    attn.heads,
                    site.spatial_size(latent_size),
                    capture.sizes[name],
                    float(attn.scale),
                )

        image_array = as_uint8_images(images)
        vae_factor = getattr(self.pipe, "vae_scale_factor", 8)
        if image_array is not None:
            image_size = image_array.shape[1:3]
        else:
            image_size = (latent_size[0] * vae_factor, latent_size[1] * vae_factor)
        x0_images = None
        if self.trajectory:
            inputs, outputs = self._unet_input["unet"], self._unet_output["unet"]  # (steps, rows, channels, h, w)
            x0_latents = torch.stack(
                [
                    self._guided_clean_latents(sample, prediction, ctx)
                    for sample, prediction, ctx in zip(inputs, outputs, self._unet_input.contexts)
                ]
            )  # (steps, images, ...)
            steps, batch = x0_latents.shape[:2]
            x0_images = diffusion.decode_latents(
                self.pipe, x0_latents.flatten(0, 1), output_type="np", chunk=8
            ).reshape(steps, batch, *image_size, 3)

        run = AttributionRun(
            prompts=prompts,
            sites=traced,
            timesteps=timesteps,
            latent_size=tuple(latent_size),
            image_size=tuple(int(s) for s in image_size),
            per_step=self.per_step,
            cross_attention=cross,
            self_attention=self._self.result() if self._self is not None else {},
            queries=self._queries.result() if self._queries is not None else {},
            images=image_array,
            x0_images=x0_images,
            settings={"downsample": self.downsample, **(settings or {})},
            tokenizer=self.pipe.tokenizer,
            pipe=self.pipe,
        )
        run._check_consistency()
        return run


def _prompts_per_image(prompt, rows: int) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a string or a list of strings, got {prompt!r}")
    if rows % len(prompts):
        raise ValueError(f"the pipeline made {rows} images but {len(prompts)} prompts were given")
    per_prompt = rows // len(prompts)  # num_images_per_prompt: the pipeline repeats each prompt in place
    return [p for p in prompts for _ in range(per_prompt)]


# ----------------------------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------------------------


class AttributionRun(Result):
    """Everything recorded about one traced generation, and the maps computed from it (a lab.results.Result).

    prompts         the prompt of each image
    images          uint8 (n, height, width, 3), or None
    timesteps       the scheduler timestep of each traced step (img2img: only the steps it ran)
    sites           {name: TracedSite} for every recorded attention layer, in execution order
    site_groups     {"all", "16x16", "8x8", ..., "down", "mid", "up"} -> cross-attention layer names,
                    resolutions from fine to coarse
    num_heads       {group: heads}. Heads are per layer; SD 2.x and SDXL have different counts at
                    different depths. Each group's value is the smallest count among its layers, so
                    heads=range(run.num_heads[group]) is valid for every layer of the group;
                    heads_per_site has each layer's own count.

    Map methods: heat_map (DAAM), open_vocab_map (OVAM), self_attention_map; trajectory: x0.
    save(folder) / AttributionRun.load(folder): run.json + maps.safetensors.
    With per_step=True the per-(step, layer, head) maps of a word are computed once and cached,
    then every slice (steps, sites, heads) is a few small sums and at most one upsampling per
    resolution: milliseconds.
    """

    FORMAT = "sdlab.daam.AttributionRun"
    VERSION = 1
    METADATA_FILE = "run.json"
    TENSORS_FILE = "maps.safetensors"

    def __init__(
        self,
        *,
        prompts,
        sites,
        timesteps,
        latent_size,
        image_size,
        per_step,
        cross_attention,
        self_attention=None,
        queries=None,
        images=None,
        x0_images=None,
        settings=None,
        tokenizer=None,
        pipe=None,
    ):
        self.prompts: list[str] = list(prompts)
        self.sites: dict[str, TracedSite] = dict(sites)
        self.timesteps: list[float] = [float(t) for t in timesteps]
        self.latent_size = tuple(latent_size)
        self.image_size = tuple(image_size)
        self.per_step = per_step
        # cross_attention[site]: per_step (steps, images, heads, queries, 77); else (images, queries, 77),
        #     the mean over steps and heads.  self_attention[site]: per_step (steps, images, queries, keys),
        #     else (images, queries, keys); heads averaged.  queries[site]: (steps, images, heads, queries, dim).
        self.cross_attention: dict[str, torch.Tensor] = dict(cross_attention)
        self.self_attention: dict[str, torch.Tensor] = dict(self_attention or {})
        self.queries: dict[str, torch.Tensor] = dict(queries or {})
        self.image_arrays = images
        self.x0_images = x0_images  # uint8 (steps, images, height, width, 3) or None
        self.settings = dict(settings or {})
        self.tokenizer = tokenizer
        self.pipe = pipe  # needed only by open_vocab_map (text encoder, to_k); not saved
        self._word_maps: dict[tuple, dict[str, torch.Tensor]] = {}
        self._attribution_embeddings: dict[str, torch.Tensor] = {}

    def __repr__(self):
        kept = ["per-step" if self.per_step else "running means"]
        kept += ["self-attention"] * bool(self.self_attention) + ["queries"] * bool(self.queries)
        kept += ["trajectory"] * (self.x0_images is not None)
        height, width = self.image_size
        return (
            f"<AttributionRun {self.num_images} image(s) {width}x{height}, {self.num_steps} steps, "
            f"{len(self.cross_attention)} cross-attention layers ({', '.join(kept)})>"
        )

    # -- what is in it ------------------------------------------------------------------------

    @property
    def num_images(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def site_groups(self) -> dict[str, list[str]]:
        return _site_groups([self.sites[name] for name in self.cross_attention])

    @property
    def self_attention_site_groups(self) -> dict[str, list[str]]:
        return _site_groups([self.sites[name] for name in self.self_attention])

    @property
    def heads_per_site(self) -> dict[str, int]:
        return {name: self.sites[name].heads for name in self.cross_attention}

    @property
    def num_heads(self) -> dict[str, int]:
        return {group: min(self.sites[name].heads for name in names) for group, names in self.site_groups.items()}

    @property
    def images(self) -> list[Image.Image]:
        if self.image_arrays is None:
            raise ValueError("this run has no images (pass images= to result(), or use trace_generation)")
        return super().images

    @property
    def x0(self) -> list[list[Image.Image]]:
        """The decoded x0_hat at every step: run.x0[image][step] (a PIL image)."""
        if self.x0_images is None:
            raise ValueError("the trajectory was not recorded: trace with per_step=True or trajectory=True")
        return [
            [Image.fromarray(self.x0_images[step, image]) for step in range(self.num_steps)]
            for image in range(self.num_images)
        ]

    def tokens(self, image: int = 0) -> list[tuple[int, str]]:
        """(position, token) of the image's prompt as the text encoder sees it."""
        return prompt_tokens(self._tokenizer(), self.prompts[self._image_index(image)])

    def words(self, image: int = 0) -> list[str]:
        """The words of the image's prompt, in order (a repeated word appears once per occurrence)."""
        tokenizer = self._tokenizer()
        last_kept = tokenizer.model_max_length - 2  # start token, 75 prompt tokens, end token
        words, piece = [], ""
        for position, token in self.tokens(image):
            if token in tokenizer.all_special_tokens or position > last_kept:
                continue
            piece += token
            if token.endswith("</w>"):  # CLIP's BPE ends every word with </w>
                words.append(piece[: -len("</w>")])
                piece = ""
        return [word for word in words + [piece] if any(char.isalnum() for char in word)]

    # -- DAAM ---------------------------------------------------------------------------------

    def heat_map(
        self, word: str, image: int = 0, steps=None, sites=None, heads=None, occurrence: int | None = None
    ) -> HeatMap:
        """The DAAM heat map of `word` (a word or phrase of the image's prompt).

        steps       None (all), a step number, a range/slice or a list of step numbers (0-based, in
                    denoising order). Anything but all steps needs per_step=True.
        sites       None (all recorded cross-attention layers), a group of run.site_groups ("16x16",
                    "up", "up 16x16"...), a layer name, a glob, "re:<regex>", a predicate on lab.Site,
                    or a list of these.
        heads       None (all), a head index or a list of them (needs per_step=True).
        occurrence  which occurrence of a repeated word (0-based); None averages them all.
        """
        image = self._image_index(image)
        tokens = token_indices(self._tokenizer(), self.prompts[image], word, occurrence)
        key = ("daam", image, tuple(tokens))
        if key not in self._word_maps:
            self._word_maps[key] = self._daam_token_maps(image, tokens)
        values, chosen = self._sum_maps(self._word_maps[key], self.per_step, steps, sites, heads)
        return self._heat_map(values, word, "daam", image, chosen)

    def _daam_token_maps(self, image: int, tokens: list[int]) -> dict[str, torch.Tensor]:
        """{layer: (steps, heads, h, w)} the word's attention (mean over its tokens); (1, 1, h, w) running means."""
        maps = {}
        for name, probs in self.cross_attention.items():
            height, width = self.sites[name].grid
            # Index the image first: mixing an int and a list index would move the token axis to the front.
            if self.per_step:
                word = probs[:, image][..., tokens].mean(dim=-1)  # (steps, heads, queries)
            else:
                word = probs[image][..., tokens].mean(dim=-1)[None, None]  # (1, 1, queries)
            maps[name] = word.reshape(*word.shape[:2], height, width)
        return maps

    # -- open-vocabulary maps (OVAM) ----------------------------------------------------------

    # The maps themselves live in lab.ovam, whose functions take the run first: they are this class's methods.
    open_vocab_map = ovam.open_vocab_map
    optimize_token = ovam.optimize_token

    def self_attention_map(self, x: float, y: float, image: int = 0, steps=None, sites=None) -> HeatMap:
        """Where the image attends from pixel (x, y) (x right, y down, image coordinates).

        Each self-attention layer's row for the latent cell holding the pixel is a distribution
        over its grid; spread over the image's pixels and averaged over layers (every head counts
        the same) and steps, it sums to 1. steps and sites as in heat_map; heads are averaged.
        """
        if not self.self_attention:
            raise ValueError("self-attention was not recorded: trace with self_attention_sites='auto' or a selector")
        image = self._image_index(image)
        height, width = self.image_size
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(
                f"pixel (x={x}, y={y}) is outside the {width}x{height} image (0 <= x < {width}, 0 <= y < {height})"
            )
        names = self._resolve_sites(sites, "self")
        step_index = self._step_index(steps, self.per_step)
        sums, terms = {}, 0.0
        for name in names:
            site = self.sites[name]
            grid_height, grid_width = site.grid
            query = int(y * grid_height / height) * grid_width + int(x * grid_width / width)
            probs = self.self_attention[name]
            row = probs[:, image, query][step_index].mean(dim=0) if self.per_step else probs[image, query]
            # The layer's distribution over its cells, as a share per image pixel (each cell covers
            # height*width / (h*w) pixels); weighted by its number of heads, as each head counts the same.
            density = row.reshape(grid_height, grid_width) / row.sum() * (grid_height * grid_width) / (height * width)
            sums[name] = density * site.heads
            terms += site.heads
        values = upsample_and_add(sums, self.image_size) / terms
        values = values.clamp(min=0)
        values = values / values.sum()
        chosen = {"steps": self._steps_list(step_index), "sites": names, "heads": None}
        return self._heat_map(values, f"({x}, {y})", "self-attention", image, chosen)

    # -- summing maps ---------------------------------------------------------------------------

    def _sum_maps(self, token_maps: dict[str, torch.Tensor], per_step: bool, steps, sites, heads):
        """The DAAM sum over the chosen steps, layers and heads, divided by the number of terms."""
        names = self._resolve_sites(sites, "cross")
        step_index = self._step_index(steps, per_step)
        sums, terms = {}, 0.0
        for name in names:
            site = self.sites[name]
            head_index = self._head_index(heads, site, per_step)
            maps = token_maps[name]
            if per_step:
                chosen = maps[step_index][:, head_index]  # (steps, heads, h, w)
                sums[name] = chosen.sum(dim=(0, 1))
                terms += chosen.shape[0] * chosen.shape[1]
            else:
                # A running mean over steps and heads stands for site.heads terms per step (the
                # number of steps is the same for every layer, so it cancels).
                sums[name] = maps[0, 0] * site.heads
                terms += site.heads
        values = (upsample_and_add(sums, self.image_size) / terms).clamp(min=0)
        heads_chosen = None if heads is None else tuple(_as_int_list(heads, "heads"))
        return values, {"steps": self._steps_list(step_index), "sites": names, "heads": heads_chosen}

    def _heat_map(self, values: torch.Tensor, word: str, kind: str, image: int, chosen: dict, prompt=None) -> HeatMap:
        return HeatMap(
            values=values.numpy().astype(np.float32, copy=False),
            word=word,
            kind=kind,
            prompt=self.prompts[image] if prompt is None else prompt,
            image=self.image_arrays[image] if self.image_arrays is not None else None,
            steps=tuple(chosen["steps"]),
            sites=tuple(chosen["sites"]),
            heads=chosen["heads"],
        )

    # -- choosing images, steps, layers, heads -------------------------------------------------

    def _image_index(self, image) -> int:
        if not isinstance(image, int) or not -self.num_images <= image < self.num_images:
            raise ValueError(f"image={image!r} is out of range: this run has {self.num_images} image(s)")
        return image % self.num_images

    def _step_index(self, steps, per_step: bool):
        """A slice or a list of step numbers; anything but all steps needs per-step data."""
        every = list(range(self.num_steps))
        if steps is None:
            return slice(None)
        if isinstance(steps, slice):
            chosen = every[steps]
        elif isinstance(steps, range):
            chosen = list(steps)
        else:
            chosen = _as_int_list(steps, "steps")
        if not chosen:
            raise ValueError(f"steps={steps!r} is empty (this run has steps 0..{self.num_steps - 1})")
        outside = [step for step in chosen if not 0 <= step < self.num_steps]
        if outside:
            raise ValueError(f"steps {outside} are out of range: this run has steps 0..{self.num_steps - 1}")
        if not per_step:
            if sorted(set(chosen)) == every:
                return slice(None)
            raise ValueError(
                "per-step maps were not stored (running means only): trace with per_step=True to choose steps"
            )
        if chosen == list(range(chosen[0], chosen[-1] + 1)):
            return slice(chosen[0], chosen[-1] + 1)  # a view, no copy
        return chosen

    def _steps_list(self, step_index) -> list[int]:
        every = list(range(self.num_steps))
        return every[step_index] if isinstance(step_index, slice) else list(step_index)

    def _head_index(self, heads, site: TracedSite, per_step: bool):
        if heads is None:
            return slice(None)
        chosen = _as_int_list(heads, "heads")
        if not chosen:
            raise ValueError(f"heads={heads!r} is empty")
        outside = [head for head in chosen if not 0 <= head < site.heads]
        if outside:
            raise ValueError(
                f"heads {outside} are out of range for {site.name}, which has {site.heads} heads "
                f"(run.num_heads gives the valid count per layer group)"
            )
        if not per_step:
            if sorted(set(chosen)) == list(range(site.heads)):
                return slice(None)
            raise ValueError(
                "per-head maps were not stored (running means only): trace with per_step=True to choose heads"
            )
        return chosen

    def _resolve_sites(self, selector, kind: str) -> list[str]:
        """Layer names of `kind` picked by `selector`, in execution order."""
        recorded = self.cross_attention if kind == "cross" else self.self_attention
        return _select_traced([self.sites[name] for name in recorded], selector, kind, self.latent_size)

    def _tokenizer(self):
        if self.tokenizer is None:
            # SD 1.x, 2.x and XL all use CLIP's BPE vocabulary, the one shipped in lab/tokenizer.
            self.tokenizer = clip_tokenizer()
        return self.tokenizer

    def _check_consistency(self) -> None:
        """Every per-step tensor has one entry per traced step, and every tensor one row per image."""
        for name, tensor in self.cross_attention.items():
            batch = tensor.shape[1] if self.per_step else tensor.shape[0]
            if batch != self.num_images or (self.per_step and tensor.shape[0] != self.num_steps):
                raise RuntimeError(
                    f"{name}: recorded maps of shape {tuple(tensor.shape)} do not match "
                    f"{self.num_steps} steps x {self.num_images} images"
                )
        for name, tensor in self.queries.items():
            if tuple(tensor.shape[:2]) != (self.num_steps, self.num_images):
                raise RuntimeError(
                    f"{name}: recorded queries of shape {tuple(tensor.shape)} do not match "
                    f"{self.num_steps} steps x {self.num_images} images"
                )

    # -- saving and loading ---------------------------------------------------------------------

    def to_record(self):
        """For Result.save: run.json holds the metadata, maps.safetensors the tensors. No pickle."""
        tensors = {}
        for prefix, maps in (("cross", self.cross_attention), ("self", self.self_attention), ("queries", self.queries)):
            for name, tensor in maps.items():
                tensors[f"{prefix}/{name}"] = tensor
        if self.x0_images is not None:
            tensors["x0"] = torch.from_numpy(np.ascontiguousarray(self.x0_images))
        metadata = {
            "prompts": self.prompts,
            "timesteps": self.timesteps,
            "latent_size": list(self.latent_size),
            "image_size": list(self.image_size),
            "per_step": self.per_step,
            "sites": [
                dict(site.__dict__, attention_size=list(site.attention_size), grid=list(site.grid))
                for site in self.sites.values()
            ],
            "order": {
                "cross": list(self.cross_attention),
                "self": list(self.self_attention),
                "queries": list(self.queries),
            },
            "settings": self.settings,
        }
        return metadata, tensors

    @classmethod
    def load(cls, path, pipe=None, tokenizer=None) -> "AttributionRun":
        """Read a run written by save(). pipe: needed only for open_vocab_map; tokenizer: default CLIP's."""
        return super().load(path, pipe=pipe, tokenizer=tokenizer)

    @classmethod
    def from_record(cls, metadata, tensors, images, pipe=None, tokenizer=None) -> "AttributionRun":
        sites = {}
        for record in metadata["sites"]:
            record = dict(record, attention_size=tuple(record["attention_size"]), grid=tuple(record["grid"]))
            sites[record["name"]] = TracedSite(**record)
        order = metadata["order"]
        run = cls(
            prompts=metadata["prompts"],
            sites=sites,
            timesteps=metadata["timesteps"],
            latent_size=metadata["latent_size"],
            image_size=metadata["image_size"],
            per_step=metadata["per_step"],
            cross_attention={name: tensors[f"cross/{name}"] for name in order["cross"]},
            self_attention={name: tensors[f"self/{name}"] for name in order["self"]},
            queries={name: tensors[f"queries/{name}"] for name in order["queries"]},
            images=images,
            x0_images=tensors["x0"].numpy() if "x0" in tensors else None,
            settings=metadata["settings"],
            tokenizer=tokenizer if tokenizer is not None else getattr(pipe, "tokenizer", None),
            pipe=pipe,
        )
        run._check_consistency()
        return run


# ----------------------------------------------------------------------------------------------
# Layer groups and selectors over recorded layers
# ----------------------------------------------------------------------------------------------


def _site_groups(pool: list[TracedSite]) -> dict[str, list[str]]:
    """{"all": every layer, then one group per resolution (fine to coarse), then "down", "mid", "up"}."""
    groups = {"all": [site.name for site in pool]}
    sizes = sorted({site.attention_size for site in pool}, key=lambda size: -size[0] * size[1])
    for size in sizes:
        groups["%dx%d" % size] = [site.name for site in pool if site.attention_size == size]  # = site.resolution
    for place in ("down", "mid", "up"):
        members = [site.name for site in pool if site.place == place]
        if members:
            groups[place] = members
    return groups


def _select_traced(pool: list[TracedSite], selector, kind: str, latent_size: tuple[int, int]) -> list[str]:
    """lab's selectors over recorded layers, resolved by lab without the model (the run may outlive
    it); "all" and None pick every layer. Resolutions ("16x16") are query sizes in the run."""

    def lab_selector(part):
        if isinstance(part, (list, tuple, set, frozenset)):
            return [lab_selector(each) for each in part]
        if isinstance(part, TracedSite):
            return part.name
        return hooks.kind("attention") if isinstance(part, str) and part == "all" else part

    if selector is None:
        return [site.name for site in pool]
    try:
        chosen = hooks.select_sites([site.as_lab_site() for site in pool], lab_selector(selector), latent_size)
    except ValueError as error:
        raise ValueError(
            f"sites={selector!r} picks none of the recorded {kind}-attention layers: {error} "
            f"Valid groups: {', '.join(_site_groups(pool))}."
        ) from None
    return [site.name for site in chosen]


def _as_int_list(value, argument: str) -> list[int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return [int(value)]
    try:
        values = list(value)
    except TypeError:
        raise TypeError(f"{argument} must be an int, a range or a list of ints, got {value!r}") from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{argument} must be an int, a range or a list of ints, got {value!r}")
    return [int(v) for v in values]


# ----------------------------------------------------------------------------------------------
# One call: generate and trace
# ----------------------------------------------------------------------------------------------


def trace_generation(
    pipe,
    prompt: str | list[str],
    *,
    seed: int | None = 0,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    per_step: bool = False,
    open_vocabulary: bool | None = None,
    trajectory: bool | None = None,
    sites="cross",
    self_attention_sites="auto",
    downsample: int | None = None,
    memory_limit: int | None = hooks.DEFAULT_MEMORY_LIMIT,
    callback: Callable[[int, int], None] | None = None,
    **pipe_kwargs,
) -> AttributionRun:
    """Generate with `pipe` and return the AttributionRun of the generation.

        run = lab.daam.trace_generation(pipe, "a red circle left of a blue square", seed=0)
        run.heat_map("circle").overlay().save("circle.png")

    seed       seeds a CPU torch.Generator (pass generator= instead for your own; None: no generator).
    callback   fn(steps_done, total_steps) after every step, e.g. for a progress bar (the
               pipeline's own tqdm bar shows as configured by pipe.set_progress_bar_config).
    per_step, open_vocabulary, trajectory, sites, self_attention_sites, downsample, memory_limit:
    see AttributionTrace.
    Other keyword arguments go to the pipeline (height, width, negative_prompt,
    num_images_per_prompt, image= and strength= for image-to-image pipelines, ...).
    """
    if num_inference_steps is not None and (
        isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1
    ):
        raise ValueError(f"num_inference_steps must be a positive int (e.g. 20), got {num_inference_steps!r}")
    kwargs = dict(pipe_kwargs)
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    if seed is not None and "generator" not in kwargs:
        kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    if callback is not None:
        kwargs["callback_on_step_end"] = _with_progress(callback, kwargs.get("callback_on_step_end"))
    settings = {
        "seed": seed,
        **{k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool)) or v is None},
    }
    with trace(
        pipe,
        per_step=per_step,
        open_vocabulary=open_vocabulary,
        trajectory=trajectory,
        sites=sites,
        self_attention_sites=self_attention_sites,
        downsample=downsample,
        memory_limit=memory_limit,
    ) as recording:
        output = pipe(prompt, **kwargs)
    return recording.result(prompt, images=output.images, settings=settings)


def _with_progress(callback, user_callback=None):
    def on_step_end(pipe, step_index, timestep, callback_kwargs):
        if user_callback is not None:
            callback_kwargs = user_callback(pipe, step_index, timestep, callback_kwargs)
        callback(step_index + 1, pipe.num_timesteps)
        return callback_kwargs

    return on_step_end
