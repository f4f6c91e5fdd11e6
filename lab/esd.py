"""Erased Stable Diffusion (ESD): fine-tune the UNet so that a concept's prediction points away from it.

Gandikota, Materzyńska, Fiotto-Kaufman, Bau, "Erasing Concepts from Diffusion Models", ICCV 2023.

    with lab.esd.erase(pipe, "star", method="x", iterations=300, lr=1e-4) as edit:
        image = pipe("a red star").images[0]       # the concept is gone (while the block lasts)
        edit.save("no_star.safetensors")           # only the changed parameters
    with lab.weights.load("no_star.safetensors").apply(pipe):
        ...

The objective (the paper's eq. 4): with θ the frozen original weights and θ' the ones being trained,

    ε_θ'(x_t, c, t)  →  ε_θ(x_t, ∅, t) − η (ε_θ(x_t, c, t) − ε_θ(x_t, ∅, t))      loss = MSE

i.e. the edited model's conditional prediction is trained onto the original model's classifier-free
guidance *away* from c, at scale −η. x_t comes from the frozen model: its own DDIM sampling of c at
guidance 3, stopped at a random step k of 50 (lab.concept_training.sample_xt); t = timesteps[k].

Methods (which UNet parameters θ' are):
    "x"          ESD-x: every parameter of the cross-attention layers (`attn2`): to_q, to_k, to_v, to_out.
    "u"          ESD-u: everything else, less what the paper-era script also left alone: its `out.`
                 (diffusers: conv_norm_out, conv_out) and `time_embed` (time_embedding; and SDXL's
                 add_embedding, which adds into the time embedding; esd_sdxl.py skips every "emb").
    "x-strict"   the newer esd_sd.py's esd-x-strict: attn2.to_k and attn2.to_v only.

Defaults are the paper's (train-scripts/train-esd.py): η = 1, lr 1e-5, 1000 iterations, Adam,
guidance 3, 50 DDIM steps. The newer esd_sd.py changes them: 200 iterations, lr 5e-5, η = 2, images
of 1024 px (even for SD 1.4), bfloat16, and adds esd-x-strict. Other differences from the references:
  - x_t: the paper-era script samples it with the model *being trained*, and asks the UNet about it at
    a DDPM timestep drawn in [20k, 20k + 20) that does not match the sampler's noise level; esd_sd.py
    (and this file) sample with the frozen model and use t = timesteps[k].
  - the frozen model is not a second UNet: the trained parameters' original values are kept once and
    swapped in (`p.data = original`, no copy) for the frozen predictions and the sampling
    (lab.concept_training.frozen). Memory: one copy of θ' (ESD-x: ~3 % of SD 1.5's UNet; ESD-u:
    nearly all of it, as the reference's second UNet), plus the undo snapshot, kept in CPU memory.
  - v-prediction models (SD 2.x, TinyWorld): the loss is taken in ε by default (space="epsilon"):
    every output is converted with lab.diffusion.predicted_epsilon. The target is an affine mix of
    outputs at one x_t whose weights sum to 1, so in v it reads the same, v' → v_∅ − η(v_c − v_∅), and
    the two losses differ only by a weight ᾱ_t per sample (ε = √ᾱ v + √(1−ᾱ) x_t). ε keeps the paper's
    weighting over timesteps, so η and lr mean what they mean on SD 1.4; space="model" takes the loss
    on the raw output instead (for v: more weight on the noisy steps, where layout is decided).

Training runs on lab.concept_training.train (accelerate: devices, mixed precision, gradient
accumulation, checkpoints; resume_from a checkpoint folder continues where it stopped).
The returned edit is a lab.weights.WeightEdit: restored bit for bit when the block ends, and also when
training fails or is interrupted (before `erase` returns, the pipeline is put back and the error raised).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lab import concept_training, diffusion
from lab.weights import WeightEdit

__all__ = ["erase", "ESDEdit", "METHODS", "parameter_selector"]

METHODS = ("x", "u", "x-strict")
_ESD_U_SKIPS = ("unet.time_embedding.", "unet.add_embedding.", "unet.conv_norm_out.", "unet.conv_out.")


def parameter_selector(method: str):
    """The lab.weights predicate choosing θ' for a method (see the module docstring)."""
    if method == "x":
        return lambda name, p: name.startswith("unet.") and ".attn2." in name
    if method == "x-strict":
        return lambda name, p: name.startswith("unet.") and (".attn2.to_k." in name or ".attn2.to_v." in name)
    if method == "u":
        return lambda name, p: name.startswith("unet.") and ".attn2." not in name and not name.startswith(_ESD_U_SKIPS)
    raise ValueError(f"method must be one of {METHODS} (ESD-x, ESD-u, esd-x-strict), not {method!r}")


