"""Diffusion math on a diffusers pipeline: the one place sdlab's techniques take it from.

    emb = diffusion.encode_prompt(pipe, "a red circle");  pipe.scheduler.set_timesteps(20)
    for t in pipe.scheduler.timesteps:   # x: initial noise latents; a DDIM scheduler
        x = diffusion.ddim_step(pipe.scheduler, x, diffusion.model_prediction(pipe, x, t, emb, 7.5), t)
    image = diffusion.decode_latents(pipe, x, "pil")[0]

Notation (variance preserving):  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
                                   v  = sqrt(abar_t) eps - sqrt(1 - abar_t) x0.

    schedule      alpha_bar, input_alpha_bar, previous_timestep, add_noise
    predictions   predicted_x0, predicted_epsilon, predicted_v      (epsilon / v_prediction / sample models)
    DDIM (eta 0)  ddim_step (t -> lower t), ddim_invert_step (lower t -> higher t)
    guidance      guided_prediction                                 (classifier-free, with Lin et al.'s rescale)
    VAE           decode_latents, encode_image, latent_distribution
    text          encode_prompt -> PromptEmbeddings, PromptEmbeddings.unet_inputs
    UNet          model_prediction                                  (scale_model_input, CFG rows, guidance)

Everything is read from the pipeline's own parts (scheduler.alphas_cumprod and config, vae.config,
pipe.encode_prompt, pipe.image_processor); nothing is patched. Functions take a python number or a
0-d tensor where one abar / timestep is meant, or a tensor with one value per batch row.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = [
    "alpha_bar",
    "input_alpha_bar",
    "previous_timestep",
    "add_noise",
    "predicted_x0",
    "predicted_epsilon",
    "predicted_v",
    "ddim_step",
    "ddim_invert_step",
    "guided_prediction",
    "decode_latents",
    "encode_image",
    "latent_distribution",
    "PromptEmbeddings",
    "encode_prompt",
    "model_prediction",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# -- The schedule -----------------------------------------------------------------------------


def alpha_bar(scheduler, timestep) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s) of the scheduler's training schedule, float64 on the CPU,
    with the shape of `timestep` (a number or a tensor of integer timesteps).

    A timestep < 0 means "after the last step": the scheduler's final abar, as DDIM uses it
    (final_alpha_cumprod: 1.0 with set_alpha_to_one, else abar_0; DDIMInverseScheduler's
    initial_alpha_cumprod; 1.0 for the others, e.g. DDPM, Euler whose last sigma is 0).
    """
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise TypeError(
            f"{type(scheduler).__name__} has no alphas_cumprod: lab.diffusion needs a scheduler of a "
            "discrete variance-preserving schedule (DDIM, DDPM, Euler, DPM-Solver...)"
        )
    table = scheduler.alphas_cumprod.to("cpu", torch.float64)
    t = torch.as_tensor(timestep).cpu()
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(
            f"alpha_bar is defined at integer training timesteps, not at {t.tolist()} (a sigma "
            "schedule between training steps: its abar is 1 / (1 + sigma**2) of scheduler.sigmas)"
        )
    t = t.long()
    if (t >= len(table)).any():
        raise ValueError(
            f"timestep {t.max().item()} is past the training schedule: timesteps run from 0 to "
            f"{len(table) - 1} (num_train_timesteps); a negative one means the step after the last"
        )
    final = getattr(scheduler, "final_alpha_cumprod", getattr(scheduler, "initial_alpha_cumprod", 1.0))
    return torch.where(t < 0, torch.as_tensor(final, dtype=torch.float64), table[t.clamp(min=0)])


