"""The training loop ESD (lab.esd) and Concept Sliders (lab.sliders) share, on accelerate and diffusers.

    x_t, t = sample_xt(pipe, "a red star", generator=g)          # the frozen model's own DDIM run, stopped at a random step
    losses = train(pipe.unet, trainable, lambda model, g: loss, iterations=1000, lr=1e-5, optimizer="adam")

Both methods train on latents the model itself generates: x_t is the pipeline's own DDIM sampling
(a private DDIMScheduler built from the pipeline's scheduler config, guidance 3 as both references)
from noise, stopped after k of 50 steps, k drawn at random; the UNet is then asked about x_t at
t = timesteps[k]. `sample_xt` runs the pipeline call itself (`pipe(..., output_type="latent")`) and stops it
with diffusers' documented interrupt (`pipe._interrupt = True` from `callback_on_step_end`).

`train` is accelerate's loop, nothing more: an `Accelerator` places the model, runs mixed precision
and gradient accumulation (`accelerator.accumulate`), DDP on several GPUs (`accelerate launch`, same
code), and `save_state` / `load_state` checkpoints (optimizer, LR schedule, the loop's step and random
generator, and through a save/load hook pair only the trained tensors, not the whole UNet: ESD-x's
checkpoint is its cross-attention, a slider's its LoRA). The LR schedule is diffusers'
`get_scheduler`; progress is a tqdm.auto bar. No EMA or SNR weighting: neither reference uses them.
Every random draw of a run comes from one torch.Generator seeded by `seed` and saved in the
checkpoint, so a resumed run continues exactly as an uninterrupted one (bit for bit on the CPU).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

__all__ = ["sample_xt", "frozen", "train", "unet_output", "check_iterations"]

TRAINED_FILE = "trained_parameters.safetensors"


def check_iterations(iterations) -> int:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations <= 0:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}: nothing was trained or changed")
    return iterations


def _ddim(pipe):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(pipe.scheduler.config)


@contextlib.contextmanager
def _scheduler(pipe, scheduler):
    """pipe.scheduler is `scheduler` inside the block, the pipeline's own again after it (also on errors)."""
    own = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield scheduler
    finally:
        pipe.scheduler = own


def sample_xt(
    pipe,
    prompt: str,
    *,
    generator: torch.Generator,
    num_steps: int = 50,
    guidance_scale: float = 3.0,
    steps: range | None = None,
    resolution: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """x_t from the pipeline's own DDIM sampling of `prompt`, stopped at a random step k of `num_steps`.

    k is drawn from `steps` (default range(num_steps): ESD's randint(0, 49); the sliders' reference uses
    range(1, num_steps)). x_t is the latent the sampler holds before step k, at t = timesteps[k]
    (k = 0: the initial noise). Runs under no_grad with whatever weights the UNet has now: wrap it in
    `frozen(...)` to sample from the original model. Returns (x_t, t, the DDIM scheduler used)."""
    steps = range(num_steps) if steps is None else steps
    k = steps[int(torch.randint(len(steps), (1,), generator=generator))]
    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    noise = torch.randn(shape, generator=generator).to(pipe.unet.device, pipe.unet.dtype)
    scheduler = _ddim(pipe)
    scheduler.set_timesteps(num_steps, device=pipe.unet.device)
    if k == 0:
        return noise * scheduler.init_noise_sigma, scheduler.timesteps[0], scheduler

    def stop(pipeline, i, t, kwargs):
        if i == k - 1:
            pipeline._interrupt = True  # diffusers' documented way to end a pipeline call early
        return kwargs

    with torch.no_grad(), _scheduler(pipe, scheduler), _quiet(pipe):
        x_t = pipe(
            prompt,
            height=size,
            width=size,
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            latents=noise,
            output_type="latent",
            callback_on_step_end=stop,
        ).images
    return x_t, scheduler.timesteps[k], scheduler


@contextlib.contextmanager
def _quiet(pipe):
    """No nested progress bar per sampled x_t (the pipeline's own setting is back afterwards)."""
    own = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**own, "disable": True})
    try:
        yield
    finally:
        pipe._progress_bar_config = own


def unet_output(unet, scheduler, x_t, t, inputs: dict) -> torch.Tensor:
    """The UNet's raw output (epsilon, v or x0, as the model predicts) for x_t at t, one row per
    conditioning row of `inputs` (lab.diffusion.PromptEmbeddings.unet_inputs)."""
    rows = len(inputs["encoder_hidden_states"])
    x = scheduler.scale_model_input(x_t.expand(rows, *x_t.shape[1:]), t)
    return unet(x, t, **inputs, return_dict=False)[0]


@contextlib.contextmanager
def frozen(parameters: dict[str, torch.nn.Parameter], originals: dict[str, torch.Tensor]):
    """The original weights for the length of the block: each parameter's tensor is swapped for its
    frozen copy (`p.data = original`, no copy), and swapped back after it (also on errors). This is
    how the frozen model's predictions are computed without a second UNet: the memory is one copy of
    the *trained* parameters only (ESD-x: the cross-attention, ~3 % of SD 1.5's UNet)."""
    live = {name: p.data for name, p in parameters.items()}
    try:
        for name, p in parameters.items():
            p.data = originals[name]
        yield
    finally:
        for name, p in parameters.items():
            p.data = live[name]


class _LoopState:
    """What accelerate's checkpoint must carry besides weights and optimizer: the step and the generator."""

    def __init__(self, generator: torch.Generator):
        self.step, self.generator = 0, generator

    def state_dict(self) -> dict:
        return {"step": self.step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])


