"""Self-Attention Guidance (Hong et al., "Improving Sample Quality of Diffusion Models Using Self-Attention
Guidance", ICCV 2023, arXiv 2210.00939), on the pipeline you already have:

    with lab.sag(pipe, scale=0.75) as sag:
        image = pipe(prompt).images[0]
    sag.masks       # per step: (images, h, w) bool, the positions the mid block's self-attention dwells on

At each step, from the UNet's own call at x_t (the uncond rows under classifier-free guidance, else the cond rows):

    A     the mid block's self-attention probabilities (mid_block.attentions.0.transformer_blocks.0.attn1),
          (heads, queries, keys) per image
    M     = [ sum over queries of mean over heads of A  > 1 ]: per key position, on the site's (h, w) grid,
          upsampled (nearest) to the latent
    x0^   = the x0 the prediction implies at x_t;  eps^ = the eps it implies  (lab.diffusion, any prediction type)
    x~_t  = sqrt(abar) (M * blur(x0^) + (1 - M) * x0^) + sqrt(1 - abar) eps^    blur: Gaussian, 9x9, sigma 1
    eps   = eps(x_t, c) + s (eps(x_t, c) - eps(x~_t, c))                                    w <= 1 (no CFG)
    eps   = eps(x_t, 0) + w (eps(x_t, c) - eps(x_t, 0)) + s (eps(x_t, 0) - eps(x~_t, 0))    with CFG

with s = 0.75, as diffusers' StableDiffusionSAGPipeline (`pipelines/deprecated/stable_diffusion_sag/`:
`sag_masking`, `pred_x0`, `pred_epsilon`, `gaussian_blur_2d` and its denoising loop), which follows the
paper's guidance with CFG (its comment: "we only use unconditional one according to equation (25)"). "eps"
is the model's output (v for v-prediction models), as there. At abar = 0 (the first step of zero-terminal-SNR
schedules, TinyWorld's) x~_t = eps^ = x_t: the degraded pass sees the input itself and SAG adds ~0, in both.

On lab's core: edits at the main pass keep the UNet's input x_t and the mask of this call; an edit of the
UNet's output degrades x0^, runs the "sag" side pass on the degraded latent (Trace.call_unet, with the
rows' own text and SDXL conditioning) and folds s (eps - eps~) into the rows the pipeline's own guidance
reads (lab.guidance). Image-to-image, non-square and odd latent sizes work (the mask is laid out on the
site's grid, not sqrt(queries)); the blur's reflect padding needs latents above 4 x 4. diffusers' SAG
pipeline has no guidance_rescale; with StableDiffusionPipeline's, the whole guided prediction, SAG's term
included, is rescaled against the UNet's own cond rows (the term goes into the uncond rows then), as
diffusers' PAG pipeline does with its term.

x_t is the UNet's input, after scheduler.scale_model_input, and abar that input's noise level
(lab.diffusion.input_alpha_bar). For DDIM (and DDPM, PNDM, DPM-Solver, UniPC, whose scale_model_input is the
identity) this is diffusers' computation from the scheduler's latent and alphas_cumprod[t]. For sigma
schedulers (Euler, Heun, LMS...) the UNet's input x / sqrt(sigma^2 + 1) is the variance-preserving x_t at
abar = 1 / (1 + sigma^2), so x0^ and the re-noising stay exact; diffusers' SAG pipeline refuses those
(float timesteps), and with sigmas between training steps (use_karras_sigmas) reads abar at the rounded t.
diffusers reshapes the map with unet.config.attention_head_dim as the head count (the heads of SD 1.x/2.x
configs); lab reads the heads from the map itself.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from lab import diffusion, hooks
from lab.guidance import check_scale, guidance_term
from lab.hooks import StepContext

__all__ = ["sag", "SAG", "SITE", "attention_mask", "degrade", "gaussian_blur"]

SITE = "mid_block.attentions.0.transformer_blocks.0.attn1"  # the map diffusers' pipeline stores
KERNEL_SIZE, SIGMA, THRESHOLD = 9, 1.0, 1.0


def sag(pipe, scale: float = 0.75) -> "SAG":
    """Self-attention guidance on `pipe`'s generations inside the `with` block (see the module docstring).
    scale: s (diffusers' sag_scale, default 0.75); 0 adds nothing."""
    return SAG(pipe, scale)


class SAG:
    """The context manager lab.sag returns; read `masks` from it (one (images, h, w) bool tensor per step)."""

    def __init__(self, pipe, scale: float = 0.75):
        self.pipe = pipe
        self.scale = check_scale("scale", scale)
        found = [site for site in hooks.sites(pipe) if site.name == SITE]
        if not found or found[0].kind != "self":
            raise ValueError(
                f"SAG reads the self-attention map of the mid block ({SITE}, as diffusers' StableDiffusionSAGPipeline); "
                f"this UNet has no such layer (mid_block_type={pipe.unet.config.get('mid_block_type')!r})"
            )
        scheduler = pipe.scheduler
        if getattr(scheduler, "alphas_cumprod", None) is None:
            raise ValueError(
                f"SAG needs a variance-preserving schedule (alphas_cumprod); {type(scheduler).__name__} has none"
            )
        if scheduler.config.get("prediction_type") not in diffusion.PREDICTION_TYPES:
            raise ValueError(f"SAG needs one of the prediction types {diffusion.PREDICTION_TYPES}")
        self.masks: list[torch.Tensor] = []  # every denoising step run inside the block, on the CPU
        self._trace = None
        self._stack: contextlib.ExitStack | None = None
        self._input: tuple[int, torch.Tensor] | None = None  # (call, the UNet's input) of the current call
        self._mask: tuple[int, torch.Tensor] | None = None  # (call, (images, h, w) bool)

    def __repr__(self):
        return f"<lab.sag scale={self.scale:g}, {len(self.masks)} masks>"

    def __enter__(self) -> "SAG":
        if self._stack is not None:
            raise RuntimeError("this lab.sag is already active: enter it once at a time")
        stack = contextlib.ExitStack()
        try:
            self._trace = stack.enter_context(hooks.shared_trace(self.pipe))
            self._trace.edit("unet", "input", self._keep_input, passes="main")
            self._trace.edit(SITE, "probs", self._keep_mask, passes="main")
            stack.enter_context(guidance_term(self._trace, self.pipe, self._term))
        except BaseException:
            stack.close()
            self._trace = None
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc_info) -> bool:
        stack, self._stack = self._stack, None
        try:
            stack.__exit__(*exc_info)
        finally:
            self._trace = self._input = self._mask = None
        return False

    # -- the three edits ---------------------------------------------------------------------

    def _keep_input(self, sample: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        self._input = (ctx.call, sample)
        return sample

    def _keep_mask(self, probs: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        rows = list(ctx.rows(_guided_part(ctx)))
        mask = attention_mask(probs[rows], ctx.size)
        self._mask = (ctx.call, mask)
        self.masks.append(mask.cpu())
        return probs

    def _term(self, prediction: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        """s (eps - eps~) of the uncond rows (with CFG) or the cond rows (without) of this step."""
        if self.scale == 0:
            return None
        if self._input is None or self._mask is None or self._input[0] != ctx.call or self._mask[0] != ctx.call:
            raise RuntimeError(f"SAG: the UNet call did not run {SITE}'s attention: no mask for this step")
        part = _guided_part(ctx)
        rows = list(ctx.rows(part))
        output, sample = prediction[rows], self._input[1][rows]
        scheduler = self.pipe.scheduler
        abar = diffusion.input_alpha_bar(scheduler, ctx.step, ctx.timestep)
        x0 = diffusion.predicted_x0(output, sample, abar, scheduler.config.prediction_type)
        eps = diffusion.predicted_epsilon(output, sample, abar, scheduler.config.prediction_type)
        signal, noise = float(abar.sqrt()), float((1 - abar).sqrt())  # re-noised at x_t's own level
        degraded = signal * degrade(x0, self._mask[1]) + noise * eps
        degraded_output = self._trace.call_unet("sag", rows, parts=(part,), sample=degraded)
        return self.scale * (output - degraded_output)


def _guided_part(ctx: StepContext) -> str:
    """The rows SAG reads: the unconditional ones under classifier-free guidance (paper and diffusers)."""
    return "uncond" if "uncond" in ctx.parts else "cond"


def attention_mask(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(images, heads, queries, keys) self-attention -> (images, h, w) bool: mean over heads, sum over
    queries (the attention each key position receives), > 1, on the site's grid of `size` = (h, w)."""
    received = probs.mean(1).sum(1)
    return (received > THRESHOLD).reshape(len(probs), *size)


def degrade(x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x0 blurred where the mask (upsampled, nearest, to the latent) holds: M * blur(x0) + (1 - M) * x0."""
    if min(x0.shape[-2:]) <= KERNEL_SIZE // 2:
        raise ValueError(
            f"SAG's {KERNEL_SIZE}x{KERNEL_SIZE} blur pads by reflection, which needs latents above "
            f"{KERNEL_SIZE // 2} x {KERNEL_SIZE // 2}; this one is {tuple(x0.shape[-2:])} (as diffusers' gaussian_blur_2d)"
        )
    upsampled = F.interpolate(mask[:, None].to(x0.dtype), size=tuple(x0.shape[-2:]), mode="nearest")
    return gaussian_blur(x0, KERNEL_SIZE, SIGMA) * upsampled + x0 * (1 - upsampled)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Gaussian blur of (batch, channels, h, w), each channel alone, reflect-padded to keep the size
    (the kernel is the outer product of a sampled 1-d Gaussian, as diffusers' gaussian_blur_2d)."""
    half = (kernel_size - 1) / 2
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, kernel_size) / sigma) ** 2)
    kernel_1d = (pdf / pdf.sum()).to(device=x.device, dtype=x.dtype)
    kernel = torch.outer(kernel_1d, kernel_1d).expand(x.shape[1], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel, groups=x.shape[1])