def input_alpha_bar(scheduler, step: int, timestep) -> torch.Tensor:
    """abar of the input the UNet saw at schedule index `step` (timestep `timestep`), during a run.

    Sigma schedulers (Euler, DPM-Solver... once stepping) feed the UNet x / sqrt(sigma^2 + 1), the
    variance-preserving x_t of abar = 1 / (sigma^2 + 1), and their sigma may sit between training
    steps; the others feed x_t at the training timestep, abar_t."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and getattr(scheduler, "step_index", None) is not None:
        sigma = float(sigmas[step])
        return torch.tensor(1.0 / (1.0 + sigma**2), dtype=torch.float64)
    return alpha_bar(scheduler, int(round(float(timestep))))


def previous_timestep(scheduler, timestep) -> int:
    """The next lower timestep of the scheduler's current schedule (`scheduler.timesteps`), -1 after
    the last. It reads the schedule, so it holds for "leading", "trailing" and "linspace" spacing and
    any number of steps (DDIMScheduler.step computes t - num_train_timesteps // num_inference_steps
    instead, which is the same only where the steps are evenly spaced: see ddim_step)."""
    if getattr(scheduler, "num_inference_steps", None) is None and not getattr(scheduler, "custom_timesteps", False):
        raise ValueError("the scheduler has no schedule yet: call scheduler.set_timesteps(num_inference_steps) first")
    schedule, t = scheduler.timesteps.tolist(), float(timestep)
    if t not in schedule:
        raise ValueError(
            f"timestep {timestep} is not in the scheduler's schedule {[int(s) for s in schedule]}; "
            "pass the timestep to go to explicitly (ddim_step's prev_timestep)"
        )
    lower = [s for s in schedule[schedule.index(t) + 1 :] if s < t]
    return int(lower[0]) if lower else -1


def _signal_noise(alpha_bar, like: torch.Tensor):
    """sqrt(abar) and sqrt(1 - abar): python floats for one abar (float64 arithmetic rounded once, as
    lab.daam's trajectory did), else (rows, 1, 1, ...) tensors of `like`'s dtype and device."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    if alpha_bar.ndim == 0:
        return float(alpha_bar.sqrt()), float((1 - alpha_bar).sqrt())
    shape = (-1,) + (1,) * (like.ndim - 1)
    return alpha_bar.sqrt().view(shape).to(like), (1 - alpha_bar).sqrt().view(shape).to(like)


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """The forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (as scheduler.add_noise)."""
    signal, noise_scale = _signal_noise(alpha_bar(scheduler, timestep), x0)
    return signal * x0 + noise_scale * noise


# -- What the model's output says about x0, eps and v -----------------------------------------


def _check(prediction_type: str, signal, needs_signal: bool):
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}: one of {PREDICTION_TYPES} (scheduler.config.prediction_type)"
        )
    if needs_signal and bool((torch.as_tensor(signal) == 0).any()):
        raise ValueError(
            "abar = 0 (the first step of a zero-terminal-SNR schedule): x_t is pure noise, and an "
            "epsilon prediction there says nothing about x0. Such schedules need a v_prediction or "
            "sample model; or start at a timestep with abar > 0"
        )


def predicted_x0(model_output, sample, alpha_bar, prediction_type: str) -> torch.Tensor:
    """x0 implied by the model's output at x_t = sample:
    epsilon:       x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)      (abar = 0 raises)
    v_prediction:  x0 = sqrt(abar) x_t - sqrt(1 - abar) v
    sample:        x0 = the output itself"""
    signal, noise = _signal_noise(alpha_bar, sample)
    _check(prediction_type, signal, prediction_type == "epsilon")
    if prediction_type == "epsilon":
        return (sample - noise * model_output) / signal
    if prediction_type == "v_prediction":
        return signal * sample - noise * model_output
    return model_output


def predicted_epsilon(model_output, sample, alpha_bar, prediction_type: str) -> torch.Tensor:
    """eps implied by the model's output at x_t = sample:
    epsilon:       eps = the output itself
    v_prediction:  eps = sqrt(abar) v + sqrt(1 - abar) x_t
    sample:        eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)      (infinite at abar = 1)"""
    signal, noise = _signal_noise(alpha_bar, sample)
    _check(prediction_type, signal, False)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return signal * model_output + noise * sample
    return (sample - signal * model_output) / noise