def _optimizer_class(name: str):
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name.lower() not in classes:
        raise ValueError(f"optimizer must be one of {sorted(classes)}, not {name!r}")
    return classes[name.lower()]


def train(
    unet: torch.nn.Module,
    trainable: dict[str, torch.nn.Parameter],
    compute_loss: Callable[[torch.nn.Module, torch.Generator], torch.Tensor],
    *,
    iterations: int,
    lr: float,
    optimizer: str = "adam",
    optimizer_kwargs: dict | None = None,
    lr_scheduler: str = "constant",
    lr_warmup_steps: int = 0,
    seed: int = 0,
    accelerator=None,
    mixed_precision: str | None = None,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume_from: str | os.PathLike | None = None,
    progress: bool = True,
    description: str = "training",
) -> list[float]:
    """Optimise `trainable` (parameters of `unet`, by name) for `iterations` optimizer steps; returns the losses.

    compute_loss(model, generator) returns one micro-batch's loss: `model` is the UNet as accelerate
    prepared it (wrapped in DDP on several GPUs; call it for the prediction being trained), and every
    random draw must come from `generator`. With gradient_accumulation_steps = g an optimizer step
    takes g micro-batches. Every other parameter of `unet` is frozen meanwhile (requires_grad False)
    and its flags are put back afterwards. Checkpoints: `checkpoint_every` steps into
    `checkpoint_dir/checkpoint-<step>` (accelerate's `save_state`); `resume_from` such a folder continues
    at its step with its optimizer, schedule and generator. The trained values stay in `unet`."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    check_iterations(iterations)
    if checkpoint_every is not None and (checkpoint_every <= 0 or checkpoint_dir is None):
        raise ValueError("checkpoint_every needs a positive number of steps and a checkpoint_dir")
    if resume_from is not None and not os.path.isfile(os.path.join(resume_from, TRAINED_FILE)):
        raise ValueError(
            f"{resume_from} is not a checkpoint of this loop (no {TRAINED_FILE}): pass a "
            "checkpoint_dir/checkpoint-<step> folder written with checkpoint_every"
        )
    own_accelerator = accelerator is None
    if own_accelerator:
        accelerator = Accelerator(
            mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps
        )
    if unet.device != accelerator.device:
        raise ValueError(
            f"the UNet is on {unet.device} but accelerate trains on {accelerator.device}: move the pipeline "
            "there first (pipe.to(accelerator.device)); nothing was changed"
        )
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    chosen = {id(p) for p in trainable.values()}
    generator = torch.Generator().manual_seed(seed)
    state = _LoopState(generator)
    # The checkpoint holds the trained tensors only (the diffusers training scripts' hook pattern).
    unet_names = {id(p): n for n, p in unet.named_parameters()}

    def save_hook(models, weights, output_dir):
        for i, model in reversed(list(enumerate(models))):
            if accelerator.unwrap_model(model) is unet:
                tensors = {unet_names[id(p)]: p.detach().cpu().contiguous() for p in trainable.values()}
                save_file(tensors, os.path.join(output_dir, TRAINED_FILE))
                weights.pop(i)

    def load_hook(models, input_dir):
        for i, model in reversed(list(enumerate(models))):
            if accelerator.unwrap_model(model) is unet:
                tensors = load_file(os.path.join(input_dir, TRAINED_FILE))
                with torch.no_grad():
                    for p in trainable.values():
                        p.copy_(tensors[unet_names[id(p)]])
                models.pop(i)

    handles = [accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)]
    losses: list[float] = []
    model = unet
    try:
        for p in unet.parameters():
            p.requires_grad_(id(p) in chosen)
        opt = _optimizer_class(optimizer)(list(trainable.values()), lr=lr, **(optimizer_kwargs or {}))
        schedule = get_scheduler(
            lr_scheduler,
            opt,
            num_warmup_steps=lr_warmup_steps * accelerator.num_processes,
            num_training_steps=iterations * accelerator.num_processes,
        )
        model, opt, schedule = accelerator.prepare(unet, opt, schedule)
        accelerator.register_for_checkpointing(state)
        if resume_from is not None:
            accelerator.load_state(str(resume_from))
        steps = iterations * accelerator.gradient_accumulation_steps
        bar = tqdm(
            total=iterations,
            initial=state.step,
            desc=description,
            disable=not progress or not accelerator.is_local_main_process,
        )
        micro = state.step * accelerator.gradient_accumulation_steps
        model.train()
        while micro < steps:
            with accelerator.accumulate(model), accelerator.autocast():
                loss = compute_loss(model, generator)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss became {loss.item()} at step {state.step}: lower lr")
                accelerator.backward(loss)
                if accelerator.sync_gradients and max_grad_norm is not None:
                    accelerator.clip_grad_norm_(list(trainable.values()), max_grad_norm)
                opt.step()
                schedule.step()
                opt.zero_grad(set_to_none=True)
            micro += 1
            losses.append(loss.item())
            if accelerator.sync_gradients:
                state.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
                if checkpoint_every and state.step % checkpoint_every == 0 and state.step < iterations:
                    accelerator.save_state(os.path.join(str(checkpoint_dir), f"checkpoint-{state.step}"))
        bar.close()
        accelerator.wait_for_everyone()
    finally:
        model.eval()
        for handle in handles:
            handle.remove()
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # undoes accelerate's autocast forward
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        if own_accelerator:
            accelerator.free_memory()  # a caller's accelerator keeps our model and optimizer registered
    return losses
