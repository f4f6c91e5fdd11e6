"""Perturbed-Attention Guidance (Ahn et al., "Self-Rectifying Diffusion Sampling with Perturbed-Attention Guidance",
ECCV 2024, arXiv 2403.17377), on the pipeline you already have:

    with lab.pag(pipe, scale=3.0, layers="mid") as pag:
        image = pipe(prompt, guidance_scale=5.0).images[0]
    pag.layers      # the perturbed self-attention sites
    pag.scales      # s_t used at each step

The perturbed prediction eps^(x_t, c) is the UNet's own with the self-attention map of the chosen layers
replaced by the identity, so every position keeps its own value: softmax(Q K^T / sqrt(d)) V  ->  I V = V. Then

    eps = eps(x_t, c) + s_t (eps(x_t, c) - eps^(x_t, c))                                    w <= 1 (no CFG)
    eps = eps(x_t, 0) + w (eps(x_t, c) - eps(x_t, 0)) + s_t (eps(x_t, c) - eps^(x_t, c))    with CFG (w = guidance_scale)
    s_t = s, or max(s - a (1000 - t), 0) with adaptive_scale a > 0

as diffusers' PAG pipelines compute it (`pipelines/pag/pag_utils.py`, `_apply_perturbed_attention_guidance` and
`_get_pag_scale`, 1000 included); the paper's recipes for SD 1.5: PAG 5 alone, or CFG 4 + PAG 3.

On lab's core: the trace appends a copy of the cond rows to every UNet call as the part "perturbed"
(Trace.extra_rows: same latent, timestep, text and SDXL conditioning; one call of batch 3/2, as diffusers'
PAG pipeline runs it), an edit of "probs" at the chosen layers returns the identity for those rows only, and
an edit of the UNet's output folds s_t (cond - perturbed) into the rows the pipeline's own guidance reads
(lab.guidance: exact, also with guidance_rescale, which diffusers measures on the unperturbed cond rows);
the trace then drops the perturbed rows, so the pipeline gets the batch it asked for.
lab's ExplicitAttnProcessor keeps the module's residual connection and rescale_output_factor, so the
perturbed layer outputs to_out(to_v(x)) (+ residual) / rescale, as diffusers' PAGIdentitySelfAttnProcessor2_0.
Differences from diffusers are float32 rounding: at the chosen layers the attention of every row is computed
explicitly (softmax, then a matmul) instead of by SDPA. Cost: a batch 3/2 as large, as diffusers', and the
chosen layers' attention maps materialised (heads x queries x keys).

Layers: any lab selector (lab.hooks.SELECTOR_HELP) picking self-attention sites, or block sites, whose
self-attention layers are then taken. diffusers' pag_applied_layers are regular expressions searched in module
names; here:
    "mid", "down", "up"            the same words: shorthand for that part's attention (self-attention taken)
    "down_blocks.1"                the block site: its self-attention layers, the same sites, but never those of
                                   a "down_blocks.10" (the substring match diffusers#13594 is about)
    "up_blocks.0.attentions.0"     not a site: "up_blocks.0.attentions.0.*" (a glob)
    "down.block_1", "up.block_0.attentions_0"   diffusers' older form (refused by diffusers 0.42 too):
                                   "down_blocks.1", "up_blocks.0.attentions.0.*"
A selection without self-attention is an error that says what diffusers' regex would have picked.
"""

from __future__ import annotations

import contextlib
import re

import torch

from lab import hooks
from lab.guidance import check_scale, guidance_term
from lab.hooks import Selector, Site, StepContext

__all__ = ["pag", "PAG", "perturbed_layers"]


def pag(pipe, scale: float = 3.0, layers="mid", *, adaptive_scale: float = 0.0) -> "PAG":
    """Perturbed-attention guidance on `pipe`'s generations inside the `with` block (see the module docstring).

    scale           s (diffusers' pag_scale, default 3.0); 0 adds nothing
    layers          a lab selector of self-attention sites (or blocks); default the mid block's ("mid")
    adaptive_scale  a (diffusers' pag_adaptive_scale): s_t = max(s - a (1000 - t), 0); 0: s at every step
    """
    return PAG(pipe, scale, layers, adaptive_scale=adaptive_scale)