def predicted_v(model_output, sample, alpha_bar, prediction_type: str) -> torch.Tensor:
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 implied by the model's output at x_t = sample:
    epsilon:       v = (eps - sqrt(1 - abar) x_t) / sqrt(abar)      (abar = 0 raises)
    v_prediction:  v = the output itself
    sample:        v = (sqrt(abar) x_t - x0) / sqrt(1 - abar)"""
    signal, noise = _signal_noise(alpha_bar, sample)
    _check(prediction_type, signal, prediction_type == "epsilon")
    if prediction_type == "epsilon":
        return (model_output - noise * sample) / signal
    if prediction_type == "v_prediction":
        return model_output
    return (signal * sample - model_output) / noise


# -- DDIM, deterministic (eta = 0), both ways -------------------------------------------------


def _ddim_move(scheduler, sample, model_output, timestep, to_timestep) -> torch.Tensor:
    """x_to = sqrt(abar_to) x0 + sqrt(1 - abar_to) eps, with x0 and eps from the output at `timestep`."""
    config = scheduler.config
    if config.get("thresholding", False):
        raise ValueError(
            "the scheduler has thresholding=True (dynamic thresholding of pixel-space models): "
            "lab.diffusion's DDIM does not implement it; use a scheduler config without it"
        )
    abar = alpha_bar(scheduler, timestep)
    x0 = predicted_x0(model_output, sample, abar, config.prediction_type)
    eps = predicted_epsilon(model_output, sample, abar, config.prediction_type)
    if config.get("clip_sample", False):  # as DDIMScheduler does (it keeps the unclipped eps)
        x0 = x0.clamp(-config.get("clip_sample_range", 1.0), config.get("clip_sample_range", 1.0))
    signal, noise = _signal_noise(alpha_bar(scheduler, to_timestep), sample)
    return signal * x0 + noise * eps


def ddim_step(scheduler, sample, model_output, timestep, prev_timestep=None) -> torch.Tensor:
    """One denoising DDIM step (eta = 0) from x_t to x_prev (Song et al. 2021, eq. 12):
        x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat

    prev_timestep defaults to previous_timestep(scheduler, timestep). DDIMScheduler.step(..., eta=0)
    gives the same when its t - num_train_timesteps // num_inference_steps is the schedule's next
    timestep: "leading" spacing, or "trailing" with a number of steps dividing num_train_timesteps.
    Elsewhere ("linspace", or trailing with 7 steps) diffusers lands between schedule points;
    pass prev_timestep=t - num_train_timesteps // num_inference_steps to reproduce it.
    Honours the scheduler's clip_sample like DDIMScheduler; refuses thresholding."""
    if prev_timestep is None:
        prev_timestep = previous_timestep(scheduler, timestep)
    return _ddim_move(scheduler, sample, model_output, timestep, prev_timestep)


def ddim_invert_step(scheduler, sample, model_output, timestep, next_timestep) -> torch.Tensor:
    """One DDIM inversion step from the less noisy x_t (`timestep`, -1 for the clean latents) up to
    next_timestep > timestep, with the model output predicted at x_t, as DDIM inversion does:
        x_next = sqrt(abar_next) x0_hat(x_t) + sqrt(1 - abar_next) eps_hat(x_t)
    It undoes ddim_step(x_next, output', next_timestep, timestep) exactly when output' implies the same
    x0 and eps at next_timestep (for an epsilon model: output' = output).

    diffusers' DDIMInverseScheduler.step(output, t, x) computes the same with timestep =
    t - num_train_timesteps // num_inference_steps and next_timestep = t: it is told the *target*
    timestep, and its inversion loops evaluate the UNet at that target t on the less noisy latents."""
    if float(next_timestep) <= float(timestep):
        raise ValueError(
            f"ddim_invert_step goes up in noise: next_timestep ({next_timestep}) must be above "
            f"timestep ({timestep}); use ddim_step to denoise"
        )
    return _ddim_move(scheduler, sample, model_output, timestep, next_timestep)


