"""Inverting real images into a diffusion model's noise: DDIM, null-text, negative-prompt and EDICT inversion.

    inv = lab.inversion.null_text_inversion(pipe, image, "a red circle", guidance_scale=7.5)
    images, latent = inv.reconstruct(pipe)          # regenerates the image from inv.x_T
    inv.save("runs/circle");  inv = lab.inversion.Inversion.load("runs/circle")
    inv.x_T, inv.step_embeddings(pipe)              # what an editor starts from, step by step

The DDIM sampler (eta = 0) moves x_t at timestep t to the next lower level s with the model output o = o(x_t, t)
held fixed; for every prediction type the step is affine in x_t (lab.diffusion.ddim_step):

    x_s = a_t x_t + b_t o     epsilon: a_t = sqrt(abar_s / abar_t),  b_t = sqrt(1 - abar_s) - a_t sqrt(1 - abar_t)
                              v:       a_t = sqrt(abar_s abar_t) + sqrt((1 - abar_s)(1 - abar_t)),
                                       b_t = sqrt((1 - abar_s) abar_t) - sqrt(abar_s (1 - abar_t))

**DDIM inversion** (Song et al. 2021, section 4.3) runs it backwards from the clean latent x_0 = VAE(image),
taking the output at the unknown x_t to be the output at the known x_s, evaluated at t (as diffusers'
DDIMInverseScheduler and prompt-to-prompt do):

    x_t = (x_s - b_t o(x_s, t)) / a_t,        o = o_uncond + w (o_cond - o_uncond)   (guidance w; w = 1: o_cond)

For epsilon models this is lab.diffusion.ddim_invert_step. For v-prediction it is the exact inverse of ddim_step with
v held fixed, where ddim_invert_step (diffusers) holds x0 and eps split at the lower level, which ddim_step does
not undo when v is held. On the embedded TinyWorld model (v, zero terminal SNR, "trailing") that lowers the latent
error of inverting and regenerating at w = 1 (benchmarks/results/inversion.md), and a_t never vanishes, even at
the zero-SNR step abar_t = 0, where x0 and eps cannot be split.

**Null-text inversion** (Mokady et al. 2022, google/prompt-to-prompt null_text_w_ptp.ipynb): the pivot x*_T ... x*_0
is DDIM inversion at w = 1 with the source prompt c. Then, from the noisiest step i = 0, with x_T = x*_T:

    for j < 10:  loss = || ddim_step(x_t, o_uncond(x_t; u_i) + w (o_cond(x_t) - o_uncond(x_t; u_i))) - x*_s ||^2 / n
                 Adam step on u_i, lr = 1e-2 (1 - i / 100); stop once loss < 1e-5 + i 2e-5
    x_s = ddim_step(x_t, guided output with u_i);  u_{i+1} starts from u_i

one unconditional embedding u_i per step (SDXL: the token embeddings and the pooled embedding, both optimised),
starting from the pipeline's own negative ("", or zeros where SDXL forces them).

**Negative-prompt inversion** (Miyake et al. 2023): DDIM inversion at w = 1, then the source prompt's embedding
stands in for the unconditional one at every step: u_i = c, no optimisation. Reconstructing the source gives
o_uncond = o_cond, so every w regenerates as w = 1; an edit prompt c' gives o(c) + w (o(c') - o(c)).

**EDICT** (Wallace et al. 2022, salesforce/EDICT edict_functions.py): two coupled latents x, y (both x_0 at the
start), each stepped with the output predicted from the other, then mixed (p = 0.93):

    x' = a_t x + b_t o(y, t);   y' = a_t y + b_t o(x', t);   x'' = p x' + (1 - p) y';   y'' = p y' + (1 - p) x''

and exactly inverted, last operation first: y' = (y'' - (1 - p) x'') / p,  x' = (x'' - (1 - p) y') / p,
y = (y' - b_t o(x', t)) / a_t,  x = (x' - b_t o(y, t)) / a_t. With leapfrog=True (the reference code; the
paper's equations keep x first) y goes first at odd steps. The paper holds eps fixed; here the model's own output
is held fixed (eps, v or x0: the same for epsilon models), so v-prediction models with a zero-SNR first step
(a_t = 0 for a fixed eps) stay invertible. The coupled arithmetic runs in float32 or, with dtype=torch.float64,
float64 (the reference runs the whole model in float64; here the UNet keeps its weights and dtype).

Precision: latents, DDIM steps, guidance and the null-text loss and Adam state are float32 (EDICT: float32 or
float64) whatever the pipeline's dtype; the UNet runs in its own dtype on inputs cast to it, and its output is
cast back. A float16 UNet's backward pass uses a loss scale (2^16, halved and the inner step retried when a
gradient overflows), like torch.amp.GradScaler's. The pipeline is not changed: the steps come from a private DDIMScheduler made from the
pipeline's scheduler config (pipe.scheduler is never touched), and no weight gets a gradient.

Images: one per call, a PIL RGB image, a numpy (H, W, 3) uint8 or float array in [0, 1], or a torch float tensor
(3, H, W) / (1, 3, H, W) in [-1, 1]; H and W multiples of image_multiple(pipe) = the VAE factor x 2^(the UNet's
downsamplings): 16 on TinyWorld (64 x 64 images), 64 on SD 1.x / 2.x (512 x 512), 32 on SDXL (1024 x 1024).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from lab import diffusion
from lab.results import Result

__all__ = [
    "Inversion",
    "ddim_inversion",
    "null_text_inversion",
    "negative_prompt_inversion",
    "edict_inversion",
    "image_multiple",
    "METHODS",
]

METHODS = ("ddim", "null_text", "negative_prompt", "edict")
_ACCEPTED = (
    "an image is a PIL image in RGB mode, a numpy array (H, W, 3) of uint8 (0-255) or of floats in [0, 1], "
    "or a torch float tensor (3, H, W) or (1, 3, H, W) in [-1, 1]; one image per call"
)


# -- The result -------------------------------------------------------------------------------


@dataclass
class Inversion(Result):
    """An inverted image: the trajectory x_T ... x_0 and what regenerates it.

    method           "ddim", "null_text", "negative_prompt" or "edict"
    prompt           the source prompt; guidance_scale: the w the method reconstructs (and edits) with
    timesteps        the DDIM schedule, noisiest first: denoising step i goes from timesteps[i] to the next
    latents          float32/float64 (steps + 1, 1, C, h, w): latents[i] is x at timesteps[i] (latents[0] = x_T),
                     latents[-1] the image's VAE latent x_0. Null-text: the pivot (DDIM at w = 1)
    null_embeddings  null-text: the optimised unconditional embedding of each step, (steps, 1, tokens, dim)
    null_pooled      null-text on SDXL: the optimised pooled unconditional embedding of each step, (steps, 1, dim)
    coupled_latents  EDICT: the second latent y of the pair, like `latents`
    settings         everything else: steps, image size, the DDIM scheduler config, per-method arguments and
                     diagnostics (null-text's final loss and inner steps per step), seconds taken
    image_arrays     the source image, uint8 (1, H, W, 3)
    """

    method: str
    prompt: str
    guidance_scale: float
    timesteps: list[int]
    latents: torch.Tensor
    settings: dict
    null_embeddings: torch.Tensor | None = None
    null_pooled: torch.Tensor | None = None
    coupled_latents: torch.Tensor | None = None
    image_arrays: np.ndarray | None = None

    FORMAT = "sdlab.inversion.Inversion"
    VERSION = 1

    def __repr__(self):
        height, width = self.settings["image_size"]
        return (
            f"<Inversion {self.method} of a {width}x{height} image, {len(self.timesteps)} steps, "
            f"w={self.guidance_scale:g}, prompt {self.prompt!r}>"
        )

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    @property
    def x_T(self) -> torch.Tensor:
        """The noisiest latent (1, C, h, w), where sampling starts (EDICT: x of the pair)."""
        return self.latents[0]

    @property
    def y_T(self) -> torch.Tensor | None:
        """EDICT's second noisiest latent; None for the other methods."""
        return None if self.coupled_latents is None else self.coupled_latents[0]

    @property
    def start_latents(self):
        """What a sampler starts from: x_T, or for EDICT the pair (x_T, y_T)."""
        return (self.x_T, self.y_T) if self.method == "edict" else self.x_T

    @property
    def source_latents(self) -> torch.Tensor:
        """x_0: the image's VAE latent (posterior mean), (1, C, h, w)."""
        return self.latents[-1]

    def step_embeddings(self, pipe) -> list[diffusion.PromptEmbeddings]:
        """The conditioning of each denoising step i (from timesteps[i]) that regenerates the image: cond is
        the source prompt; uncond is null-text's optimised embedding u_i, the source prompt itself for
        negative-prompt inversion, and the pipeline's negative ("") for DDIM and EDICT. An editor swaps cond
        for its target prompt's and keeps uncond. float32, on the UNet's device."""
        encoded = _encode(pipe, self.prompt)
        if self.method == "null_text":
            _check_embeddings(encoded, self.null_embeddings, self.null_pooled)
            device = encoded.cond.device
            return [
                diffusion.PromptEmbeddings(
                    encoded.cond,
                    self.null_embeddings[i].to(device, torch.float32),
                    encoded.pooled_cond,
                    None if self.null_pooled is None else self.null_pooled[i].to(device, torch.float32),
                )
                for i in range(self.num_inference_steps)
            ]
        if self.method == "negative_prompt":
            encoded = diffusion.PromptEmbeddings(encoded.cond, encoded.cond, encoded.pooled_cond, encoded.pooled_cond)
        return [encoded] * self.num_inference_steps

    def reconstruct(self, pipe, *, guidance_scale: float | None = None, progress: bool = True, output_type="pil"):
        """Regenerate the image from x_T with the method's own conditioning (step_embeddings), the DDIM steps of
        the inversion and its guidance (guidance_scale overrides it, e.g. to see DDIM at w = 1 regenerated at
        w = 7.5). Returns (images, latents): lab.diffusion.decode_latents' images ("pil", "np", "pt"; None
        with output_type=None) and the final latent x_0, float (1, C, h, w). EDICT regenerates the pair and
        returns x (y ends within float error of it)."""
        w = self.guidance_scale if guidance_scale is None else _check_guidance(guidance_scale)
        if output_type not in ("pil", "np", "pt", None):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or None (latents only), not {output_type!r}")
        scheduler = _scheduler_from(self.settings["scheduler_config"], self.num_inference_steps)
        if [int(t) for t in scheduler.timesteps] != list(self.timesteps):
            raise ValueError(
                "the stored scheduler config no longer gives the stored timesteps: the record is corrupted"
            )
        if self.latents.shape[2] != pipe.unet.config.in_channels:
            raise ValueError(
                f"these latents have {self.latents.shape[2]} channels, this UNet takes "
                f"{pipe.unet.config.in_channels}: reconstruct with the pipeline that inverted the image"
            )
        height, width = self.settings["image_size"]
        device = pipe.unet.device
        embeddings = self.step_embeddings(pipe)
        with torch.no_grad():
            if self.method == "edict":
                pair = [self.latents[0].to(device), self.coupled_latents[0].to(device)]
                inputs = _unet_inputs(pipe, embeddings[0], height, width, w != 1)
                trajectory = _edict_generate(pipe, scheduler, pair, inputs, w, self.settings, progress)
                latents = trajectory[-1][0]
            else:
                latents = self.latents[0].to(device)
                bar = tqdm(total=self.num_inference_steps, desc="reconstruct", disable=not progress, leave=False)
                for i, t in enumerate(self.timesteps):
                    inputs = _unet_inputs(pipe, embeddings[i], height, width, w != 1)
                    latents = diffusion.ddim_step(scheduler, latents, _predict(pipe.unet, latents, t, inputs, w), t)
                    bar.update()
                bar.close()
        images = None if output_type is None else diffusion.decode_latents(pipe, latents, output_type)
        return images, latents

    def to_record(self):
        metadata = {
            "method": self.method,
            "prompt": self.prompt,
            "guidance_scale": self.guidance_scale,
            "timesteps": list(self.timesteps),
            "settings": self.settings,
        }
        tensors = {"latents": self.latents}
        for name in ("null_embeddings", "null_pooled", "coupled_latents"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        return metadata, tensors

    @classmethod
    def from_record(cls, metadata, tensors, images):
        if metadata["method"] not in METHODS:
            raise KeyError(f"method {metadata['method']!r}")
        needed = {"null_text": "null_embeddings", "edict": "coupled_latents"}.get(metadata["method"])
        if needed is not None and needed not in tensors:
            raise KeyError(needed)
        return cls(
            metadata["method"],
            metadata["prompt"],
            float(metadata["guidance_scale"]),
            [int(t) for t in metadata["timesteps"]],
            tensors["latents"],
            metadata["settings"],
            tensors.get("null_embeddings"),
            tensors.get("null_pooled"),
            tensors.get("coupled_latents"),
            images,
        )


# -- The four methods -------------------------------------------------------------------------


def ddim_inversion(
    pipe, image, prompt: str, *, num_inference_steps: int = 50, guidance_scale: float = 1.0, progress: bool = True
) -> Inversion:
    """DDIM inversion of `image` with `prompt` at guidance w = guidance_scale (1: the conditional output only;
    the uncond rows use the pipeline's negative ""). Deterministic; reconstruct() regenerates at the same w."""
    start = time.perf_counter()
    source = _prepare(pipe, image, prompt, num_inference_steps, guidance_scale)
    inputs = _unet_inputs(pipe, source.embeddings, *source.size, guidance_scale != 1)
    latents = _ddim_invert(pipe, source.scheduler, source.x0, inputs, guidance_scale, progress, "DDIM inversion")
    return _result("ddim", source, prompt, guidance_scale, latents, start)


def negative_prompt_inversion(
    pipe, image, prompt: str, *, num_inference_steps: int = 50, guidance_scale: float = 7.5, progress: bool = True
) -> Inversion:
    """Negative-prompt inversion (Miyake et al. 2023): DDIM inversion at w = 1 with `prompt`; reconstruction and
    edits at w = guidance_scale take the prompt's embedding as the unconditional one (step_embeddings)."""
    start = time.perf_counter()
    source = _prepare(pipe, image, prompt, num_inference_steps, guidance_scale)
    inputs = _unet_inputs(pipe, source.embeddings, *source.size, False)
    latents = _ddim_invert(pipe, source.scheduler, source.x0, inputs, 1.0, progress, "DDIM inversion (w = 1)")
    return _result("negative_prompt", source, prompt, guidance_scale, latents, start)


def null_text_inversion(
    pipe,
    image,
    prompt: str,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    inner_steps: int = 10,
    learning_rate: float = 1e-2,
    epsilon: float = 1e-5,
    progress: bool = True,
) -> Inversion:
    """Null-text inversion (Mokady et al. 2022): the pivot is DDIM inversion at w = 1; then, noisiest step first,
    at most `inner_steps` Adam steps on the unconditional embedding (lr = learning_rate (1 - i / 100)) until the
    guided DDIM step at w = guidance_scale lands on the pivot (loss < epsilon + i 2e-5). One embedding per step.
    SDXL: the pooled unconditional embedding is optimised with the token embeddings."""
    _check_positive_int("inner_steps", inner_steps, 1000)
    for name, value in (("learning_rate", learning_rate), ("epsilon", epsilon)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if isinstance(num_inference_steps, int) and not isinstance(num_inference_steps, bool) and num_inference_steps > 99:
        raise ValueError(
            f"null-text inversion takes at most 99 steps (got {num_inference_steps}): the paper's learning rate "
            "1e-2 (1 - i / 100) of step i reaches 0 at step 100. The paper uses 50"
        )
    if guidance_scale == 1:
        raise ValueError(
            "null-text inversion at guidance_scale 1 has nothing to optimise (the unconditional output cancels "
            "out, and the pivot, DDIM inversion at w = 1, already regenerates the image): use ddim_inversion"
        )
    if torch.is_inference_mode_enabled():
        raise RuntimeError("null-text inversion optimises an embedding: call it outside torch.inference_mode()")
    start = time.perf_counter()
    source = _prepare(pipe, image, prompt, num_inference_steps, guidance_scale)
    scheduler, (height, width), w = source.scheduler, source.size, guidance_scale
    cond_inputs = _unet_inputs(pipe, source.embeddings, height, width, False)
    pivot = _ddim_invert(pipe, scheduler, source.x0, cond_inputs, 1.0, progress, "DDIM inversion (pivot)")

    encoded = source.embeddings
    null = encoded.uncond.detach().clone()
    null_pooled = None if encoded.pooled_uncond is None else encoded.pooled_uncond.detach().clone()
    unet, timesteps = pipe.unet, source.timesteps
    scale = 2.0**16 if unet.dtype == torch.float16 else 1.0  # a float16 backward underflows without it
    kept, kept_pooled, losses, taken = [], [], [], []
    x = pivot[0]
    bar = tqdm(total=len(timesteps) * inner_steps, desc="null-text optimisation", disable=not progress, leave=False)
    for i, t in enumerate(timesteps):
        target = pivot[i + 1]
        with torch.no_grad():
            cond_output = _predict(unet, x, t, cond_inputs, 1.0)
        null = null.detach().requires_grad_(True)
        params = [null]
        if null_pooled is not None:
            null_pooled = null_pooled.detach().requires_grad_(True)
            params.append(null_pooled)
        optimizer = torch.optim.Adam(params, lr=learning_rate * (1.0 - i / 100.0))
        j = loss_value = 0
        while j < inner_steps:
            with torch.enable_grad():
                embeddings = diffusion.PromptEmbeddings(encoded.cond, null, encoded.pooled_cond, null_pooled)
                uncond_inputs = _first_row(_unet_inputs(pipe, embeddings, height, width, True))
                uncond_output = _predict(unet, x, t, uncond_inputs, 1.0)
                guided = diffusion.guided_prediction(uncond_output, cond_output, w)
                loss = torch.nn.functional.mse_loss(diffusion.ddim_step(scheduler, x, guided, t), target)
                grads = torch.autograd.grad(loss * scale, params)
            if not all(torch.isfinite(g).all() for g in grads):
                if scale <= 1.0 or not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"null-text inversion: the loss or its gradient is not finite at step {i} ({loss.item()}): "
                        "the UNet overflows in its dtype; run the pipeline in float32 or bfloat16"
                    )
                scale /= 2  # the float16 backward overflowed: retry the same inner step with a smaller scale
                continue
            optimizer.zero_grad()
            for param, grad in zip(params, grads):
                param.grad = grad.float() / scale
            optimizer.step()
            j, loss_value = j + 1, loss.item()
            bar.update()
            if loss_value < epsilon + i * 2e-5:
                break
        bar.update(inner_steps - j)
        losses.append(loss_value)
        taken.append(j)
        kept.append(null.detach().clone())
        if null_pooled is not None:
            kept_pooled.append(null_pooled.detach().clone())
        with torch.no_grad():  # carry x forward with the optimised embedding, exactly as reconstruct() steps
            pooled = None if null_pooled is None else null_pooled.detach()
            embeddings = diffusion.PromptEmbeddings(encoded.cond, null.detach(), encoded.pooled_cond, pooled)
            inputs = _unet_inputs(pipe, embeddings, height, width, True)
            x = diffusion.ddim_step(scheduler, x, _predict(unet, x, t, inputs, w), t)
    bar.close()
    source.settings.update(
        inner_steps=inner_steps,
        learning_rate=learning_rate,
        epsilon=epsilon,
        final_losses=losses,
        inner_steps_taken=taken,
        final_latent_mse=float(torch.mean((x - source.x0) ** 2)),
    )
    result = _result("null_text", source, prompt, guidance_scale, pivot, start)
    result.null_embeddings = torch.stack(kept).cpu()
    result.null_pooled = torch.stack(kept_pooled).cpu() if kept_pooled else None
    return result


def edict_inversion(
    pipe,
    image,
    prompt: str,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    mix_weight: float = 0.93,
    leapfrog: bool = True,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Inversion:
    """EDICT (Wallace et al. 2022): exact inversion through two coupled latents, mixing weight p = mix_weight
    (the paper: 0.93, [0.9, 0.97] work at 50 steps), guidance w = guidance_scale (the paper edits at 3).
    leapfrog: alternate which latent steps first (the reference code) or always x (the paper's equations).
    dtype: torch.float32 or torch.float64 for the coupled-latent arithmetic (the UNet keeps its own)."""
    if isinstance(mix_weight, bool) or not isinstance(mix_weight, (int, float)) or not 0 < mix_weight <= 1:
        raise ValueError(f"mix_weight must be a number in (0, 1] (the paper: 0.93), got {mix_weight!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64 (the coupled latents' arithmetic), not {dtype}")
    if not isinstance(leapfrog, bool):
        raise ValueError(f"leapfrog must be True or False, got {leapfrog!r}")
    start = time.perf_counter()
    source = _prepare(pipe, image, prompt, num_inference_steps, guidance_scale)
    source.settings.update(mix_weight=float(mix_weight), leapfrog=leapfrog, latent_dtype=str(dtype).split(".")[-1])
    inputs = _unet_inputs(pipe, source.embeddings, *source.size, guidance_scale != 1)
    x0 = source.x0.to(dtype)
    trajectory = _edict_invert(
        pipe, source.scheduler, [x0, x0.clone()], inputs, guidance_scale, source.settings, progress
    )
    result = _result("edict", source, prompt, guidance_scale, [x for x, _ in trajectory], start)
    result.coupled_latents = torch.stack([y for _, y in trajectory]).cpu()
    return result


# -- DDIM both ways, EDICT both ways ----------------------------------------------------------


def _ddim_affine(scheduler, timestep, lower) -> tuple[float, float]:
    """(a, b) with ddim_step(x, o, timestep -> lower) = a x + b o: read off lab.diffusion.ddim_step itself,
    in float64 (the step is affine in x and o for a fixed output, clip_sample excluded)."""
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    offset = diffusion.ddim_step(scheduler, zero, zero, timestep, lower)
    a = float(diffusion.ddim_step(scheduler, one, zero, timestep, lower) - offset)
    b = float(diffusion.ddim_step(scheduler, zero, one, timestep, lower) - offset)
    if abs(a) < 1e-12:
        raise ValueError(
            f"the DDIM step {timestep} -> {lower} forgets x_t (a = {a}): it cannot be inverted for "
            f"{scheduler.config.prediction_type} prediction on this schedule"
        )
    return a, b


def _ddim_invert(pipe, scheduler, x0, inputs, guidance_scale, progress, desc) -> list[torch.Tensor]:
    """x_0 -> x_T: x_t = (x_s - b_t o(x_s, t)) / a_t for t from the least noisy timestep up. Returns x_T ... x_0."""
    timesteps = [int(t) for t in scheduler.timesteps]
    x, trajectory = x0, [x0]
    with torch.no_grad():
        for i in tqdm(
            reversed(range(len(timesteps))), total=len(timesteps), desc=desc, disable=not progress, leave=False
        ):
            t = timesteps[i]
            a, b = _ddim_affine(scheduler, t, diffusion.previous_timestep(scheduler, t))
            x = (x - b * _predict(pipe.unet, x, t, inputs, guidance_scale)) / a
            trajectory.append(x)
    return trajectory[::-1]


def _edict_order(step: int, leapfrog: bool) -> tuple[int, int]:
    """(first, second): which latent of the pair denoising step `step` updates first."""
    first = step % 2 if leapfrog else 0
    return first, 1 - first


def _edict_generate(
    pipe, scheduler, pair, inputs, w, settings, progress, after_step=None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Denoise the pair from timesteps[0]; returns [(x, y)] from the start to the clean pair. after_step(i, pair)
    may change the pair in place after step i (Prompt-to-Prompt's LocalBlend)."""
    p, leapfrog = settings["mix_weight"], settings["leapfrog"]
    trajectory = [tuple(pair)]
    for i, t in enumerate(tqdm(scheduler.timesteps.tolist(), desc="EDICT", disable=not progress, leave=False)):
        t = int(t)
        a, b = _ddim_affine(scheduler, t, diffusion.previous_timestep(scheduler, t))
        first, second = _edict_order(i, leapfrog)
        pair[first] = a * pair[first] + b * _predict(pipe.unet, pair[second], t, inputs, w)
        pair[second] = a * pair[second] + b * _predict(pipe.unet, pair[first], t, inputs, w)
        pair[0] = p * pair[0] + (1 - p) * pair[1]
        pair[1] = p * pair[1] + (1 - p) * pair[0]
        if after_step is not None:
            after_step(i, pair)
        trajectory.append(tuple(pair))
    return trajectory


def _edict_invert(pipe, scheduler, pair, inputs, w, settings, progress) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The exact inverse of _edict_generate, from the clean pair up; returns [(x, y)] noisiest first."""
    p, leapfrog = settings["mix_weight"], settings["leapfrog"]
    timesteps = [int(t) for t in scheduler.timesteps]
    trajectory = [tuple(pair)]
    with torch.no_grad():
        for i in tqdm(
            reversed(range(len(timesteps))),
            total=len(timesteps),
            desc="EDICT inversion",
            disable=not progress,
            leave=False,
        ):
            t = timesteps[i]
            a, b = _ddim_affine(scheduler, t, diffusion.previous_timestep(scheduler, t))
            first, second = _edict_order(i, leapfrog)
            pair[1] = (pair[1] - (1 - p) * pair[0]) / p
            pair[0] = (pair[0] - (1 - p) * pair[1]) / p
            pair[second] = (pair[second] - b * _predict(pipe.unet, pair[first], t, inputs, w)) / a
            pair[first] = (pair[first] - b * _predict(pipe.unet, pair[second], t, inputs, w)) / a
            trajectory.append(tuple(pair))
    return trajectory[::-1]


# -- The UNet call ----------------------------------------------------------------------------


def _predict(unet, x, t, inputs, guidance_scale) -> torch.Tensor:
    """The model output at x_t, in x's dtype, guided when guidance_scale != 1 (inputs' rows [uncond, cond]).
    DDIM's scale_model_input is the identity, so the UNet takes x_t as it is (cast to its dtype). The input is
    made contiguous: convolutions round differently on other memory layouts (the latents' layout follows the UNet
    output's), and EDICT's exactness needs equal latents to give bit-equal outputs."""
    guided = guidance_scale != 1
    sample = torch.cat([x, x]) if guided else x
    sample = sample.to(_dtype(unet)).contiguous()
    output = unet(sample, t, **inputs, return_dict=False)[0].to(x.dtype)
    return diffusion.guided_prediction(*output.chunk(2), guidance_scale) if guided else output


def _dtype(unet) -> torch.dtype:
    """The UNet's dtype from its first parameter: ModelMixin.dtype walks every module (~1 ms on a small UNet),
    which null-text's inner loop would pay twice a step."""
    return next(unet.parameters()).dtype


def _unet_inputs(pipe, embeddings, height, width, guided: bool) -> dict:
    """PromptEmbeddings.unet_inputs (rows [uncond, cond] when guided), every tensor in the UNet's dtype."""
    inputs = embeddings.unet_inputs(pipe, height, width, guidance=guided)
    dtype = _dtype(pipe.unet)
    cast = {"encoder_hidden_states": inputs["encoder_hidden_states"].to(dtype)}
    if "added_cond_kwargs" in inputs:
        cast["added_cond_kwargs"] = {k: v.to(dtype) for k, v in inputs["added_cond_kwargs"].items()}
    return cast


def _first_row(inputs: dict) -> dict:
    """The uncond row of guided UNet inputs (SDXL's time ids included: a refiner's differ between the halves)."""
    first = {"encoder_hidden_states": inputs["encoder_hidden_states"][:1]}
    if "added_cond_kwargs" in inputs:
        first["added_cond_kwargs"] = {k: v[:1] for k, v in inputs["added_cond_kwargs"].items()}
    return first


def _encode(pipe, prompt: str) -> diffusion.PromptEmbeddings:
    """The prompt and the pipeline's negative, float32 (the optimisation and the stored embeddings' dtype)."""
    encoded = diffusion.encode_prompt(pipe, prompt, guidance=True)
    as32 = [None if e is None else e.to(pipe.unet.device, torch.float32) for e in vars(encoded).values()]
    return diffusion.PromptEmbeddings(*as32)


def _check_embeddings(encoded, null, null_pooled):
    if (
        null is None
        or null.shape[2:] != encoded.uncond.shape[1:]
        or (null_pooled is None) != (encoded.pooled_uncond is None)
    ):
        got = None if null is None else tuple(null.shape[2:])
        raise ValueError(
            f"the null-text embeddings ({got}) do not fit this pipeline's text embeddings "
            f"({tuple(encoded.uncond.shape[1:])}): use the pipeline that inverted the image"
        )


# -- Checking what comes in -------------------------------------------------------------------


@dataclass
class _Source:
    x0: torch.Tensor
    array: np.ndarray
    size: tuple[int, int]
    scheduler: object
    timesteps: list[int]
    embeddings: diffusion.PromptEmbeddings
    settings: dict


def image_multiple(pipe) -> int:
    """Image sides must be multiples of this: the VAE's factor times 2 per downsampling of the UNet, so every
    UNet level halves evenly (TinyWorld: 4 x 4 = 16; SD 1.x / 2.x: 8 x 8 = 64; SDXL: 8 x 4 = 32)."""
    downsamplings = sum(getattr(block, "downsamplers", None) is not None for block in pipe.unet.down_blocks)
    return pipe.vae_scale_factor * 2**downsamplings


def _prepare(pipe, image, prompt, num_inference_steps, guidance_scale) -> _Source:
    """Check every argument before anything runs; encode the image and the prompt; the private DDIM schedule."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be one string (the source image's caption, or ''), got {type(prompt).__name__}")
    _check_guidance(guidance_scale)
    train_steps = pipe.scheduler.config.num_train_timesteps
    _check_positive_int("num_inference_steps", num_inference_steps, train_steps)
    scheduler = _ddim_scheduler(pipe.scheduler.config)
    pixels, array = _pixels(image, image_multiple(pipe))
    scheduler.set_timesteps(num_inference_steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    for t in timesteps:  # every step invertible (an epsilon model on a zero-SNR schedule is not), before any work
        _ddim_affine(scheduler, t, diffusion.previous_timestep(scheduler, t))
    x0 = diffusion.encode_image(pipe, pixels).to(pipe.unet.device, torch.float32)
    height, width = array.shape[1:3]
    settings = {
        "num_inference_steps": int(num_inference_steps),
        "image_size": [height, width],
        "scheduler_config": _json_config(scheduler.config),
        "prediction_type": scheduler.config.prediction_type,
        "unet_dtype": str(pipe.unet.dtype).split(".")[-1],
        "latent_dtype": "float32",
    }
    return _Source(x0, array, (height, width), scheduler, timesteps, _encode(pipe, prompt), settings)


def _result(method, source: _Source, prompt, guidance_scale, latents, start) -> Inversion:
    source.settings["seconds"] = round(time.perf_counter() - start, 3)
    return Inversion(
        method,
        prompt,
        float(guidance_scale),
        source.timesteps,
        torch.stack([x.detach() for x in latents]).cpu(),
        source.settings,
        image_arrays=source.array,
    )


def _check_guidance(guidance_scale) -> float:
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, (int, float))
        or not math.isfinite(guidance_scale)
        or guidance_scale < 0
    ):
        raise ValueError(
            f"guidance_scale must be a finite number >= 0 (1: the conditional output alone), got {guidance_scale!r}"
        )
    return float(guidance_scale)


def _check_positive_int(name, value, most) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= most:
        raise ValueError(f"{name} must be an int from 1 to {most}, got {value!r}")


def _ddim_scheduler(config):
    """A private DDIMScheduler from the pipeline's scheduler config (its betas, prediction type, spacing, offset,
    zero-SNR rescale). Keys a non-DDIM config lacks take Stable Diffusion's values, not DDIMScheduler's defaults:
    clip_sample=False, set_alpha_to_one=False. Clipping or thresholding x0 has no inverse: refused."""
    from diffusers import DDIMScheduler

    if getattr(config, "prediction_type", "epsilon") not in diffusion.PREDICTION_TYPES or not hasattr(
        config, "num_train_timesteps"
    ):
        raise ValueError(
            "inversion needs a scheduler of a discrete variance-preserving schedule (DDIM, DDPM, Euler, "
            f"DPM-Solver, PNDM ...) with prediction_type in {diffusion.PREDICTION_TYPES}; got {dict(config)}"
        )
    scheduler = DDIMScheduler.from_config(
        config, clip_sample=config.get("clip_sample", False), set_alpha_to_one=config.get("set_alpha_to_one", False)
    )
    if scheduler.config.clip_sample or scheduler.config.thresholding:
        raise ValueError(
            "the scheduler config clips x0 (clip_sample=True or thresholding=True, for pixel-space models): "
            "a clipped DDIM step has no inverse; use a config without them, as Stable Diffusion's"
        )
    return scheduler


def _scheduler_from(config: dict, num_inference_steps: int):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


def _json_config(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}


def _pixels(image, multiple: int) -> tuple[torch.Tensor | np.ndarray, np.ndarray]:
    """One image of any accepted form -> (what lab.diffusion.encode_image takes: uint8 (1, H, W, 3) for 8-bit
    images, so they encode exactly as elsewhere in lab, else float32 (1, 3, H, W) in [-1, 1]; uint8 (1, H, W, 3))."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(
                f"{_ACCEPTED}. This is a {image.mode} image: convert it first, e.g. image.convert('RGB') "
                "(RGBA: paste it onto the background you want; nothing is guessed here)"
            )
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        array = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"{_ACCEPTED}. Got a numpy array of shape {image.shape}")
        if array.dtype == np.uint8:
            pixels = np.ascontiguousarray(array[None])
        elif np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all():
                raise ValueError(f"{_ACCEPTED}. This float array holds NaN or inf")
            if array.min() < 0 or array.max() > 1:
                raise ValueError(
                    f"{_ACCEPTED}. This float array spans [{array.min():.4g}, {array.max():.4g}]: floats must lie "
                    "in [0, 1] (values 0-255: pass them as uint8)"
                )
            pixels = torch.from_numpy(array.astype(np.float32) * 2.0 - 1.0).permute(2, 0, 1)[None].contiguous()
        else:
            raise ValueError(f"{_ACCEPTED}. Got a {array.dtype} array: use uint8 (0-255) or floats in [0, 1]")
    elif isinstance(image, torch.Tensor):
        tensor = image[None] if image.ndim == 3 else image
        if tensor.ndim != 4 or tuple(tensor.shape[:2]) != (1, 3):
            raise ValueError(f"{_ACCEPTED}. Got a tensor of shape {tuple(image.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{_ACCEPTED}. Got a {tensor.dtype} tensor: pass image.float() / 127.5 - 1")
        pixels = tensor.detach().cpu().float().contiguous()
        if not torch.isfinite(pixels).all():
            raise ValueError(f"{_ACCEPTED}. This tensor holds NaN or inf")
        if pixels.min() < -1 or pixels.max() > 1:
            raise ValueError(
                f"{_ACCEPTED}. This tensor spans [{pixels.min():.4g}, {pixels.max():.4g}] (an image in [0, 1]: "
                "pass image * 2 - 1)"
            )
    else:
        raise ValueError(f"{_ACCEPTED}. Got {type(image).__name__}")
    height, width = pixels.shape[1:3] if isinstance(pixels, np.ndarray) else pixels.shape[-2:]
    if height % multiple or width % multiple or height == 0 or width == 0:
        raise ValueError(
            f"image sides must be multiples of {multiple} for this pipeline (the VAE's factor x 2 per UNet "
            f"downsampling; see image_multiple); this image is {width}x{height}: crop or resize it, e.g. to "
            f"{max(width // multiple, 1) * multiple}x{max(height // multiple, 1) * multiple}"
        )
    if isinstance(pixels, np.ndarray):
        return pixels, pixels
    return pixels, ((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()[None]