class PAG:
    """The context manager lab.pag returns; read `layers` (site names) and `scales` (s_t per step) from it."""

    def __init__(self, pipe, scale: float = 3.0, layers="mid", *, adaptive_scale: float = 0.0):
        self.pipe = pipe
        self.scale = check_scale("scale", scale)
        self.adaptive_scale = check_scale("adaptive_scale", adaptive_scale)
        all_sites = hooks.sites(pipe, unet=True)
        self._layers = [site.name for site in perturbed_layers(all_sites, layers)]  # checks them
        self.selector = _SelfAttentionIn(layers, all_sites)
        self.scales: list[float] = []  # s_t of every denoising step run inside the block
        self._trace = None
        self._edit = None
        self._stack: contextlib.ExitStack | None = None

    def __repr__(self):
        adaptive = f", adaptive_scale={self.adaptive_scale:g}" if self.adaptive_scale else ""
        return f"<lab.pag scale={self.scale:g}{adaptive} on {len(self.layers)} self-attention layers>"

    @property
    def layers(self) -> list[str]:
        """The perturbed self-attention sites (a selector naming a resolution is resolved at the run)."""
        resolved = self._edit.sites if self._edit is not None else None
        return [site.name for site in resolved] if resolved else self._layers

    def scale_at(self, timestep: float) -> float:
        """s_t: diffusers' _get_pag_scale (1000 - t, whatever num_train_timesteps is)."""
        if self.adaptive_scale > 0 and self.scale > 0:
            return max(self.scale - self.adaptive_scale * (1000 - float(timestep)), 0.0)
        return self.scale

    def __enter__(self) -> "PAG":
        if self._stack is not None:
            raise RuntimeError("this lab.pag is already active: enter it once at a time")
        stack = contextlib.ExitStack()
        try:
            self._trace = stack.enter_context(hooks.shared_trace(self.pipe))
            stack.enter_context(self._trace.extra_rows("perturbed", copy_of="cond"))
            self._edit = self._trace.edit(self.selector, "probs", identity_attention, rows="perturbed", passes="main")
            stack.enter_context(guidance_term(self._trace, self.pipe, self._term))
        except BaseException:
            stack.close()
            self._trace = self._edit = None
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc_info) -> bool:
        stack, self._stack = self._stack, None
        try:
            stack.__exit__(*exc_info)
        finally:
            self._trace = None
        return False

    def _term(self, prediction: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        """s_t (cond - perturbed) for the cond rows of this step."""
        scale = self.scale_at(ctx.timestep)
        self.scales.append(scale)
        if scale == 0:
            return None
        cond, perturbed = list(ctx.rows("cond")), list(ctx.rows("perturbed"))
        return scale * (prediction[cond] - prediction[perturbed])


def identity_attention(probs: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """PAG's perturbed self-attention map: each query attends to its own position only."""
    eye = torch.eye(probs.shape[-1], dtype=probs.dtype, device=probs.device)
    return eye.expand_as(probs)


def perturbed_layers(model_or_sites, layers, latent_size: tuple[int, int] | None = None) -> list[Site]:
    """The self-attention sites `layers` picks in a pipeline / UNet (or a list of Site records), in order:
    those it selects, and those inside the block sites it selects. ValueError, teaching the selector form,
    when there is none."""
    if isinstance(model_or_sites, (list, tuple)):
        all_sites = list(model_or_sites)
    else:
        all_sites = hooks.sites(model_or_sites, unet=True)
    selector = _SelfAttentionIn(layers, all_sites)
    try:
        picked = selector.inner.resolve(all_sites, latent_size)  # its own errors: unknown names, "did you mean"
    except ValueError as error:
        raise ValueError(f"layers={layers!r}: {error}{_diffusers_hint(layers, all_sites)}") from None
    chosen = [site for site in all_sites if selector.matches(site, latent_size)]
    if not chosen:
        raise ValueError(
            f"layers={layers!r} picks no self-attention layer (it picks {', '.join(s.name for s in picked)}). "
            "PAG perturbs self-attention: select self-attention sites or blocks, e.g. 'mid' (the default), "
            f"'up self 16x16', 'down_blocks.1', 'up_blocks.0.attentions.0.*'.{_diffusers_hint(layers, all_sites)}"
        )
    return chosen


class _SelfAttentionIn(Selector):
    """The self-attention sites a selector picks, or that lie inside a site it picks (a block)."""

    def __init__(self, layers, all_sites: list[Site]):
        self.inner = Selector.parse(layers)
        self.needs_latent_size = self.inner.needs_latent_size
        self.blocks = [site for site in all_sites if site.kind == "block"]

    def __repr__(self):
        return f"self-attention in {self.inner!r}"

    def matches(self, site: Site, latent_size) -> bool:
        if site.kind != "self":
            return False
        around = [block for block in self.blocks if site.name.startswith(block.name + ".")]
        return any(self.inner.matches(candidate, latent_size) for candidate in [site, *around])


def _diffusers_hint(layers, all_sites: list[Site]) -> str:
    """What diffusers' pag_applied_layers would pick for a string (regex search in module names)."""
    if not isinstance(layers, str):
        return ""
    older = re.fullmatch(r"(down|up)\.block_(\d+)(?:\.attentions_(\d+))?", layers)
    if older:  # diffusers' first PAG release wrote layers so; 0.42 finds nothing for them either
        place, block, attention = older.groups()
        here = f"{place}_blocks.{block}" + (f".attentions.{attention}.*" if attention else "")
        return f" (diffusers' older pag_applied_layers form {layers!r} reads {here!r} here.)"
    try:
        found = [site.name for site in all_sites if site.kind == "self" and re.search(layers, site.name)]
    except re.error:
        return ""
    if not found:
        return ""
    return (
        f" (diffusers' pag_applied_layers={layers!r}, a regex searched in module names, picks {len(found)} "
        f"self-attention layers: {', '.join(found)}; here, pass their names as a list, or a glob or block picking them.)"
    )
