"""Attend-and-Excite (Chefer, Alaluf, Vinker, Wolf, Cohen-Or, "Attend-and-Excite: Attention-Based Semantic
Guidance for Text-to-Image Diffusion Models", SIGGRAPH 2023): move the latent, before each early denoising
step, until every subject of the prompt has a patch of the image attending strongly to it.

    result = lab.attend_and_excite(pipe, "a red circle left of a blue square", subjects=["circle", "square"],
                                   generator=torch.Generator().manual_seed(0))
    result.images;  result.max_attention[:, 0]     # per step, each subject's peak attention (before the update)

At denoising step i, before the UNet's call on z_t, for the conditional prompt of one image:

    A      = mean over the attn_res x attn_res cross-attention sites and all their heads of their attention
             probabilities softmax(Q K^T / sqrt(d))                                          (h*w, 77)
    A_txt  = softmax(100 * A[:, 1:e])     over the text tokens: the start token dropped, and e the last token
                                          (diffusers) or the end-of-text position (normalize_eot)
    M_s    = G * A_txt[:, s - 1]          the subject token s's map on the h x w grid, smoothed by a 3x3 kernel
                                          G(d) ~ exp(-(d / 2 sigma)^2), sigma 0.5, reflect padding
    L      = max over subjects s of  max(0, 1 - max M_s)
    z_t   <- z_t - alpha_i grad_z L,      alpha_i = scale_factor * sqrt(linspace(1, 0.5, T)[i])   for i < max_iter_to_alter

Iterative refinement: at a step with a threshold tau (paper: {0: 0.05, 10: 0.5, 20: 0.8}) and L > 1 - tau, take
gradient steps of size alpha_i until L <= 1 - tau (at most max_refinement_steps); then the step above.

Defaults are the paper's for 50 steps (`PAPER`, the authors' config.py): max_iter_to_alter 25, those thresholds,
scale_factor 20, attn_res 16, max_refinement_steps 20. They are used whatever the step count, as diffusers does;
`schedule_for(num_steps)` scales them to another step count (an option, not the default).

normalize_eot: the authors' SD 2.1 setting, the softmax over the prompt's own tokens only (1 .. end-of-text - 1)
instead of tokens 1 .. 75. "auto" (default) turns it on when the tokenizer pads with something other than its
end-of-text token (SD 2.x's OpenCLIP tokenizer pads with "!", so the slice would hold many real tokens); for SD 1.x,
and SDXL (its first tokenizer), it stays off, which is what diffusers always does.

How it runs on lab and the pipeline:
  - The pipeline runs its own loop. The initial latent is drawn as it would draw it (pipe.prepare_latents with the
    user's generator), updated for step 0 and given as latents=; the update for step i + 1 is made in
    callback_on_step_end at the end of step i (a user's callback runs first, then this).
  - The gradient passes are side passes "attend_excite" of `lab.hooks.shared_trace(pipe)`, one image at a time on
    its conditional embedding (and SDXL's added conditioning from lab.diffusion.encode_prompt): a user's lab.trace
    captures see only the pipeline's own calls, and lab.freeu / lab.pag / lab.sag stack on the same trace.
  - The probabilities are read by an edit that keeps them (with their autograd graph) and returns them unchanged,
    at the attn_res cross-attention sites only: only those get the explicit-probabilities processor; every other
    site keeps its own (e.g. SDPA), so no other attention map is ever materialised. Everything is removed on exit.

Subjects are words (lab.token_indices): each token of the word is a subject token (a word the tokenizer splits into
pieces gives one column per piece; a word found twice, one per occurrence). A word not in the prompt is an error
before anything runs.

Differences from diffusers' StableDiffusionAttendAndExcitePipeline (its latents are matched at float32 tolerance,
tests/test_attend_excite.py):
  - the gradient pass gets scheduler.scale_model_input(z_t, t), as the pipeline's own call does; diffusers gives
    z_t, which is the same for DDIM / PNDM / DDPM (identity) but not for Euler-type schedulers (SDXL's);
  - steps where nothing may change the latent (i >= max_iter_to_alter and no threshold) run no gradient pass, and
    the refinement takes its first gradient from the step's first pass (diffusers runs both and discards them);
  - sites other than attn_res keep their processor (diffusers puts explicit attention at every site);
  - SDXL, batches with normalize_eot (each prompt's own end-of-text) and words as subjects have no reference.
Image-to-image pipelines are refused: they make their first latent inside __call__ (StableDiffusionImg2Img
takes no latents=), so the step-0 update cannot be given to them.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lab import diffusion, hooks
from lab.results import Result, as_uint8_images
from lab.tokens import token_indices

__all__ = ["PAPER", "PASS_NAME", "schedule_for", "attend_and_excite", "subject_maps", "AttendExciteResult"]

# The authors' config.py (yuval-alaluf/Attend-and-Excite), for 50 steps.
PAPER = dict(
    num_inference_steps=50,
    max_iter_to_alter=25,
    thresholds={0: 0.05, 10: 0.5, 20: 0.8},
    scale_factor=20,
    attn_res=16,
    max_refinement_steps=20,
)
SCALE_RANGE = (1.0, 0.5)  # alpha_i = scale_factor * sqrt(linspace(1.0, 0.5, T)[i])
SOFTMAX_SCALE = 100
SMOOTHING_SIGMA, SMOOTHING_SIZE = 0.5, 3
PASS_NAME = "attend_excite"  # the side pass of the gradient passes (StepContext.pass_name)

# Keyword arguments of the pipeline that would change the conditional pass in ways the gradient passes cannot follow.
_REFUSED = {
    "prompt_embeds": "give the prompt as text: the subjects are found in it",
    "pooled_prompt_embeds": "give the prompt as text",
    "prompt_2": "SDXL's second prompt is not supported: both text encoders get the prompt",
    "ip_adapter_image": "IP-Adapter is not supported",
    "ip_adapter_image_embeds": "IP-Adapter is not supported",
    "timesteps": "custom schedules are not supported: give num_inference_steps",
    "sigmas": "custom schedules are not supported: give num_inference_steps",
    "original_size": "SDXL micro-conditioning other than the default is not supported",
    "crops_coords_top_left": "SDXL micro-conditioning other than the default is not supported",
    "target_size": "SDXL micro-conditioning other than the default is not supported",
}


def schedule_for(num_steps: int) -> dict:
    """The paper's schedule (made for 50 steps) scaled to `num_steps`: max_iter_to_alter and the refinement steps
    times num_steps / 50, rounded half up; the thresholds kept (where two fall on one step, the later one's).

        schedule_for(50)  ->  {"max_iter_to_alter": 25, "thresholds": {0: 0.05, 10: 0.5, 20: 0.8}}
        schedule_for(20)  ->  {"max_iter_to_alter": 10, "thresholds": {0: 0.05, 4: 0.5, 8: 0.8}}

    lab.attend_and_excite(pipe, prompt, subjects, num_inference_steps=20, **schedule_for(20))
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    ratio = num_steps / PAPER["num_inference_steps"]
    scaled = lambda step: math.floor(step * ratio + 0.5)  # noqa: E731
    return {
        "max_iter_to_alter": max(1, scaled(PAPER["max_iter_to_alter"])),
        "thresholds": {scaled(step): tau for step, tau in PAPER["thresholds"].items()},
    }


# ----------------------------------------------------------------------------------------------
# The paper's maps and loss
# ----------------------------------------------------------------------------------------------


def subject_maps(probs: list[torch.Tensor], tokens: list[int], end: int, size: tuple[int, int]) -> torch.Tensor:
    """M_s for each subject token: float32 (len(tokens), h, w), smoothed.

    probs   one image's cross-attention probabilities at the chosen sites, each (1, heads, h*w, keys)
    end     where the softmax's text tokens end (exclusive): -1 drops the last token (diffusers), the
            end-of-text position keeps the prompt's own tokens only (normalize_eot)
    """
    attention = torch.cat([p[0].float() for p in probs]).mean(0)  # every (site, head) counts alike, as the refs
    text = torch.softmax(SOFTMAX_SCALE * attention[:, 1:end], dim=-1)  # start token dropped: indices shift by one
    maps = text[:, [token - 1 for token in tokens]].T.reshape(len(tokens), *size)
    return _smooth(maps)


def _smooth(maps: torch.Tensor) -> torch.Tensor:
    """The reference's Gaussian smoothing: kernel exp(-(d / 2 sigma)^2) normalised (a Gaussian of standard
    deviation sigma * sqrt(2)), reflect padding, each map on its own."""
    offsets = torch.arange(SMOOTHING_SIZE, dtype=torch.float32) - (SMOOTHING_SIZE - 1) / 2
    weights = torch.exp(-((offsets / (2 * SMOOTHING_SIGMA)) ** 2))
    kernel = torch.outer(weights, weights)
    kernel = (kernel / kernel.sum()).to(maps.device, maps.dtype)[None, None]
    pad = (SMOOTHING_SIZE - 1) // 2
    padded = F.pad(maps[:, None], (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(padded, kernel)[:, 0]


def _loss(maps: torch.Tensor) -> torch.Tensor:
    """L = max over subjects of max(0, 1 - max M_s)."""
    return (1 - maps.flatten(1).amax(1)).clamp(min=0).max()


def _descend(leaf: torch.Tensor, loss: torch.Tensor, step_size: float) -> torch.Tensor:
    """z <- z - alpha grad_z L (no move when L is 0)."""
    if loss == 0:
        return leaf.detach()
    (grad,) = torch.autograd.grad(loss, [leaf])
    return (leaf - step_size * grad).detach()


def _excite(maps_of, latent, *, alter: bool, threshold: float | None, step_size: float, max_refinement_steps: int):
    """One image at one step. maps_of(z) -> subject maps of a gradient pass at z. Returns (new latent, the maps
    before any update, refinement iterations)."""

    def loss_at(z):
        leaf = z.detach().requires_grad_(True)
        maps = maps_of(leaf)
        return leaf, _loss(maps), maps

    leaf, loss, maps = loss_at(latent)
    first = maps.detach()  # (not the graph: it is freed once its gradient is taken)
    iterations = 0
    if threshold is not None and loss > 1 - threshold:
        # Iterative refinement. As in both references, the loop tests the loss seen before its last update, so it
        # takes one more gradient step once the threshold is reached.
        while True:
            iterations += 1
            latent = _descend(leaf, loss, step_size)
            if loss <= max(0.0, 1 - threshold) or iterations >= max_refinement_steps:
                break
            leaf, loss, _ = loss_at(latent)
        leaf, loss, _ = loss_at(latent)  # the refined latent's loss, for the step's own update below
    latent = _descend(leaf, loss, step_size) if alter else leaf.detach()
    return latent, first, iterations


# ----------------------------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------------------------


@dataclass
class AttendExciteResult(Result):
    """What attend_and_excite made. Rows of the tensors are the steps at which it ran (`steps`); images are
    prompts x num_images_per_prompt in the pipeline's order; subject columns are `subjects[image]`, NaN past an
    image's own subjects.

    output         the pipeline's output (None after load); `images` are its images (latents with output_type="latent")
    max_attention  float32 (steps, images, subjects): max of each smoothed map M_s, before that step's update
    maps           float32 (steps, images, subjects, h, w): the smoothed maps M_s, before that step's update
    refinements    int64 (steps, images): iterative refinement steps taken
    subjects       per image, (word, token position) of each column
    """

    output: Any
    max_attention: torch.Tensor
    maps: torch.Tensor
    refinements: torch.Tensor
    steps: list[int]
    subjects: list[list[tuple[str, int]]]
    settings: dict
    image_arrays: np.ndarray | None = None

    FORMAT = "sdlab.attend_excite.AttendExciteResult"
    VERSION = 1

    def __repr__(self):
        words = sorted({word for columns in self.subjects for word, _ in columns})
        return (
            f"<AttendExciteResult {len(self.subjects)} image(s), subjects {words}, updated at {len(self.steps)} "
            f"of {self.settings['num_inference_steps']} steps, {int(self.refinements.sum())} refinement steps>"
        )

    @property
    def images(self):
        if self.output is None:
            return super().images
        return self.output.images if hasattr(self.output, "images") else self.output[0]  # return_dict=False

    def to_record(self):
        metadata = {"steps": self.steps, "subjects": self.subjects, "settings": self.settings}
        tensors = {"max_attention": self.max_attention, "maps": self.maps, "refinements": self.refinements}
        return metadata, tensors

    @classmethod
    def from_record(cls, metadata, tensors, images):
        subjects = [[(word, index) for word, index in columns] for columns in metadata["subjects"]]
        return cls(
            None,
            tensors["max_attention"],
            tensors["maps"],
            tensors["refinements"],
            metadata["steps"],
            subjects,
            metadata["settings"],
            images,
        )


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def attend_and_excite(
    pipe,
    prompt: str | list[str],
    subjects: list[str] | list[list[str]],
    *,
    max_iter_to_alter: int | None = None,
    thresholds: dict[int, float] | None = None,
    scale_factor: float = PAPER["scale_factor"],
    attn_res: int | tuple[int, int] = PAPER["attn_res"],
    normalize_eot: bool | str = "auto",
    max_refinement_steps: int = PAPER["max_refinement_steps"],
    **pipe_kwargs,
) -> AttendExciteResult:
    """Generate with Attend-and-Excite through `pipe` (a StableDiffusionPipeline or StableDiffusionXLPipeline).

    prompt             a prompt or a list of prompts
    subjects           words of the prompt to excite: one list for every prompt, or one list per prompt
    max_iter_to_alter  steps 0 .. max_iter_to_alter - 1 get the gradient step (None: the paper's 25)
    thresholds         {step: tau}: iterative refinement there until every subject's max attention reaches
                       tau, also at steps >= max_iter_to_alter as in both references (None: the paper's
                       {0: 0.05, 10: 0.5, 20: 0.8}, steps past the run left out); schedule_for() scales them
    scale_factor       alpha_i = scale_factor * sqrt(linspace(1, 0.5, T)[i])
    attn_res           side of the cross-attention maps read (16: the paper's 16x16; it must exist at this
                       image size, e.g. SDXL at 1024 px has 32x32 and 64x64, not 16x16)
    normalize_eot      "auto", True or False: see the module docstring
    pipe_kwargs        go to pipe(...): generator, num_inference_steps, guidance_scale, height, width,
                       num_images_per_prompt, negative_prompt, output_type, callback_on_step_end, ...
    """
    _check_pipeline(pipe, pipe_kwargs)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a string or a list of strings, got {prompt!r}")
    columns = _subject_columns(pipe, prompts, subjects)
    ends = _text_ends(pipe, prompts, normalize_eot)
    num_steps = pipe_kwargs.pop("num_inference_steps", None)
    if num_steps is None:
        num_steps = _pipeline_default(pipe, "num_inference_steps")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_steps!r}")
    max_iter_to_alter, thresholds = _schedule(max_iter_to_alter, thresholds, num_steps)
    if isinstance(scale_factor, bool) or not isinstance(scale_factor, (int, float)) or not scale_factor > 0:
        raise ValueError(f"scale_factor must be a positive number (the paper's is 20), got {scale_factor!r}")
    if isinstance(max_refinement_steps, bool) or not isinstance(max_refinement_steps, int) or max_refinement_steps < 1:
        raise ValueError(
            f"max_refinement_steps must be a positive int (the paper's is 20), got {max_refinement_steps!r}"
        )
    height, width = _image_size(pipe, pipe_kwargs)
    sites, map_size = _sites(pipe, attn_res, height, width)
    per_prompt = pipe_kwargs.get("num_images_per_prompt") or 1
    image_prompt = [p for p in range(len(prompts)) for _ in range(per_prompt)]  # the pipeline's row order
    user_callback = pipe_kwargs.pop("callback_on_step_end", None)
    tensor_inputs = _tensor_inputs(user_callback, pipe_kwargs.pop("callback_on_step_end_tensor_inputs", None))
    generator, given_latents = pipe_kwargs.get("generator"), pipe_kwargs.pop("latents", None)
    cross_attention_kwargs = pipe_kwargs.get("cross_attention_kwargs")

    embeddings = diffusion.encode_prompt(
        pipe, prompts, guidance=False, num_images_per_prompt=per_prompt, clip_skip=pipe_kwargs.get("clip_skip")
    )
    conditioning = embeddings.unet_inputs(pipe, height, width, guidance=False)
    records: dict[int, list] = {}  # step -> [(maps, iterations) per image]

    with hooks.shared_trace(pipe) as tr:
        kept: list[torch.Tensor] = []

        def attend_excite_keep(probs, ctx):
            kept.append(probs)
            return probs

        tr.edit([site.name for site in sites], "probs", attend_excite_keep, passes=PASS_NAME)

        def maps_of(leaf, row, t):
            inputs = {name: _rows(value, row) for name, value in conditioning.items()}
            kept.clear()
            with tr.side_pass(PASS_NAME, parts=("cond",)):
                pipe.unet(
                    pipe.scheduler.scale_model_input(leaf, t),
                    t,
                    **inputs,
                    cross_attention_kwargs=cross_attention_kwargs,
                    return_dict=False,
                )
            probs = list(kept)
            kept.clear()
            prompt_index = image_prompt[row]
            return subject_maps(probs, [index for _, index in columns[prompt_index]], ends[prompt_index], map_size)

        def excite(latents, step):
            """z_t of every image, updated for `step` (before that step's UNet call)."""
            timesteps = pipe.scheduler.timesteps
            t = timesteps[step]
            step_size = float(scale_factor * np.sqrt(np.linspace(*SCALE_RANGE, len(timesteps))[step]))
            updated, records[step] = [], []
            with torch.enable_grad():
                for row in range(len(latents)):  # one image at a time, as the references do
                    latent, maps, iterations = _excite(
                        lambda z, row=row: maps_of(z, row, t),
                        latents[row : row + 1],
                        alter=step < max_iter_to_alter,
                        threshold=thresholds.get(step),
                        step_size=step_size,
                        max_refinement_steps=max_refinement_steps,
                    )
                    updated.append(latent)
                    records[step].append((maps.cpu(), iterations))
            return torch.cat(updated).to(latents.dtype)

        def runs_at(step):
            return step < max_iter_to_alter or step in thresholds

        def on_step_end(pipeline, i, t, tensors):
            outputs = dict(user_callback(pipeline, i, t, tensors) or {}) if user_callback is not None else {}
            step = i + 1
            if step < len(pipeline.scheduler.timesteps) and runs_at(step) and not getattr(pipeline, "interrupt", False):
                outputs["latents"] = excite(outputs.get("latents", tensors["latents"]), step)
            return outputs

        device = pipe._execution_device
        pipe.scheduler.set_timesteps(num_steps, device=device)  # as the pipeline will: step 0's t and init sigma
        latents = pipe.prepare_latents(
            len(image_prompt),
            pipe.unet.config.in_channels,
            height,
            width,
            conditioning["encoder_hidden_states"].dtype,
            device,
            generator,
            given_latents,
        )
        if runs_at(0):
            latents = excite(latents, 0)
        output = pipe(
            prompt,
            latents=latents / pipe.scheduler.init_noise_sigma,  # prepare_latents multiplies given latents by it
            num_inference_steps=num_steps,
            height=height,
            width=width,
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=tensor_inputs,
            **pipe_kwargs,
        )

    settings = {
        "prompts": prompts,
        "num_inference_steps": num_steps,
        "max_iter_to_alter": max_iter_to_alter,
        "thresholds": sorted(thresholds.items()),
        "scale_factor": scale_factor,
        "attn_res": list(map_size),
        "normalize_eot": [end != -1 for end in ends],
        "max_refinement_steps": max_refinement_steps,
        "sites": [site.name for site in sites],
    }
    image_columns = [columns[p] for p in image_prompt]
    result = AttendExciteResult(output, *_tensors(records, image_columns, map_size), image_columns, settings)
    result.image_arrays = as_uint8_images(result.images)
    return result


def _tensors(records: dict[int, list], image_columns: list, map_size: tuple[int, int]):
    """max_attention, maps, refinements and steps from {step: [(maps, iterations) per image]}, NaN-padded."""
    steps = sorted(records)
    subjects = max(len(columns) for columns in image_columns)
    maps = torch.full((len(steps), len(image_columns), subjects, *map_size), float("nan"))
    refinements = torch.zeros(len(steps), len(image_columns), dtype=torch.int64)
    for row, step in enumerate(steps):
        for image, (image_maps, iterations) in enumerate(records[step]):
            maps[row, image, : len(image_maps)] = image_maps
            refinements[row, image] = iterations
    return maps.flatten(3).amax(3), maps, refinements, steps


# ----------------------------------------------------------------------------------------------
# Checks and what the pipeline's arguments imply, all before anything runs
# ----------------------------------------------------------------------------------------------


def _check_pipeline(pipe, pipe_kwargs: dict) -> None:
    parameters = inspect.signature(pipe.__call__).parameters
    if "image" in parameters:
        raise TypeError(
            f"{type(pipe).__name__} is an image-to-image (or inpainting) pipeline: it makes its first latent from the "
            "image inside __call__, so Attend-and-Excite's update for the first step cannot be given to it. Use "
            "a text-to-image pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline)."
        )
    if not {"latents", "callback_on_step_end"} <= set(parameters) or not hasattr(pipe, "prepare_latents"):
        raise TypeError(
            f"{type(pipe).__name__} does not take latents= and callback_on_step_end=, which Attend-and-Excite "
            "needs: use a StableDiffusionPipeline or StableDiffusionXLPipeline"
        )
    unknown = sorted(set(pipe_kwargs) - set(parameters) - {"kwargs"})
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        raise TypeError(f"{type(pipe).__name__} takes no argument(s) {', '.join(unknown)}")
    for name in ("prompt", "token_indices"):
        if name in pipe_kwargs:
            raise TypeError(f"give the prompt as the second argument and the subjects as words, not {name}=")
    refused = [f"{name}= ({why})" for name, why in _REFUSED.items() if pipe_kwargs.get(name) is not None]
    if refused:
        raise ValueError("attend_and_excite cannot follow " + "; ".join(refused))
    if pipe.unet.config.get("time_cond_proj_dim") is not None:
        raise ValueError("this UNet takes a guidance embedding (timestep_cond, LCM-style): not supported")


def _pipeline_default(pipe, name: str):
    return inspect.signature(pipe.__call__).parameters[name].default


def _subject_columns(pipe, prompts: list[str], subjects) -> list[list[tuple[str, int]]]:
    """Per prompt, (word, token position) of each subject token, in the order given, each position once."""
    if isinstance(subjects, str) or not isinstance(subjects, (list, tuple)) or not subjects:
        raise TypeError(f"subjects must be a list of words (or one list per prompt), got {subjects!r}")
    nested = [isinstance(entry, (list, tuple)) for entry in subjects]
    if all(nested):
        if len(subjects) != len(prompts):
            raise ValueError(f"{len(subjects)} subject lists for {len(prompts)} prompts: give one list per prompt")
        per_prompt = [list(words) for words in subjects]
    elif not any(nested):
        per_prompt = [list(subjects)] * len(prompts)
    else:
        raise TypeError(
            f"subjects mixes words and lists: give one list of words, or one list per prompt ({subjects!r})"
        )
    columns = []
    for number, (prompt, words) in enumerate(zip(prompts, per_prompt)):
        if not words:
            raise ValueError(f"prompt {number} ({prompt!r}) has no subjects: give at least one word")
        found = []
        for word in words:
            try:
                positions = token_indices(pipe, prompt, word)
            except ValueError as error:
                raise ValueError(f"subject {word!r} of prompt {number} ({prompt!r}): {error}") from None
            found += [(word, position) for position in positions if position not in [p for _, p in found]]
        columns.append(found)
    return columns


def _text_ends(pipe, prompts: list[str], normalize_eot) -> list[int]:
    """Per prompt, where the softmax's text tokens end (exclusive, as a slice end)."""
    if normalize_eot not in ("auto", True, False):
        raise ValueError(f"normalize_eot must be 'auto', True or False, got {normalize_eot!r}")
    tokenizer = pipe.tokenizer
    if normalize_eot == "auto":
        normalize_eot = tokenizer.pad_token != tokenizer.eos_token
    if not normalize_eot:
        return [-1] * len(prompts)
    lengths = [len(tokenizer(prompt, truncation=True)["input_ids"]) for prompt in prompts]
    return [length - 1 for length in lengths]  # the end-of-text position


def _schedule(max_iter_to_alter, thresholds, num_steps: int) -> tuple[int, dict[int, float]]:
    if max_iter_to_alter is None:
        max_iter_to_alter = PAPER["max_iter_to_alter"]
    if isinstance(max_iter_to_alter, bool) or not isinstance(max_iter_to_alter, int) or max_iter_to_alter < 0:
        raise ValueError(f"max_iter_to_alter must be an int >= 0 (the paper's is 25), got {max_iter_to_alter!r}")
    if thresholds is None:
        return max_iter_to_alter, {step: tau for step, tau in PAPER["thresholds"].items() if step < num_steps}
    if not isinstance(thresholds, dict):
        raise TypeError(
            f"thresholds must be a dict {{step: threshold}}, e.g. {PAPER['thresholds']}, got {thresholds!r}"
        )
    bad_steps = [s for s in thresholds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < num_steps]
    if bad_steps:
        raise ValueError(
            f"thresholds at steps {bad_steps} are outside this run's steps 0..{num_steps - 1} (steps count from 0, "
            f"num_inference_steps={num_steps}); schedule_for({num_steps}) scales the paper's schedule to this run"
        )
    bad_values = {s: tau for s, tau in thresholds.items() if not isinstance(tau, (int, float)) or not 0 < tau <= 1}
    if bad_values:
        raise ValueError(f"thresholds are max attentions to reach, in (0, 1]; got {bad_values}")
    return max_iter_to_alter, dict(thresholds)


def _image_size(pipe, pipe_kwargs: dict) -> tuple[int, int]:
    sample = pipe.unet.config.sample_size
    default = (sample, sample) if isinstance(sample, int) else tuple(sample)
    height = pipe_kwargs.pop("height", None) or default[0] * pipe.vae_scale_factor
    width = pipe_kwargs.pop("width", None) or default[1] * pipe.vae_scale_factor
    return height, width


def _sites(pipe, attn_res, height: int, width: int):
    """The cross-attention sites whose maps are attn_res, at this image size, and that size."""
    size = (attn_res, attn_res) if isinstance(attn_res, int) else tuple(attn_res)
    if len(size) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in size):
        raise ValueError(f"attn_res must be an int >= 2 or a (height, width) pair of them, got {attn_res!r}")
    latent = (int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor)
    all_sites = hooks.sites(pipe)
    try:  # resolved here, for this image size, so a missing resolution is refused before anything runs
        chosen = hooks.Selector.parse(f"cross {size[0]}x{size[1]}").resolve(all_sites, latent)
    except ValueError:
        found = sorted({site.spatial_size(latent) for site in all_sites if site.kind == "cross"}, reverse=True)
        raise ValueError(
            f"attn_res={attn_res!r}: no cross-attention map is {size[0]}x{size[1]} for {height}x{width} images (latent "
            f"{latent[0]}x{latent[1]}); here they are {', '.join('%dx%d' % s for s in found)}: pass one of those "
            "as attn_res (the paper reads 16x16 maps of SD at 512 px, latent / 4)"
        ) from None
    return chosen, size


def _tensor_inputs(user_callback, given) -> list[str]:
    """What callback_on_step_end must receive: the user's callback's inputs and "latents"."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if isinstance(user_callback, (PipelineCallback, MultiPipelineCallbacks)):
        given = user_callback.tensor_inputs  # what the pipeline itself would take from such a callback
    names = list(given) if given else []
    return names + ([] if "latents" in names else ["latents"])


def _rows(value, row: int):
    if isinstance(value, torch.Tensor):
        return value[row : row + 1]
    if isinstance(value, dict):
        return {name: _rows(item, row) for name, item in value.items()}
    return value