def guided_prediction(uncond, cond, guidance_scale: float, guidance_rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022):  g = uncond + s (cond - uncond).
    With guidance_rescale r > 0 (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", section 3.4), g is brought back towards cond's standard deviation (over all dims but
    the batch), as diffusers' rescale_noise_cfg does:  g = r g std(cond) / std(g) + (1 - r) g."""
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0:
        dims = list(range(1, cond.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided


# -- Image <-> latents through the pipeline's VAE ---------------------------------------------


@contextmanager
def _float32_if_forced(vae):
    """A float16 VAE whose config says force_upcast (it overflows in float16) runs in float32 and is
    put back to float16 afterwards, also on errors (the SDXL pipelines' pipe.vae.to(torch.float32))."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        yield upcast
    finally:
        if upcast:
            vae.to(torch.float16)


def _latent_stats(config, like):
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        return None
    return [torch.tensor(v, device=like.device, dtype=like.dtype).view(1, -1, 1, 1) for v in (mean, std)]


def decode_latents(pipe, latents: torch.Tensor, output_type: str = "np", chunk: int = 8):
    """Latents -> images, un-scaled as the pipelines do before their VAE:
        z = latents * latents_std / scaling_factor + latents_mean    (VAEs with latents_mean/std: some SDXL)
        z = latents / scaling_factor (+ shift_factor when set)        (the others)
    decoded `chunk` latents at a time under no_grad, postprocessed by pipe.image_processor.
    output_type "np": uint8 (n, height, width, 3); "pil": a list of PIL images; "pt": float (n, 3, h, w)
    in [0, 1]. A float16 VAE with force_upcast decodes in float32, as SDXL pipelines do (SD 1/2
    pipelines do not; here the VAE's flag decides for every pipeline)."""
    if output_type not in ("np", "pil", "pt"):
        raise ValueError(f"output_type must be 'np' (uint8 arrays), 'pil' or 'pt', not {output_type!r}")
    vae, config, images = pipe.vae, pipe.vae.config, []
    with torch.no_grad(), _float32_if_forced(vae) as upcast:
        latents = latents.float() if upcast else latents
        stats = _latent_stats(config, latents)
        if stats is not None:
            latents = latents * stats[1] / config.scaling_factor + stats[0]
        else:
            latents = latents / config.scaling_factor
            if getattr(config, "shift_factor", None) is not None:
                latents = latents + config.shift_factor
        for start in range(0, len(latents), chunk):
            decoded = vae.decode(latents[start : start + chunk].to(vae.device, vae.dtype), return_dict=False)[0]
            images.append(pipe.image_processor.postprocess(decoded, output_type=output_type))
    if output_type == "pil":
        return [image for part in images for image in part]
    return torch.cat(images) if output_type == "pt" else (np.concatenate(images) * 255).round().astype(np.uint8)


_ACCEPTED_IMAGES = (
    "encode_image takes RGB PIL images, uint8 numpy arrays (H, W, 3) or (B, H, W, 3), or a float "
    "tensor (B, 3, H, W) in [-1, 1], with H and W multiples of pipe.vae_scale_factor"
)


def _pixels(image, factor: int) -> torch.Tensor:
    """Any accepted image form -> float32 (B, 3, H, W) in [-1, 1] (uint8 x -> 2 x / 255 - 1, as diffusers)."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
        for im in image:  # RGBA needs a background and L a colour mapping: the caller's choice, not ours
            if im.mode != "RGB":
                raise ValueError(
                    f"{_ACCEPTED_IMAGES}; got a {im.mode} image: convert it first, e.g. "
                    "image.convert('RGB') (for RGBA, paste it onto the background you want)"
                )
        if len({im.size for im in image}) > 1:
            raise ValueError(f"the images differ in size ({sorted({im.size for im in image})}): a batch has one size")
        image = np.stack([np.asarray(im) for im in image])
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (3, 4) and image.shape[-1] == 3:
        array = image[None] if image.ndim == 3 else image
        pixels = torch.from_numpy(array.astype(np.float32) / 255.0).permute(0, 3, 1, 2) * 2.0 - 1.0
    elif isinstance(image, torch.Tensor) and image.is_floating_point() and image.ndim == 4 and image.shape[1] == 3:
        if image.min() < -1 or image.max() > 1:
            raise ValueError(
                f"{_ACCEPTED_IMAGES}; this tensor spans [{image.min():.3g}, {image.max():.3g}] "
                "(images in [0, 1]: pass x * 2 - 1)"
            )
        pixels = image
    else:
        got = (
            f"a {image.dtype} {type(image).__name__} of shape {tuple(image.shape)}"
            if hasattr(image, "shape")
            else type(image).__name__
        )
        raise ValueError(f"{_ACCEPTED_IMAGES}; got {got}")
    height, width = pixels.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(
            f"{_ACCEPTED_IMAGES}; this one is {width}x{height}, not a multiple of {factor}: crop or "
            f"resize it, e.g. to {width // factor * factor}x{height // factor * factor}"
        )
    return pixels


def encode_image(pipe, image, *, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Image(s) -> latents as the pipelines scale them (the inverse of decode_latents' un-scaling):
        latents = (z - latents_mean) * scaling_factor / latents_std,  or  (z - shift_factor) * scaling_factor
    z is the VAE posterior's mean, or a sample of it with sample=True (drawn with `generator`).
    Images: see _ACCEPTED_IMAGES; other sizes, modes or dtypes raise ValueError (nothing is resized or
    converted silently). Returns latents in the VAE's dtype, on its device."""
    mean, std = latent_distribution(pipe, image)
    if not sample:
        return mean
    noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else "cpu")
    return (mean + std * noise.to(mean.device, torch.float32)).to(mean.dtype)


def latent_distribution(pipe, image) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of image(s) in scaled latent units: (mean, std), so that mean + std * eps is a
    posterior sample scaled as encode_image's latents (the std is scaled, never shifted). mean has the
    VAE's dtype; std is float32."""
    pixels, vae = _pixels(image, pipe.vae_scale_factor), pipe.vae
    dtype, config = vae.dtype, vae.config
    with torch.no_grad(), _float32_if_forced(vae):
        posterior = vae.encode(pixels.to(vae.device, vae.dtype), return_dict=False)[0]
        z, std = posterior.mean, posterior.std.float()
    stats = _latent_stats(config, z)
    if stats is not None:
        return ((z - stats[0]) * config.scaling_factor / stats[1]).to(dtype), std * config.scaling_factor / stats[
            1
        ].float()
    shift = getattr(config, "shift_factor", None) or 0.0
    return ((z - shift) * config.scaling_factor).to(dtype), std * config.scaling_factor


# -- Text conditioning and the UNet call ------------------------------------------------------


@dataclass
class PromptEmbeddings:
    """What pipe.encode_prompt made, one row per image (prompts x num_images_per_prompt):
    cond, uncond                 (rows, tokens, dim): prompt / negative prompt; uncond None without guidance
    pooled_cond, pooled_uncond   (rows, dim): SDXL's pooled text embeddings; None for SD 1.x / 2.x"""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    pooled_cond: torch.Tensor | None = None
    pooled_uncond: torch.Tensor | None = None

    def unet_inputs(self, pipe, height: int, width: int, guidance: bool = True) -> dict:
        """The UNet's conditioning keywords for images of height x width pixels, rows [uncond, cond]
        with guidance: encoder_hidden_states, and for SDXL added_cond_kwargs = {text_embeds: pooled,
        time_ids}. time_ids are the SDXL pipelines' defaults: (original size, crop top-left, target
        size) = (height, width, 0, 0, height, width), or for pipelines with requires_aesthetics_score
        (the refiner) (height, width, 0, 0, aesthetic score 6.0; 2.5 for the uncond rows)."""
        if guidance and self.uncond is None:
            raise ValueError(
                "these embeddings have no unconditional half: encode them with "
                "encode_prompt(..., guidance=True), or call unet_inputs(..., guidance=False)"
            )
        halves = [True, False] if guidance else [False]  # is the half unconditional?
        inputs = {"encoder_hidden_states": torch.cat([self.uncond if u else self.cond for u in halves])}
        if pipe.unet.config.get("addition_embed_type") != "text_time":
            return inputs
        if self.pooled_cond is None:
            raise ValueError(
                "this UNet (SDXL) also needs the pooled text embeddings: encode the prompt with "
                "lab.diffusion.encode_prompt on this pipeline"
            )
        pooled = torch.cat([self.pooled_uncond if u else self.pooled_cond for u in halves])
        time_ids = torch.cat(
            [_time_ids(pipe, height, width, self.pooled_cond, u).repeat(len(self.cond), 1) for u in halves]
        )
        return {**inputs, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def _time_ids(pipe, height: int, width: int, pooled: torch.Tensor, uncond: bool) -> torch.Tensor:
    if pipe.config.get("requires_aesthetics_score", False):
        ids = [height, width, 0, 0, 2.5 if uncond else 6.0]
    else:
        ids = [height, width, 0, 0, height, width]
    expected = pipe.unet.add_embedding.linear_1.in_features
    made = pipe.unet.config.addition_time_embed_dim * len(ids) + pooled.shape[-1]
    if made != expected:
        raise ValueError(
            f"the UNet's added embedding takes {expected} numbers, but {len(ids)} time ids and a "
            f"{pooled.shape[-1]}-d pooled embedding make {made}: check the pipeline's "
            "requires_aesthetics_score (True only for SDXL refiners) and text_encoder_2"
        )
    return torch.tensor([ids], dtype=pooled.dtype, device=pooled.device)


def encode_prompt(
    pipe,
    prompt: str | list[str],
    negative_prompt: str | list[str] | None = None,
    *,
    guidance: bool = True,
    num_images_per_prompt: int = 1,
    clip_skip: int | None = None,
) -> PromptEmbeddings:
    """The prompt(s) through the pipeline's own encode_prompt (SD 1.x / 2.x and SDXL), under no_grad.
    With guidance the negative prompt is encoded too (None: the pipeline's choice, "" or, for SDXL with
    force_zeros_for_empty_prompt, zeros). SDXL's second text encoder gets the same prompts."""
    with torch.no_grad():
        encoded = pipe.encode_prompt(
            prompt=prompt,
            device=getattr(pipe, "_execution_device", pipe.device),
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=guidance,
            negative_prompt=negative_prompt,
            clip_skip=clip_skip,
        )
    return PromptEmbeddings(*encoded)  # SD: (cond, uncond); SDXL: (cond, uncond, pooled_cond, pooled_uncond)


def model_prediction(
    pipe, sample: torch.Tensor, timestep, conditioning, guidance_scale: float = 1.0, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """The UNet's output for latents x_t = sample at `timestep`, guided when guidance_scale != 1:
        out = unet(scheduler.scale_model_input([x_t, x_t]), t, rows [uncond, cond])
        -> guided_prediction(out_uncond, out_cond, guidance_scale, guidance_rescale)
    conditioning: PromptEmbeddings (the image size is read from the latents) or a dict from
    PromptEmbeddings.unet_inputs. Unlike the pipelines, which guide only when guidance_scale > 1, every
    scale != 1 is applied (0 gives the unconditional prediction). Runs in the caller's grad mode:
    wrap sampling loops in torch.no_grad()."""
    guided = guidance_scale != 1.0
    if isinstance(conditioning, PromptEmbeddings):
        height, width = (size * pipe.vae_scale_factor for size in sample.shape[-2:])
        conditioning = conditioning.unet_inputs(pipe, height, width, guidance=guided)
    rows, expected = len(conditioning["encoder_hidden_states"]), len(sample) * (2 if guided else 1)
    if rows != expected:
        layout = "two per latent, [uncond, cond], for guidance_scale != 1" if guided else "one per latent"
        raise ValueError(
            f"the conditioning has {rows} rows for {len(sample)} latents; it needs {layout}: match "
            "encode_prompt's prompts x num_images_per_prompt, and unet_inputs' guidance, to the call"
        )
    model_input = torch.cat([sample, sample]) if guided else sample
    model_input = pipe.scheduler.scale_model_input(model_input, timestep)
    output = pipe.unet(model_input, timestep, **conditioning, return_dict=False)[0]
    if not guided:
        return output
    uncond, cond = output.chunk(2)
    return guided_prediction(uncond, cond, guidance_scale, guidance_rescale)
