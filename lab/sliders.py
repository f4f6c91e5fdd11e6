"""Concept Sliders (text sliders): a LoRA whose scale moves one attribute up or down.

Gandikota, Materzyńska, Zhou, Torralba, Bau, "Concept Sliders: LoRA Adaptors for Precise Control in
Diffusion Models", ECCV 2024 (reference: rohitgandikota/sliders, trainscripts/textsliders/).

    slider = lab.sliders.train(pipe, target="", positive="large", negative="small", iterations=300)
    slider.save("size_slider/")                          # diffusers' LoRA format
    with lab.sliders.apply(pipe, ["size_slider/"], scales=[2.0], start_step=3):
        image = pipe("a red star").images[0]             # bigger; scale -2: smaller
    pipe.load_lora_weights("size_slider/")               # plain diffusers loads it too

The objective (the reference's "enhance" action): with θ the frozen model and θ + LoRA the slider at
scale 1, for prompts target c_t, neutral c_n, positive c_+ and negative c_− (the reference calls it
"unconditional"),

    ε_LoRA(x_t, c_t)  →  ε_θ(x_t, c_n) + η (ε_θ(x_t, c_+) − ε_θ(x_t, c_−))        loss = MSE,  η = 4

x_t comes from the frozen model (lab.concept_training.sample_xt: its DDIM sampling of c_t at
guidance 3, stopped after k of 50 steps, k in 1..49). The reference's "erase" action is η < 0.
Defaults from the reference's config.yaml: rank 4, alpha 1, AdamW lr 2e-4 constant, 1000
iterations, `noxattn` with its default network type `c3lier`. That is, LoRA on:
  - every Linear of the self-attention modules (attn1.to_q, to_k, to_v, to_out.0), none of attn2;
  - every Linear / Conv2d of ResnetBlock2D (conv1, conv2, time_emb_proj, conv_shortcut) and of the
    Downsample2D / Upsample2D convolutions (config.yaml's "c3lier" appends those classes to the
    target list in place, so they are in every c3lier run);
  - never the time embedding or the transformer's proj_in / proj_out / feed-forward.
conv=False gives the "lierla" network (attention only).
`attributes` (the reference's --attributes "male, female") repeats the prompt set once per attribute,
each prompt prefixed with it ("male " + prompt), and each iteration draws one set, so the slider learns
the direction for several of them instead of entangling it with one.

Differences from the reference, each deliberate:
  - x_t is sampled with the frozen model (the LoRA off); the reference samples it with the LoRA on.
  - t = the 50-step schedule's timesteps[k] where x_t is; the reference takes the 1000-step
    schedule's entry 20 k (the same noise level to within one training step).
  - LoRA init is peft's (A: Kaiming-uniform, a = √5; B: zeros); the reference uses a = 1. B = 0 either
    way, so an untrained slider is the base model.
  - The reference trains only scale +1 (the negative side follows from the LoRA being a linear
    update); symmetric=True also trains scale −1 toward ε_n − η(ε_+ − ε_−), as its image sliders and
    FLUX notebook do for their ±1 pairs.
  - v-prediction models: the loss is in ε by default (see lab.esd: the target's weights sum to 1, so
    this is the v loss weighted by ᾱ_t); space="model" takes it on the raw output.
At inference the reference switches the slider off while t > 800 (`start_noise=800`); here
`start_noise=` does the same and `start_step=` counts denoising steps instead. Off means adapter
weight 0, which leaves every LoRA layer's output bit for bit the base layer's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lab import concept_training, diffusion
from lab.weights import LoraAdapter, LoraWeights

__all__ = ["train", "apply", "Slider", "target_modules", "check_fits"]

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes and loads
_C3LIER_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D", "DownBlock2D", "UpBlock2D")


def target_modules(unet, *, method: str = "noxattn", conv: bool = True) -> list[str]:
    """The UNet module names the reference puts LoRA on (module docstring); full paths, for LoraConfig."""
    if method not in ("noxattn", "xattn", "full"):
        raise ValueError(f"method must be 'noxattn', 'xattn' or 'full', not {method!r}")
    classes = ("Attention",) + (_C3LIER_CLASSES if conv else ())
    names = []
    for name, module in unet.named_modules():
        if type(module).__name__ not in classes:
            continue
        if method == "noxattn" and ("attn2" in name or "time_embed" in name):
            continue
        if method == "xattn" and "attn2" not in name:
            continue
        for child, layer in module.named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and child:
                full = f"{name}.{child}"
                if full not in names:
                    names.append(full)
    return names


class Slider:
    """A trained slider: the LoRA in diffusers' format (`tensors`, `metadata`), `settings` and `losses`."""

    def __init__(self, tensors: dict, metadata: dict, settings: dict, losses: list[float] | None = None):
        self.tensors, self.metadata, self.settings, self.losses = tensors, metadata, settings, losses or []

    def save(self, folder) -> Path:
        """Write `folder/pytorch_lora_weights.safetensors` (plain `pipe.load_lora_weights(folder)` loads it)
        and `folder/slider.json` (the settings)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors, str(folder / WEIGHT_NAME), metadata=self.metadata)
        (folder / "slider.json").write_text(json.dumps({"settings": self.settings, "losses": self.losses}, indent=1))
        return folder

    @classmethod
    def load(cls, folder) -> "Slider":
        folder = Path(folder)
        file = _weights_file(folder)
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
        info = json.loads((folder / "slider.json").read_text()) if (folder / "slider.json").is_file() else {}
        return cls(load_file(str(file)), metadata, info.get("settings", {}), info.get("losses"))

    def __repr__(self) -> str:
        s = self.settings
        return f"Slider({s.get('positive')!r} vs {s.get('negative')!r} on {s.get('target')!r}, {len(self.tensors)} tensors)"


def _prompt(text, name: str, *, required: bool) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a string, got {type(text).__name__}")
    if required and not text.strip():
        raise ValueError(f"{name} must be a non-empty prompt (the attribute the slider adds): nothing was trained")
    return text


def train(
    pipe,
    target: str = "",
    positive: str = "",
    negative: str = "",
    neutral: str | None = None,
    *,
    eta: float = 4.0,
    iterations: int = 1000,
    lr: float = 2e-4,
    rank: int = 4,
    alpha: float = 1.0,
    method: str = "noxattn",
    conv: bool = True,
    attributes: list[str] | None = None,
    symmetric: bool = False,
    guidance_scale: float = 3.0,
    num_steps: int = 50,
    space: str = "epsilon",
    resolution: int | None = None,
    seed: int = 0,
    optimizer: str = "adamw",
    **training,
) -> Slider:
    """Train a text slider on `pipe`; the pipeline is left as it was. Returns the Slider.

    target: where the slider acts ("" everywhere, "person"); positive / negative: the two ends
    ("large" / "small"; negative "" = the reference's default unconditional); neutral: defaults to
    target (as the reference's prompt files set it). training: lab.concept_training.train's keywords
    (mixed_precision, gradient_accumulation_steps, checkpoint_dir, checkpoint_every, resume_from, ...)."""
    from peft import LoraConfig

    target = _prompt(target, "target", required=False)
    positive = _prompt(positive, "positive", required=True)
    negative = _prompt(negative, "negative", required=False)
    neutral = target if neutral is None else _prompt(neutral, "neutral", required=False)
    concept_training.check_iterations(iterations)
    if not math.isfinite(eta) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"eta must be finite and lr positive, got eta={eta!r}, lr={lr!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if space not in ("epsilon", "model"):
        raise ValueError(f"space must be 'epsilon' or 'model', not {space!r}")
    prefixes = [""] if not attributes else [f"{a.strip()} " for a in attributes]
    sets = [[(p + s).strip() for s in (target, neutral, positive, negative)] for p in prefixes]
    settings = dict(
        target=target, positive=positive, negative=negative, neutral=neutral, eta=eta, iterations=iterations,
        lr=lr, rank=rank, alpha=alpha, method=method, conv=conv, attributes=list(attributes or []),
        symmetric=symmetric, guidance_scale=guidance_scale, num_steps=num_steps, space=space, seed=seed,
    )  # fmt: skip

    size = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    prediction_type = pipe.scheduler.config.prediction_type
    inputs = []  # per prompt set: (the target row, rows [neutral, positive, negative])
    for prompts in sets:
        trained = diffusion.encode_prompt(pipe, prompts[0], guidance=False).unet_inputs(pipe, size, size, False)
        frozen = diffusion.encode_prompt(pipe, prompts[1:], guidance=False).unet_inputs(pipe, size, size, False)
        inputs.append((trained, frozen))
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights=True,
        target_modules=target_modules(pipe.unet, method=method, conv=conv),
    )

    with LoraAdapter(pipe, config, adapter_name="sdlab_slider_training") as lora:

        def loss(model, generator):
            index = int(torch.randint(len(sets), (1,), generator=generator))
            trained, frozen = inputs[index]
            pipe.unet.disable_adapters()  # the frozen model: every LoRA layer returns its base layer's output
            try:
                with torch.no_grad():
                    x_t, t, scheduler = concept_training.sample_xt(
                        pipe, sets[index][0], generator=generator, num_steps=num_steps,
                        guidance_scale=guidance_scale, steps=range(1, num_steps), resolution=size,
                    )  # fmt: skip
                    e_neutral, e_positive, e_negative = concept_training.unet_output(
                        pipe.unet, scheduler, x_t, t, frozen
                    ).chunk(3)
            finally:
                pipe.unet.enable_adapters()
            direction = e_positive - e_negative
            total = 0.0
            for sign in (1.0, -1.0) if symmetric else (1.0,):
                if symmetric:
                    lora.scale = sign
                prediction = concept_training.unet_output(model, scheduler, x_t, t, trained)
                goal = e_neutral + sign * eta * direction  # ε_n ± η(ε_+ − ε_−)
                if space == "epsilon":
                    abar = diffusion.alpha_bar(scheduler, t)
                    prediction = diffusion.predicted_epsilon(prediction, x_t, abar, prediction_type)
                    goal = diffusion.predicted_epsilon(goal, x_t, abar, prediction_type)
                total = total + F.mse_loss(prediction.float(), goal.float())
            return total / (2 if symmetric else 1)

        losses = concept_training.train(
            pipe.unet, lora.parameters, loss, iterations=iterations, lr=lr, optimizer=optimizer, seed=seed,
            description=f"slider {positive!r} vs {negative!r}", **training,
        )  # fmt: skip
        lora.scale = 1.0
        with tempfile.TemporaryDirectory() as folder:
            lora.save(folder)
            slider = Slider.load(folder)
    slider.settings, slider.losses = settings, losses
    return slider


# ---------------------------------------------------------------------------------------------- inference


def _weights_file(source: Path) -> Path:
    if source.is_file():
        return source
    file = source / WEIGHT_NAME
    if not file.is_file():
        raise ValueError(f"{source} holds no {WEIGHT_NAME}: pass a folder written by Slider.save or save_lora_weights")
    return file


def check_fits(pipe, slider) -> None:
    """Raise a ValueError, loading nothing, if `slider` (a Slider, folder or .safetensors file) was trained on
    another architecture: a LoRA layer this pipeline's UNet does not have, or has with other sizes."""
    tensors = slider.tensors if isinstance(slider, Slider) else load_file(str(_weights_file(Path(slider))))
    _check_fits(pipe.unet, tensors, repr(slider) if isinstance(slider, Slider) else slider)


def _check_fits(unet, tensors: dict, source) -> None:
    problems = []
    for key, tensor in tensors.items():
        match = re.fullmatch(r"unet\.(.+)\.lora(?:_A|_B|\.down|\.up)\.weight", key)
        if match is None:
            continue
        path, first = match.group(1), ("lora_A" in key or "lora.down" in key)
        try:
            layer = unet.get_submodule(path)
        except AttributeError:
            problems.append(f"{path}: no such layer")
            continue
        layer = getattr(layer, "base_layer", layer)  # already wrapped by another adapter
        size = getattr(layer, "in_features", getattr(layer, "in_channels", None))
        out = getattr(layer, "out_features", getattr(layer, "out_channels", None))
        if (tensor.shape[1] != size) if first else (tensor.shape[0] != out):
            problems.append(f"{path}: LoRA {'down' if first else 'up'} {tuple(tensor.shape)} vs layer {size} -> {out}")
    if problems:
        raise ValueError(
            f"the slider {source} does not fit this UNet (trained on another architecture?); nothing was "
            f"loaded. {len(problems)} layers differ, e.g.:\n  " + "\n  ".join(problems[:5])
        )


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _free_name(pipe, taken: list[str]) -> str:
    loaded = set(getattr(pipe.unet, "peft_config", None) or {}) | set(taken)
    i = 0
    while f"sdlab_slider_{i}" in loaded:
        i += 1
    return f"sdlab_slider_{i}"


class apply:
    """Sliders on `pipe` at `scales` for the length of a `with` block; a plain `pipe(...)` call inside uses them.

    sliders: Slider objects or folders / .safetensors files in diffusers' LoRA format, each at its
    scale (any finite number; 0 is the base model bit for bit). Several are combined with diffusers'
    `set_adapters(names, weights)`. start_step=i: off for the denoising steps before i (the step's index
    in pipe.scheduler.timesteps); start_noise=t: off while the timestep is above t (the reference's
    start_noise=800). The switch is a forward pre-hook on the UNet reading each call's timestep (a torch
    hook, removed on exit). Leaving the block unloads every slider: the pipeline is as it was."""

    def __init__(self, pipe, sliders, scales, *, start_step: int | None = None, start_noise: float | None = None):
        sliders = [sliders] if isinstance(sliders, (str, os.PathLike, Slider)) else list(sliders)
        scales = [scales] if isinstance(scales, (int, float)) else list(scales)
        if len(sliders) != len(scales) or not sliders:
            raise ValueError(f"give one scale per slider: {len(sliders)} sliders, {len(scales)} scales")
        for s in scales:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ValueError(f"every scale must be a finite number, got {s!r}: nothing was loaded")
        if start_step is not None and start_noise is not None:
            raise ValueError("give start_step or start_noise, not both")
        if start_step is not None and (
            isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0
        ):
            raise ValueError(f"start_step must be a step index >= 0, got {start_step!r}")
        self.pipe, self.scales = pipe, [float(s) for s in scales]
        self.start_step, self.start_noise = start_step, start_noise
        self.names: list[str] = []
        self._stack, self._hook, self._on = contextlib.ExitStack(), None, None
        try:
            with tempfile.TemporaryDirectory() as scratch:
                sources = []
                for i, slider in enumerate(sliders):
                    if isinstance(slider, Slider):
                        source = slider.save(Path(scratch) / str(i))
                        tensors = slider.tensors
                    else:
                        source = Path(slider)
                        tensors = load_file(str(_weights_file(source)))
                    _check_fits(pipe.unet, tensors, slider if not isinstance(slider, Slider) else repr(slider))
                    sources.append(source)
                for source in sources:
                    name = _free_name(pipe, self.names)
                    kwargs = {"weight_name": source.name} if source.is_file() else {}
                    folder = source.parent if source.is_file() else source
                    with _quiet_diffusers():  # a UNet-only LoRA: diffusers warns the text encoder has no keys
                        lora = LoraWeights(pipe, str(folder), adapter_name=name, **kwargs)  # loads it
                    self._stack.enter_context(lora)
                    self.names.append(name)
            self._switch(start_step is None and start_noise is None or start_step == 0)
            if start_step or start_noise is not None:
                self._hook = pipe.unet.register_forward_pre_hook(self._before_unet, with_kwargs=True)
        except BaseException:
            self.close()
            raise

    def _switch(self, on: bool) -> None:
        if on != self._on:
            self.pipe.set_adapters(self.names, adapter_weights=self.scales if on else [0.0] * len(self.names))
            self._on = on

    def _before_unet(self, module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        t = float(torch.as_tensor(t).flatten()[0])
        if self.start_noise is not None:
            self._switch(t <= self.start_noise)
            return
        schedule = [float(s) for s in self.pipe.scheduler.timesteps]
        if t not in schedule:
            raise RuntimeError(
                f"start_step: timestep {t} is not in pipe.scheduler.timesteps, so its step index is unknown; "
                "use start_noise= (a timestep threshold) with this pipeline"
            )
        self._switch(schedule.index(t) >= self.start_step)

    def close(self) -> None:
        """Remove the switch and unload the sliders (idempotent); leaving the block calls this."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._stack.close()

    def __enter__(self) -> "apply":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
