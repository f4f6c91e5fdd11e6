"""Guidance terms added to the pipeline's own classifier-free guidance (what SAG and PAG share).

A guidance technique adds a term to the guided prediction the pipeline steps with:

    eps = u + w (c - u) + term          u, c: the UNet's uncond / cond rows; w: pipe.guidance_scale
    eps = c + term                      without classifier-free guidance (w <= 1: the batch is [c])

Rather than rewriting the pipeline's loop, `guidance_term` edits the UNet's output rows, at the end of the
UNet call, so that the pipeline's own guidance computes exactly that (`fold_term`):

    with CFG:                       c <- c + term / w              u + w (c + term/w - u) = u + w (c - u) + term
    with CFG, guidance_rescale > 0: u <- u - term / (w - 1)        (1 - w)(u - term/(w-1)) + w c = the same
    without CFG:                    c <- c + term

guidance_rescale (Lin et al. 2024) scales the guided prediction by std(cond rows) / std(guided), so there
the term goes into the uncond rows and the cond rows stay the UNet's own: the rescale then measures the
cond prediction itself, as diffusers' PAG pipeline does (`rescale_noise_cfg(noise_pred, noise_pred_text)`
with noise_pred_text the UNet's cond output). Numerically, folding divides by w (or w - 1, with the
rescale) and the pipeline multiplies back: float32 rounding of a few ulps of the term, more (w / (w - 1)
times the term's rounding) when w is just above 1 with the rescale on.

Stacking: every technique's term is computed from the same rows (the prediction as the UNet gave it,
after any edit of the "unet" output registered before the first technique) and the sum is folded once,
by one edit per trace, so `with lab.sag(pipe), lab.pag(pipe):` adds both terms whatever the order.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import weakref
from typing import Callable

import torch

from lab.hooks import StepContext, Trace

__all__ = ["guidance_term", "fold_term", "check_scale"]

Term = Callable[[torch.Tensor, StepContext], "torch.Tensor | None"]


def check_scale(name: str, value) -> float:
    """A guidance scale as a float: a finite number >= 0 (0 adds nothing)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def fold_term(
    prediction: torch.Tensor,
    ctx: StepContext,
    term: torch.Tensor,
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    dropped: tuple[str, ...] = (),
) -> torch.Tensor:
    """The UNet output rows that make the pipeline's guidance add `term` (one row per image): see the module
    docstring. Out of place; rows laid out as ctx.parts says, ("uncond", "cond") or ("cond",), plus the
    `dropped` parts a technique added with Trace.extra_rows (the trace drops them before the pipeline sees them)."""
    guided = tuple(part for part in ctx.parts if part not in dropped)
    if guided == ("uncond", "cond"):
        if guidance_rescale > 0:
            rows, delta = ctx.rows("uncond"), -term / (guidance_scale - 1)
        else:
            rows, delta = ctx.rows("cond"), term / guidance_scale
    elif guided == ("cond",) and ctx.guidance != "split":
        rows, delta = ctx.rows("cond"), term
    else:
        raise ValueError(
            f"lab's guidance terms fold into a batch of [uncond, cond] rows (classifier-free guidance) or of cond "
            f"rows, as StableDiffusionPipeline and StableDiffusionXLPipeline lay it out; this UNet call holds "
            f"{list(ctx.parts)} ({ctx.guidance} guidance; split guidance calls the UNet once per part, and one "
            "call's rows cannot carry the term). Run lab.sag / lab.pag on a plain pipeline (not diffusers' PAG or SAG "
            "pipelines, which add their own rows), in a trace with guidance='auto' or 'batched'."
        )
    index = torch.tensor(rows, device=prediction.device)
    return prediction.index_add(0, index, delta.to(prediction.dtype))


def _pipeline_number(pipe, name: str, default: float | None = None) -> float:
    """pipe.guidance_scale / pipe.guidance_rescale: properties the pipelines set at the start of __call__."""
    try:
        return float(getattr(pipe, name))
    except AttributeError:
        if default is not None:
            return default
        raise TypeError(
            f"{type(pipe).__name__} has no {name} property: lab's guidance terms read it during the pipeline "
            "call, as StableDiffusionPipeline, StableDiffusionImg2ImgPipeline and StableDiffusionXLPipeline set it"
        ) from None


class _Terms:
    """The one edit of the "unet" output (main passes) that sums the registered terms and folds them."""

    def __init__(self, pipe, trace: Trace):
        self.pipe, self.trace = pipe, trace
        self.terms: list[Term] = []
        self.__name__ = "guidance terms"

    def __call__(self, prediction: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        terms = [term(prediction, ctx) for term in list(self.terms)]  # all from the same rows
        terms = [term for term in terms if term is not None]
        if not terms:
            return prediction
        scale = _pipeline_number(self.pipe, "guidance_scale")
        rescale = _pipeline_number(self.pipe, "guidance_rescale", default=0.0)
        dropped = self.trace.extra_parts
        return fold_term(prediction, ctx, torch.stack(terms).sum(0), scale, rescale, dropped)


_TERMS: "weakref.WeakKeyDictionary[Trace, _Terms]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def guidance_term(trace: Trace, pipe, term: Term):
    """Add term(prediction, ctx) -> (images, channels, h, w) (or None: nothing at this step) to the guided
    prediction of every denoising step run inside the block. `trace` is the technique's shared trace
    (lab.hooks.shared_trace), whose exit removes the folding edit; `prediction` holds all rows of the call
    and must not be modified."""
    terms = _TERMS.get(trace)
    opened = terms is None
    if opened:
        terms = _Terms(pipe, trace)
        trace.edit("unet", "output", terms, passes="main")
        _TERMS[trace] = terms
    terms.terms.append(term)
    try:
        yield
    finally:
        terms.terms.remove(term)
        if opened:
            del _TERMS[trace]