class ESDEdit(WeightEdit):
    """A WeightEdit holding an ESD fine-tune: `losses` per micro-batch, `settings` it was trained with."""

    losses: list[float]
    settings: dict


def erase(
    pipe,
    concept: str,
    *,
    method: str = "x",
    iterations: int = 1000,
    lr: float = 1e-5,
    eta: float = 1.0,
    guidance_scale: float = 3.0,
    num_steps: int = 50,
    space: str = "epsilon",
    resolution: int | None = None,
    seed: int = 0,
    optimizer: str = "adam",
    **training,
) -> ESDEdit:
    """Train ESD on `pipe` now; returns the edit, to be used as a context (restored on exit).

    concept: the prompt to erase ("star", "Van Gogh"). method: "x", "u" or "x-strict". eta: the
    negative guidance η. resolution: the square image size x_t is sampled at (default the UNet's).
    training: lab.concept_training.train's keywords (mixed_precision, gradient_accumulation_steps,
    accelerator, checkpoint_dir, checkpoint_every, resume_from, lr_scheduler, progress, ...)."""
    if not isinstance(concept, str) or not concept.strip():
        raise ValueError(f"concept must be a non-empty prompt, got {concept!r}: nothing was changed")
    concept_training.check_iterations(iterations)
    selector = parameter_selector(method)
    if not math.isfinite(eta) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"eta must be finite and lr positive, got eta={eta!r}, lr={lr!r}: nothing was changed")
    if space not in ("epsilon", "model"):
        raise ValueError(f"space must be 'epsilon' or 'model', not {space!r}")

    edit = ESDEdit(pipe, selector, offload=True)  # the undo snapshot in CPU memory
    edit.settings = dict(
        concept=concept, method=method, iterations=iterations, lr=lr, eta=eta, guidance_scale=guidance_scale,
        num_steps=num_steps, space=space, seed=seed, optimizer=optimizer,
    )  # fmt: skip
    try:
        trainable = {name.removeprefix("unet."): p for name, p in edit.parameters.items()}
        originals = {name: p.detach().clone() for name, p in trainable.items()}  # θ, for the frozen predictions
        size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        embeddings = diffusion.encode_prompt(pipe, concept, guidance=True)
        both = embeddings.unet_inputs(pipe, size, size, guidance=True)  # rows [∅, c]
        cond = embeddings.unet_inputs(pipe, size, size, guidance=False)  # row c
        prediction_type = pipe.scheduler.config.prediction_type

        def loss(model, generator):
            with concept_training.frozen(trainable, originals), torch.no_grad():
                x_t, t, scheduler = concept_training.sample_xt(
                    pipe, concept, generator=generator, num_steps=num_steps,
                    guidance_scale=guidance_scale, resolution=size,
                )  # fmt: skip
                uncond, conditional = concept_training.unet_output(pipe.unet, scheduler, x_t, t, both).chunk(2)
                target = diffusion.guided_prediction(uncond, conditional, -eta)  # ε_∅ − η(ε_c − ε_∅)
            prediction = concept_training.unet_output(model, scheduler, x_t, t, cond)
            if space == "epsilon":
                abar = diffusion.alpha_bar(scheduler, t)
                prediction = diffusion.predicted_epsilon(prediction, x_t, abar, prediction_type)
                target = diffusion.predicted_epsilon(target, x_t, abar, prediction_type)
            return F.mse_loss(prediction.float(), target.float())

        edit.losses = concept_training.train(
            pipe.unet, trainable, loss, iterations=iterations, lr=lr, optimizer=optimizer, seed=seed,
            description=f"ESD-{method} erasing {concept!r}", **training,
        )  # fmt: skip
    except BaseException:
        edit.restore()  # an error or Ctrl-C mid-training leaves the pipeline as it was
        raise
    return edit
