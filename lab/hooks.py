"""Look inside a Stable Diffusion UNet and edit what it does, one `with` block at a time.

    import lab
    pipe = lab.testing.tiny_sd1_pipeline()            # or any diffusers SD / SDXL pipeline
    with lab.trace(pipe) as tr:
        maps = tr.capture("cross", "probs", reduce=lab.Mean(over=("steps", "heads")))
        tr.edit("up_blocks.1.attentions.*.attn2", "probs", lambda p, ctx: p * 2, steps=range(5, 10))
        image = pipe("a red circle", num_inference_steps=10).images[0]
    maps.result()     # {site name: float32 tensor (batch, queries, keys)}

Vocabulary
    site     A place in the UNet, named by its diffusers module path. Attention sites are the
             `Attention` modules ("up_blocks.1.attentions.0.transformer_blocks.0.attn2"), of kind
             "self" or "cross"; block sites are "down_blocks.N", "mid_block" and "up_blocks.N".
    what     The tensor read or edited at a site. Attention sites: "q", "k", "v" shaped
             (batch, heads, tokens, head_dim); "probs" shaped (batch, heads, queries, keys);
             "output" shaped (batch, queries, channels). Block sites: "output" (batch, channels, h, w).
             The "unet" site is the UNet call itself, the denoising step: "input" is the latent x_t it
             is given (after the scheduler's scale_model_input) and "output" its prediction (noise,
             v or sample), both (batch, channels, h, w). Only its exact name "unet" selects it: globs,
             regexes, predicates and shorthands never do, and lab.sites(pipe) lists it only with unet=True.
    ctx      A `StepContext` passed to every callback: denoising step, timestep, which rows of the
             batch are unconditional / conditional under classifier-free guidance, the site.

How it works
    Entering a trace adds one forward pre-hook on the UNet that reads the timestep and latent of each
    call (step bookkeeping). Registering a capture or an edit installs, at the selected sites only:
      - "q", "k", "v": a forward hook on `attn.to_q` / `to_k` / `to_v` (the processor is kept, so
        fused SDPA, attention slicing or xformers keep running);
      - "output": a forward hook on the `Attention` module or on the block;
      - "unet" site: a forward pre-hook ("input") or a forward hook ("output") on the UNet;
      - "probs": `ExplicitAttnProcessor`, which computes the attention probabilities explicitly
        with the standard math so they can be read and edited. This is the only case that replaces
        a processor, and only at the sites that asked for probabilities.
    Leaving the trace (normally, on an exception or on KeyboardInterrupt) removes every torch hook
    and puts back the very processor objects that were there before. Sites nobody hooked are
    never touched. No diffusers class is patched.

Order of hooks at one site and tensor: all edits in registration order, then all captures (which
therefore see the edited tensor).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from diffusers.models import attention_processor as _attention_processor
from diffusers.models.attention_processor import Attention

__all__ = [
    "Site",
    "StepContext",
    "Trace",
    "Capture",
    "Edit",
    "Mean",
    "Sum",
    "Stack",
    "TopK",
    "MemoryEstimate",
    "CaptureTooLarge",
    "ExplicitAttnProcessor",
    "STANDARD_PROCESSORS",
    "trace",
    "sites",
    "select_sites",
    "is_shorthand",
    "active_hooks",
    "remove_all_hooks",
    "scale_tokens",
]

ATTENTION_WHATS = ("q", "k", "v", "probs", "output")
BLOCK_WHATS = ("output",)
UNET_WHATS = ("input", "output")
_WHATS_OF_KIND = {"self": ATTENTION_WHATS, "cross": ATTENTION_WHATS, "block": BLOCK_WHATS, "unet": UNET_WHATS}
_WHAT_ALIASES = {"query": "q", "key": "k", "value": "v", "out": "output", "features": "output"}
CFG_PARTS = ("cond", "uncond", "both")
GUIDANCE_MODES = ("auto", "batched", "split", "none")
DEFAULT_MEMORY_LIMIT = 2 * 1024**3  # bytes of captured tensors per generation; None disables the check

# Processors that compute plain attention from attn.to_q / to_k / to_v and nothing else. Only at
# sites using one of these can hooks be faithful: q/k/v hooks need the processor to call to_q etc.,
# and "probs" swaps in ExplicitAttnProcessor, which must compute the same thing. A processor that
# adds keys and values (IP-Adapter) or fuses projections is refused. Append your own processor class
# here if it is plain attention.
STANDARD_PROCESSORS: list[type] = [
    getattr(_attention_processor, name)
    for name in ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU")
    if hasattr(_attention_processor, name)
]


# ----------------------------------------------------------------------------------------------
# Sites
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """One hookable place in the UNet.

    level: how many times the latent was downsampled before this site. The queries of an attention
    site (or the output of a block site) are the latent size halved `level` times, rounding up
    as the UNet's stride-2 convolutions do: a 64x96 latent at level 2 gives 16x24.
    """

    name: str
    kind: str  # "self", "cross", "block" or "unet"
    place: str  # "down", "mid", "up"; "unet" for the unet site
    level: int
    module: torch.nn.Module = field(compare=False, repr=False)

    @property
    def is_attention(self) -> bool:
        return self.kind in ("self", "cross")

    def spatial_size(self, latent_size: tuple[int, int]) -> tuple[int, int]:
        height, width = latent_size
        for _ in range(self.level):
            height, width = (height + 1) // 2, (width + 1) // 2
        return height, width


def _unet_of(model) -> torch.nn.Module:
    unet = getattr(model, "unet", model)
    if not (hasattr(unet, "down_blocks") and hasattr(unet, "up_blocks")):
        raise TypeError(
            f"expected a diffusers Stable Diffusion pipeline (with .unet) or a UNet2DConditionModel, "
            f"got {type(model).__name__}"
        )
    return unet


def sites(model, *, unet: bool = False) -> list[Site]:
    """Every attention module and every block of the UNet, in execution order.

    `model` is a pipeline or a UNet. Inside each block the attention sites come first, then the
    block site itself (whose output is what the block returns). unet=True puts the "unet" site
    (the UNet call) first.
    """
    unet_module = _unet_of(model)
    blocks = [("down", f"down_blocks.{i}", block) for i, block in enumerate(unet_module.down_blocks)]
    if getattr(unet_module, "mid_block", None) is not None:
        blocks.append(("mid", "mid_block", unet_module.mid_block))
    blocks += [("up", f"up_blocks.{i}", block) for i, block in enumerate(unet_module.up_blocks)]

    found = [Site("unet", "unet", "unet", 0, unet_module)] if unet else []
    level = 0
    for place, block_name, block in blocks:
        for sub_name, module in block.named_modules():
            if isinstance(module, Attention):
                kind = "cross" if module.is_cross_attention else "self"
                found.append(Site(f"{block_name}.{sub_name}", kind, place, level, module))
        # A down block ends with its downsampler and an up block with its upsampler, so the
        # block's output is one level away from its attention layers.
        if place == "down" and getattr(block, "downsamplers", None):
            level += 1
        if place == "up" and getattr(block, "upsamplers", None):
            level -= 1
        found.append(Site(block_name, "block", place, level, block))
    return found


SHORTHAND_WORDS = ("attention", "cross", "self", "blocks", "down", "mid", "up")
_RESOLUTION_WORD = re.compile(r"^(\d+)x(\d+)$")
_LEVEL_WORD = re.compile(r"^level(\d+)$")
_SELECTOR_HELP = (
    "A selector is a site name, a glob ('up_blocks.*.attn2'), 're:<regex>' or a compiled regex "
    "(searched in names), a list of selectors, a predicate on Site, or shorthand words that all must "
    "hold: cross, self, attention, blocks, down, mid, up, levelN, HxW (query size in this run, e.g. "
    "'cross up 16x16'; shorthands pick attention sites unless 'blocks' is one of the words). "
    "'unet' (the UNet call) is picked by its exact name only. lab.sites(pipe) lists every site."
)


def is_shorthand(selector) -> bool:
    """True when `selector` is a string of shorthand words only ("cross up 16x16")."""
    words = selector.split() if isinstance(selector, str) else []
    return bool(words) and all(w in SHORTHAND_WORDS or _RESOLUTION_WORD.match(w) or _LEVEL_WORD.match(w) for w in words)


def _needs_latent_size(selector) -> bool:
    """True when the selector names a resolution, which only the run's latent size can resolve."""
    if isinstance(selector, str) and not selector.startswith("re:"):
        return any(_RESOLUTION_WORD.match(word) for word in selector.split())
    if isinstance(selector, (list, tuple, set, frozenset)):
        return any(_needs_latent_size(s) for s in selector)
    return False


def _shorthand_matches(site: Site, words: list[str], latent_size) -> bool:
    if ("blocks" in words) != (site.kind == "block"):
        return False
    for word in words:
        if word in ("cross", "self") and site.kind != word:
            return False
        if word in ("down", "mid", "up") and site.place != word:
            return False
        level = _LEVEL_WORD.match(word)
        if level and site.level != int(level.group(1)):
            return False
        resolution = _RESOLUTION_WORD.match(word)
        # Without a latent size (checking a selector before the run) a resolution matches anything.
        if resolution and latent_size is not None:
            if site.spatial_size(latent_size) != (int(resolution.group(1)), int(resolution.group(2))):
                return False
    return True


def _select(all_sites: list[Site], selector, latent_size) -> list[Site]:
    """Sites matched by `selector`, in site order. Raises ValueError if it matches nothing."""
    if isinstance(selector, Site):
        selector = selector.name
    if isinstance(selector, (list, tuple, set, frozenset)):
        if not selector:
            raise ValueError("empty list of sites")
        chosen = {site.name for part in selector for site in _select(all_sites, part, latent_size)}
        return [site for site in all_sites if site.name in chosen]
    pool = [site for site in all_sites if site.kind != "unet"]  # only its exact name picks the UNet call
    if isinstance(selector, re.Pattern):
        matched = [site for site in pool if selector.search(site.name)]
        what = f"regex {selector.pattern!r}"
    elif callable(selector):
        matched = [site for site in pool if selector(site)]
        what = f"predicate {getattr(selector, '__name__', selector)!r}"
    elif not isinstance(selector, str):
        raise TypeError(f"cannot select sites with a {type(selector).__name__}. {_SELECTOR_HELP}")
    elif selector.startswith("re:"):
        return _select(all_sites, re.compile(selector[3:]), latent_size)
    elif is_shorthand(selector):
        words = selector.split()
        matched = [site for site in pool if _shorthand_matches(site, words, latent_size)]
        what = f"shorthand {selector!r}"
        if not matched and latent_size is not None:
            sizes = sorted({"%dx%d" % s.spatial_size(latent_size) for s in pool if s.is_attention})
            raise ValueError(
                f"{what} matches no site (latent {latent_size[0]}x{latent_size[1]}: attention sites have "
                f"queries of {', '.join(sizes)}). {_SELECTOR_HELP}"
            )
    elif any(char in selector for char in "*?["):
        matched = [site for site in pool if fnmatch.fnmatchcase(site.name, selector)]
        what = f"glob {selector!r}"
    else:
        matched = [site for site in all_sites if site.name == selector]
        if not matched:
            names = [site.name for site in all_sites]
            close = difflib.get_close_matches(selector, names + list(SHORTHAND_WORDS), n=4, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown site {selector!r}.{hint} {_SELECTOR_HELP}")
    if not matched:
        raise ValueError(f"{what} matches no site. {_SELECTOR_HELP}")
    return matched


def select_sites(model_or_sites, selector, latent_size: tuple[int, int] | None = None) -> list[Site]:
    """The sites that `selector` picks (see _SELECTOR_HELP), in order. Resolutions need `latent_size`.

    `model_or_sites` is a pipeline or a UNet (its sites, "unet" included), or a list of `Site`
    records, which need no module: e.g. the sites a saved run recorded, long after the model is gone.
    """
    if latent_size is None and _needs_latent_size(selector):
        raise ValueError(f"selector {selector!r} names a resolution: pass latent_size=(height, width)")
    if isinstance(model_or_sites, (list, tuple)) and all(isinstance(site, Site) for site in model_or_sites):
        return _select(list(model_or_sites), selector, latent_size)
    return _select(sites(model_or_sites, unet=True), selector, latent_size)


# ----------------------------------------------------------------------------------------------
# Step context
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepContext:
    """What a hook callback knows about the UNet call it is in.

    step       Index of this call's timestep in `scheduler.timesteps`, the full schedule. The same
               step number means the same noise level in text-to-image and image-to-image (which
               starts late: with 10 steps and strength 0.5 its steps are 5..9). When the timestep is
               not in the schedule (or there is no scheduler) it falls back to `run_step`.
    run_step   Denoising steps already run in this generation: 0, 1, 2, ... whatever the schedule.
    guidance   How classifier-free guidance is laid out: "batched" (one call, rows [uncond, cond]
               as diffusers pipelines do), "split" (one call for uncond, one for cond, same
               timestep) or "none".
    part       What this call holds: "both" (batched), "uncond" or "cond" (split, or "cond" when
               there is no guidance).
    uncond, cond  Slices of this call's batch rows; an empty slice when the call has no such rows.
    size       (height, width) of the site's queries (attention sites), output (block sites) or latent (unet).
    """

    step: int
    run_step: int
    timestep: float
    num_steps: int | None
    guidance: str
    part: str
    uncond: slice
    cond: slice
    batch_size: int
    latent_size: tuple[int, int]
    call: int  # UNet calls seen by this trace, 0-based
    site: Site | None = None
    size: tuple[int, int] | None = None


def _rows_for(cfg: str, ctx: StepContext) -> slice | None:
    """Rows of this call that a hook with `cfg` ("cond", "uncond", "both") sees; None: skip this call."""
    if cfg == "both":
        return slice(0, ctx.batch_size)
    rows = ctx.cond if cfg == "cond" else ctx.uncond
    return rows if rows.stop > rows.start else None


def _steps_filter(steps) -> Callable[[StepContext], bool]:
    if steps is None:
        return lambda ctx: True
    if callable(steps):
        return steps
    if isinstance(steps, int):
        return lambda ctx: ctx.step == steps
    if isinstance(steps, (range, list, tuple, set, frozenset)):
        allowed = frozenset(steps)
        if not all(isinstance(step, int) for step in allowed):
            raise TypeError(f"steps must be ints, got {sorted(map(repr, allowed))}")
        return lambda ctx: ctx.step in allowed
    raise TypeError(f"steps must be None, an int, a range/list/set of ints or a function of ctx, got {steps!r}")


# ----------------------------------------------------------------------------------------------
# Tensor layouts and reducers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where the heads and the spatial positions are in a hooked tensor."""

    heads_dim: int | None  # 1 for q, k, v, probs; None otherwise
    token_dims: tuple[int, ...]  # axes of length h*w holding flattened spatial positions
    grid: bool  # True for (batch, channels, h, w) tensors
    size: tuple[int, int]


def _layout(site: Site, what: str, size: tuple[int, int], ndim: int = 3) -> _Layout:
    spatial_keys = site.kind == "self"
    if what == "probs":
        return _Layout(1, (2, 3) if spatial_keys else (2,), False, size)
    if what == "q":
        return _Layout(1, (2,), False, size)
    if what in ("k", "v"):
        return _Layout(1, (2,) if spatial_keys else (), False, size)
    if site.is_attention and ndim == 3:
        return _Layout(None, (1,), False, size)
    return _Layout(None, (), True, size)  # block or unet tensors, or attention output on a 4-D input


def _downsampled(size: tuple[int, int], factor: int) -> tuple[int, int]:
    return max(1, size[0] // factor), max(1, size[1] // factor)


class Reducer:
    """How a capture turns one tensor per UNet call into what it stores.

    Every reducer accumulates in float32 (whatever the model's dtype). Per call it may average
    the heads (over=("heads",)) and average-pool the spatial axes by `downsample`; then it
    folds the call into its state (`update`) and finally gives the `result`.
    """

    allowed_over = ("steps", "heads", "batch")

    def __init__(self, over: Iterable[str] = (), downsample: int | None = None):
        over = (over,) if isinstance(over, str) else tuple(over)
        unknown = [name for name in over if name not in self.allowed_over]
        if unknown:
            raise ValueError(f"{type(self).__name__}(over=...) accepts {self.allowed_over}, got {unknown}")
        if downsample is not None and (not isinstance(downsample, int) or downsample < 1):
            raise ValueError(f"downsample must be a positive int factor, got {downsample!r}")
        self.over = over
        self.downsample = downsample

    def __repr__(self):
        options = [f"over={self.over!r}"] + ([f"downsample={self.downsample}"] if self.downsample else [])
        return f"{type(self).__name__}({', '.join(options)})"

    def prepare(self, x: torch.Tensor, layout: _Layout) -> torch.Tensor:
        """Per call: float32, heads averaged, spatially pooled. Batch and steps are left to update()."""
        if "heads" in self.over:
            # Averaging in float32 directly avoids a float32 copy of every head (half-precision models).
            x = x.mean(dim=layout.heads_dim, keepdim=True, dtype=torch.float32)
        else:
            x = x.float()
        if self.downsample and self.downsample > 1:
            new_size = _downsampled(layout.size, self.downsample)
            if layout.grid:
                x = F.adaptive_avg_pool2d(x, new_size)
            for dim in layout.token_dims:
                moved = x.movedim(dim, -1)
                pooled = F.adaptive_avg_pool2d(moved.reshape(-1, *layout.size), new_size)
                x = pooled.reshape(*moved.shape[:-1], new_size[0] * new_size[1]).movedim(-1, dim)
        if "heads" in self.over:
            x = x.squeeze(layout.heads_dim)
        return x

    def prepared_shape(self, shape: tuple[int, ...], layout: _Layout) -> tuple[int, ...]:
        """The shape prepare() gives for an input of `shape`, without running it."""
        shape = list(shape)
        if self.downsample and self.downsample > 1:
            height, width = _downsampled(layout.size, self.downsample)
            if layout.grid:
                shape[-2:] = [height, width]
            for dim in layout.token_dims:
                shape[dim] = height * width
        if "heads" in self.over:
            del shape[layout.heads_dim]
        return tuple(shape)

    def _batch_reduced(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=0) if "batch" in self.over else x

    def _batch_reduced_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[1:] if "batch" in self.over else shape


class Sum(Reducer):
    """Running sum over denoising steps (one update per UNet call the capture sees).

    Memory is one tensor per site, whatever the number of steps. `over` must include "steps";
    listing "heads" and/or "batch" too averages those axes of each call before it is added.
    """

    def __init__(self, over: Iterable[str] = ("steps",), downsample: int | None = None):
        super().__init__(over, downsample)
        if "steps" not in self.over:
            raise ValueError(
                f"{type(self).__name__} reduces over steps: include 'steps' in over (got {self.over}); "
                "for one tensor per step use lab.Stack"
            )

    def update(self, state, x: torch.Tensor):
        x = self._batch_reduced(x)
        if state is None:
            return [x.clone(), 1]  # clone: x may share memory with the model's own tensor
        total, count = state
        if total.requires_grad or x.requires_grad:
            total = total + x  # out of place, so the graph stays intact
        else:
            total += x
        return [total, count + 1]

    def result(self, state) -> torch.Tensor:
        return state[0]

    def stored_shape(self, shape: tuple[int, ...], steps: int) -> tuple[int, ...]:
        return self._batch_reduced_shape(shape)


class Mean(Sum):
    """Running mean over denoising steps; heads and batch are averaged too when listed in `over`."""

    def result(self, state) -> torch.Tensor:
        total, count = state
        return total / count


class TopK(Mean):
    """The k largest entries along `dim` of the step-averaged tensor: result() is (values, indices).

    It accumulates like Mean (memory is one tensor per site) and takes the top-k at the end,
    e.g. the k tokens each pixel attends to most: TopK(3, over=("steps", "heads")) on "probs".
    """

    def __init__(self, k: int, dim: int = -1, over: Iterable[str] = ("steps",), downsample: int | None = None):
        super().__init__(over, downsample)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k = k
        self.dim = dim

    def __repr__(self):
        return f"TopK(k={self.k}, dim={self.dim}, over={self.over!r})"

    def result(self, state):
        mean = super().result(state)
        return torch.topk(mean, min(self.k, mean.shape[self.dim]), dim=self.dim)


class Stack(Reducer):
    """One tensor per step, stacked on a new first axis: the only reducer whose memory grows with steps.

    `over` may list "heads" and "batch" to average those axes of each step before storing it.
    """

    allowed_over = ("heads", "batch")

    def update(self, state, x: torch.Tensor):
        x = self._batch_reduced(x)
        state = state if state is not None else []
        state.append(x.clone())  # clone: x may share memory with the model's own tensor
        return state

    def result(self, state) -> torch.Tensor:
        return torch.stack(state)

    def stored_shape(self, shape: tuple[int, ...], steps: int) -> tuple[int, ...]:
        return (steps, *self._batch_reduced_shape(shape))


def _canonical_what(what: str) -> str:
    what = _WHAT_ALIASES.get(what, what)
    if what not in ATTENTION_WHATS + UNET_WHATS:
        raise ValueError(f"unknown tensor {what!r}: choose one of {ATTENTION_WHATS} (block sites: 'output'; "
                         f"the 'unet' site: {UNET_WHATS})")
    return what


# ----------------------------------------------------------------------------------------------
# Edits and captures
# ----------------------------------------------------------------------------------------------


class _Hook:
    """What edits and captures share: where (sites), which tensor, at which steps, which CFG part."""

    def __init__(self, trace: "Trace", selector, what: str, steps, cfg: str):
        if cfg not in CFG_PARTS:
            raise ValueError(f"cfg must be one of {CFG_PARTS}, got {cfg!r}")
        self.trace = trace
        self.selector = selector
        self.what = _canonical_what(what)
        self.steps = steps
        self.cfg = cfg
        self._step_ok = _steps_filter(steps)
        self.sites: list[Site] = []  # resolved now, or at the first UNet call for resolution selectors

    def wants(self, ctx: StepContext) -> bool:
        return self._step_ok(ctx) and _rows_for(self.cfg, ctx) is not None

    def _where(self) -> str:
        sites = f"{len(self.sites)} site{'s' if len(self.sites) != 1 else ''}" if self.sites else "sites resolved at run"
        return f"{self.what} at {self.selector!r} ({sites})"


class Edit(_Hook):
    """fn(tensor, ctx) -> tensor of the same shape, applied at the chosen sites, steps and CFG rows."""

    def __init__(self, trace, selector, what, fn, steps, cfg):
        super().__init__(trace, selector, what, steps, cfg)
        if not callable(fn):
            raise TypeError(f"the edit function must be callable, got {type(fn).__name__}")
        self.fn = fn

    def __repr__(self):
        return f"edit {self._where()} with {getattr(self.fn, '__name__', self.fn)!r}, steps={self.steps!r}, cfg={self.cfg!r}"

    def apply(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        rows = _rows_for(self.cfg, ctx)
        part = x if rows == slice(0, x.shape[0]) else x[rows]
        new = self.fn(part, ctx)
        if not isinstance(new, torch.Tensor) or new.shape != part.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(
                f"edit function {getattr(self.fn, '__name__', self.fn)!r} at {ctx.site.name} ({self.what}) "
                f"returned {got}; expected a tensor shaped {tuple(part.shape)}"
            )
        new = new.to(x.dtype)
        if part is x:
            return new
        return torch.cat([x[: rows.start], new, x[rows.stop :]])


class Capture(_Hook):
    """Accumulates one tensor per site through a reducer. Read it with result() or capture[site_name].

    Captures accumulate over every UNet call of the trace they belong to (all generations run
    inside the `with` block); reset() starts over. `contexts` holds the StepContext (without site)
    of each UNet call folded in, in order: with Stack, entry i of every site's tensor is contexts[i]
    (split guidance with cfg="both": the step's second call).
    """

    def __init__(self, trace, selector, what, reduce: Reducer, steps, cfg, device, detach):
        super().__init__(trace, selector, what, steps, cfg)
        if not isinstance(reduce, Reducer):
            raise TypeError(f"reduce must be a lab reducer (Mean, Sum, Stack, TopK), got {reduce!r}")
        self.reduce = reduce
        self.device = device
        self.detach = detach
        self.sizes: dict[str, tuple[int, int]] = {}  # site -> spatial size of the stored tensor
        self._states: dict[str, Any] = {}
        self._pending: dict[str, tuple[float, str, torch.Tensor]] = {}  # split guidance: first call of a step
        self._first_call: int | None = None  # StepContext.call of the first call recorded
        self.contexts: list[StepContext] = []

    def __repr__(self):
        return f"capture {self._where()} with {self.reduce!r}, cfg={self.cfg!r}, steps={self.steps!r}"

    def record(self, site: Site, x: torch.Tensor, ctx: StepContext, layout: _Layout) -> None:
        rows = _rows_for(self.cfg, ctx)
        x = x[rows]
        if self.detach:
            x = x.detach()
        x = self.reduce.prepare(x, layout)
        if self.device is not None:
            x = x.to(self.device)
        self.sizes[site.name] = _downsampled(layout.size, self.reduce.downsample or 1)
        if self._first_call is None:
            self._first_call = ctx.call
        if self.cfg == "both" and ctx.guidance == "split":
            # Pair the two calls of a step into one [uncond, cond] batch, the layout batched guidance has.
            pending = self._pending.pop(site.name, None)
            if pending is None or pending[0] != ctx.timestep:
                self._pending[site.name] = (ctx.timestep, ctx.part, x.clone())
                return
            _, first_part, first = pending
            x = torch.cat([first, x] if first_part == "uncond" else [x, first])
        self._states[site.name] = self.reduce.update(self._states.get(site.name), x)
        if not self.contexts or self.contexts[-1].call != ctx.call:
            self.contexts.append(dataclasses.replace(ctx, site=None, size=None))

    def result(self) -> dict[str, Any]:
        """{site name: tensor} (TopK: {site name: (values, indices)}), in execution order."""
        if not self._states:
            raise RuntimeError(
                f"nothing captured yet for {self!r}: the UNet has not run inside the trace, or no call "
                f"matched steps={self.steps!r} and cfg={self.cfg!r} (cfg='uncond' needs guidance)"
            )
        return {name: self.reduce.result(state) for name, state in self._states.items()}

    def __getitem__(self, site_name: str):
        if site_name not in self._states:
            self.result()  # says why nothing was captured, if nothing was
            raise KeyError(f"{site_name!r} was not captured; captured sites: {', '.join(self._states)}")
        return self.reduce.result(self._states[site_name])

    def nbytes(self) -> int:
        """Bytes held by the stored tensors now."""
        total = 0
        for state in self._states.values():
            tensors = state if isinstance(self.reduce, Stack) else state[:1]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    def reset(self) -> None:
        self._states.clear()
        self._pending.clear()
        self.sizes.clear()
        self.contexts.clear()
        self._first_call = None


def scale_tokens(indices: Iterable[int], factor: float) -> Callable:
    """An edit for "probs": multiply the attention paid to the given key positions (token indices)."""
    indices = list(indices)

    def scale(probs: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        weights = torch.ones(probs.shape[-1], dtype=probs.dtype, device=probs.device)
        weights[indices] = factor
        return probs * weights

    scale.__name__ = f"scale_tokens({indices}, {factor})"
    return scale


# ----------------------------------------------------------------------------------------------
# The processor that makes attention probabilities explicit
# ----------------------------------------------------------------------------------------------


class ExplicitAttnProcessor:
    """Standard attention that materialises the probabilities so hooks can read and edit them.

    The math is that of diffusers' `AttnProcessor`, written with public `Attention` methods only
    (to_q/to_k/to_v/to_out, head_to_batch_dim, get_attention_scores, ...), so scale, upcasting,
    group/spatial/cross norms, masks, residual and output rescaling are the module's own.
    `on_probs` receives and returns probabilities shaped (batch, heads, queries, keys).
    The processor it replaced is kept in `original` and put back when the trace ends.
    """

    def __init__(self, original, on_probs: Callable[[torch.Tensor], torch.Tensor], owner=None):
        self.original = original
        self.on_probs = on_probs
        self.owner = owner  # the Trace that installed it

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)

        batch_size, key_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        # (batch, tokens, heads * dim) -> (batch * heads, tokens, dim), batch-major
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)
        probs = self.on_probs(probs.view(batch_size, attn.heads, *probs.shape[1:]))
        hidden_states = torch.bmm(probs.reshape(batch_size * attn.heads, *probs.shape[2:]), value)
        hidden_states = attn.batch_to_head_dim(hidden_states)

        hidden_states = attn.to_out[0](hidden_states)  # linear
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _unsupported_reason(site: Site, what: str, trace: "Trace") -> str | None:
    """Why hooks for `what` at this attention site could not be faithful, or None if they can."""
    attn = site.module
    processor = attn.processor
    if isinstance(processor, ExplicitAttnProcessor):
        if processor.owner is not trace:
            return "has a lab processor left over from an interrupted trace: call lab.remove_all_hooks(pipe)"
        processor = processor.original  # ours, installed for "probs": judge the one it replaced
    if what == "output":
        return None  # the module's output is what it is, whatever computed it
    if not isinstance(processor, tuple(STANDARD_PROCESSORS)):
        return (
            f"uses {type(processor).__name__}, not a plain attention processor "
            f"({', '.join(c.__name__ for c in STANDARD_PROCESSORS)}); it may add keys/values "
            "(IP-Adapter) or other behaviour that hooks would drop"
        )
    if getattr(attn, "fused_projections", False):
        return "has fused q/k/v projections (unet.fuse_qkv_projections()); call unet.unfuse_qkv_projections() first"
    if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
        return "normalises queries/keys (qk_norm), which these hooks do not model"
    if getattr(attn, "add_k_proj", None) is not None:
        return "adds projected keys/values (added_kv_proj_dim), which these hooks do not model"
    return None


# ----------------------------------------------------------------------------------------------
# Torch hooks installed at sites
# ----------------------------------------------------------------------------------------------


class _LabHook:
    """Base of every callable lab hands to torch, so leftovers can be recognised and removed."""

    lab_hook = True


class _UnetCallHook(_LabHook):
    def __init__(self, trace: "Trace"):
        self.trace = trace

    def __call__(self, unet, args, kwargs):
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        if "encoder_hidden_states" in kwargs:
            encoder_hidden_states = kwargs["encoder_hidden_states"]
        else:
            encoder_hidden_states = args[2] if len(args) > 2 else None
        self.trace._begin_unet_call(sample, timestep, encoder_hidden_states)


class _UnetTensorHook(_LabHook):
    """The "unet" site: forward pre-hook (with kwargs) for "input", forward hook for "output"."""

    def __init__(self, trace: "Trace", site: Site, what: str):
        self.trace, self.site, self.what = trace, site, what

    def __call__(self, unet, args, kwargs_or_output):
        if self.what == "input":
            kwargs = kwargs_or_output
            sample = kwargs["sample"] if "sample" in kwargs else args[0]
            edited = self.trace._dispatch(self.site, "input", sample)
            if edited is sample:
                return None
            return (args, {**kwargs, "sample": edited}) if "sample" in kwargs else ((edited, *args[1:]), kwargs)
        output = kwargs_or_output  # (sample,) with return_dict=False, else UNet2DConditionOutput
        prediction = output[0] if isinstance(output, tuple) else output.sample
        edited = self.trace._dispatch(self.site, "output", prediction)
        if edited is prediction:
            return None
        return (edited, *output[1:]) if isinstance(output, tuple) else type(output)(**{**output, "sample": edited})


class _SiteTensorHook(_LabHook):
    """Forward hook on attn.to_q/to_k/to_v, on an Attention module or on a block."""

    def __init__(self, trace: "Trace", site: Site, what: str):
        self.trace, self.site, self.what = trace, site, what

    def __call__(self, module, args, output):
        if self.what in ("q", "k", "v"):
            # (batch, tokens, heads * dim) <-> (batch, heads, tokens, dim)
            batch, tokens, inner = output.shape
            heads = self.site.module.heads
            split = output.reshape(batch, tokens, heads, inner // heads).transpose(1, 2)
            edited = self.trace._dispatch(self.site, self.what, split)
            return None if edited is split else edited.transpose(1, 2).reshape(batch, tokens, inner)
        if isinstance(output, tuple):
            # Down blocks return (hidden_states, skip_states) and the last skip state is the same
            # tensor as hidden_states: an edit replaces both so the up path sees it too.
            hidden_states, skip_states = output
            edited = self.trace._dispatch(self.site, self.what, hidden_states)
            if edited is hidden_states:
                return None
            return edited, tuple(edited if state is hidden_states else state for state in skip_states)
        edited = self.trace._dispatch(self.site, self.what, output)
        return None if edited is output else edited


# ----------------------------------------------------------------------------------------------
# Memory estimates
# ----------------------------------------------------------------------------------------------


class CaptureTooLarge(RuntimeError):
    """Raised before the first UNet call of a generation when captures would exceed the memory limit."""


@dataclass
class MemoryEstimate:
    """Bytes the captures of a trace would store for one generation (float32)."""

    total_bytes: int
    per_capture: list[tuple[str, int]]
    limit: int | None

    def __str__(self):
        lines = [f"{_human(nbytes):>10}  {description}" for description, nbytes in self.per_capture]
        limit = f" (limit {_human(self.limit)})" if self.limit is not None else ""
        return "\n".join(lines + [f"{_human(self.total_bytes):>10}  total{limit}"])


def _human(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def _hook_shape(site: Site, what: str, batch: int, latent_size, tokens: int) -> tuple[int, ...]:
    """Shape of the tensor a hook sees at `site` for `batch` rows (static: from the module's sizes)."""
    height, width = site.spatial_size(latent_size)
    queries = height * width
    if site.kind == "unet":
        return (batch, site.module.config.in_channels if what == "input" else site.module.config.out_channels, height, width)
    if not site.is_attention:
        return (batch, site.module.resnets[-1].out_channels, height, width)
    attn = site.module
    keys = tokens if site.kind == "cross" else queries
    if what == "probs":
        return (batch, attn.heads, queries, keys)
    if what == "q":
        return (batch, attn.heads, queries, attn.to_q.weight.shape[0] // attn.heads)
    if what in ("k", "v"):
        return (batch, attn.heads, keys, attn.to_k.weight.shape[0] // attn.heads)
    return (batch, queries, attn.to_out[0].weight.shape[0])


def _narrowing_advice(capture: Capture) -> str:
    reduce = capture.reduce
    tips = []
    if len(capture.sites) > 1:
        tips.append("select fewer sites (one block like 'up_blocks.1', or one resolution like 'cross 16x16')")
    if not reduce.downsample:
        tips.append(f"downsample the maps: reduce=lab.{type(reduce).__name__}(..., downsample=4)")
    if capture.cfg == "both":
        tips.append("keep one guidance half: cfg='cond'")
    if capture.what in ("q", "k", "v", "probs") and "heads" not in reduce.over:
        tips.append("average over heads: over=(..., 'heads')")
    if "batch" not in reduce.over:
        tips.append("average over the batch: over=(..., 'batch')")
    if isinstance(reduce, Stack):
        tips.append("drop per-step storage: lab.Mean(over=('steps', ...)) instead of lab.Stack")
    return "; ".join(tips)


# ----------------------------------------------------------------------------------------------
# The trace
# ----------------------------------------------------------------------------------------------

# UNet -> the trace active on it. Weak keys: a deleted pipeline takes its entry with it.
_ACTIVE_TRACES: "weakref.WeakKeyDictionary[torch.nn.Module, Trace]" = weakref.WeakKeyDictionary()


def trace(model, *, guidance: str = "auto", uncond_first: bool = True, memory_limit: int | None = DEFAULT_MEMORY_LIMIT, scheduler=None) -> "Trace":
    """A context manager holding hooks on `model` (a pipeline or a UNet); see `Trace`."""
    return Trace(model, guidance=guidance, uncond_first=uncond_first, memory_limit=memory_limit, scheduler=scheduler)


class Trace:
    """Hooks on one UNet for the duration of a `with` block.

    guidance      "auto" (default): batched when the pipeline says it does classifier-free
                  guidance (`pipe.do_classifier_free_guidance`) and the batch is even; "split"
                  once the UNet is called twice in a row with the same timestep (a loop that runs
                  uncond and cond separately); otherwise "none". Auto can only notice split guidance
                  on the second call, so the first call of the very first step is taken as "cond"
                  (a warning says so): pass guidance="split" for such loops. "batched", "split",
                  "none" force a layout. With a bare UNet and a manual batched loop, pass "batched".
    uncond_first  split guidance: the first call of each step is the unconditional one (True).
    memory_limit  bytes the captures may store for one generation, checked at the first UNet
                  call of each generation, before anything is captured; None disables the check.
    scheduler     for step numbers when `model` is a bare UNet (pipelines bring theirs).

    A trace is entered once. Only one trace may be active on a UNet at a time.
    """

    def __init__(self, model, *, guidance="auto", uncond_first=True, memory_limit=DEFAULT_MEMORY_LIMIT, scheduler=None):
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {guidance!r}")
        self.pipe = model if hasattr(model, "unet") else None
        self.unet = _unet_of(model)
        self.scheduler = scheduler if scheduler is not None else getattr(self.pipe, "scheduler", None)
        self.guidance = guidance
        self.uncond_first = uncond_first
        self.memory_limit = memory_limit
        self.all_sites = sites(self.unet, unet=True)
        self.sites_by_name = {site.name: site for site in self.all_sites}
        self._hooks: list[_Hook] = []
        self._hooks_at: dict[tuple[str, str], list[_Hook]] = {}  # (site, what) -> edits, then captures
        self._installed: dict[tuple[str, str], Any] = {}  # (site, what) -> torch handle or original processor
        self._unet_handle = None
        self._state = "new"  # -> "active" -> "closed"
        # step bookkeeping
        self._ctx: StepContext | None = None
        self._latent_size: tuple[int, int] | None = None
        self._calls = 0
        self._last_timestep: float | None = None
        self._calls_at_timestep = 0
        self._run_step = 0
        self._split_seen = False

    def __repr__(self):
        return f"<lab.Trace {self._state} on {type(self.unet).__name__}: {len(self._hooks)} hooks>"

    # -- lifetime ---------------------------------------------------------------------------

    def __enter__(self) -> "Trace":
        if self._state != "new":
            raise RuntimeError(f"this trace is {self._state}; a trace is entered once: create a new lab.trace(pipe)")
        other = _ACTIVE_TRACES.get(self.unet)
        if other is not None:
            raise RuntimeError(
                "another lab trace is already active on this UNet (nested traces are not supported: "
                "register all hooks on one trace). If it was left by an interrupted cell, call "
                "lab.remove_all_hooks(pipe)."
            )
        leftovers = _leftover_hooks(self.unet)
        if leftovers:
            raise RuntimeError(f"lab hooks are left on this UNet ({len(leftovers)}): call lab.remove_all_hooks(pipe) first")
        _ACTIVE_TRACES[self.unet] = self
        self._unet_handle = self.unet.register_forward_pre_hook(_UnetCallHook(self), with_kwargs=True)
        self._state = "active"
        return self

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False  # never swallow the exception

    def close(self) -> None:
        """Remove every hook and put back the original processors. Safe to call more than once."""
        if self._state == "closed":
            return
        self._state = "closed"
        errors = []
        try:
            for key in list(self._installed):
                try:
                    self._uninstall(key)
                except Exception as error:  # keep restoring the others, report the first failure
                    errors.append(error)
        finally:
            if self._unet_handle is not None:
                self._unet_handle.remove()
            if _ACTIVE_TRACES.get(self.unet) is self:
                del _ACTIVE_TRACES[self.unet]
        if errors:
            raise errors[0]

    # -- registering edits and captures -----------------------------------------------------

    def capture(self, sites, what: str, *, reduce: Reducer | None = None, cfg: str = "cond", steps=None,
                device: str | torch.device | None = "cpu", detach: bool = True) -> Capture:
        """Record `what` at `sites` through `reduce` (default Mean over steps).

        cfg     "cond" (default), "uncond" or "both" ([uncond, cond] rows, also for split guidance).
        steps   None (all), an int, a range/list of step numbers (StepContext.step) or f(ctx) -> bool.
        device  where results are stored: "cpu" (default) or None for the model's device.
        detach  False keeps the autograd graph (e.g. to optimise latents through attention maps).
        """
        capture = Capture(self, sites, what, reduce if reduce is not None else Mean(), steps, cfg, device, detach)
        if capture.what in UNET_WHATS and "heads" in capture.reduce.over:
            raise ValueError(f"{capture.what!r} has no heads axis: drop 'heads' from over")
        self._register(capture)
        return capture

    def edit(self, sites, what: str, fn: Callable[[torch.Tensor, StepContext], torch.Tensor], *,
             steps=None, cfg: str = "both") -> Edit:
        """Replace `what` at `sites` by fn(tensor, ctx), at the chosen steps and CFG rows (default both)."""
        edit = Edit(self, sites, what, fn, steps, cfg)
        self._register(edit)
        return edit

    def _register(self, hook: _Hook) -> None:
        if self._state != "active":
            raise RuntimeError("register edits and captures inside `with lab.trace(pipe) as tr:`")
        # Check everything first, so a bad request leaves the UNet exactly as it was. Resolution
        # selectors are checked here for their words and resolved (and checked) by _sync().
        chosen = _select(self.all_sites, hook.selector, None)
        if not _needs_latent_size(hook.selector):
            self._check_sites(hook, chosen)
            hook.sites = chosen
        self._hooks.append(hook)
        try:
            self._sync()
        except BaseException:
            self._hooks.remove(hook)
            self._sync()
            raise

    def _check_sites(self, hook: _Hook, chosen: list[Site]) -> None:
        missing = [site.name for site in chosen if hook.what not in _WHATS_OF_KIND[site.kind]]
        if missing:
            raise ValueError(f"{hook.what!r} does not exist at {', '.join(missing)} (attention sites have "
                             f"{ATTENTION_WHATS}, blocks {BLOCK_WHATS}, the 'unet' site {UNET_WHATS})")
        problems = [
            f"{site.name} {reason}"
            for site in chosen
            if site.is_attention
            for reason in [_unsupported_reason(site, hook.what, self)]
            if reason
        ]
        if problems:
            raise ValueError("cannot hook faithfully:\n  " + "\n  ".join(problems))

    # -- installing torch hooks and processors ----------------------------------------------

    def _sync(self) -> None:
        """Make the installed hooks match the registered ones (resolution selectors follow the latent)."""
        wanted: dict[tuple[str, str], list[_Hook]] = {}
        for hook in self._hooks:
            if _needs_latent_size(hook.selector):
                if self._latent_size is None:
                    continue
                hook.sites = _select(self.all_sites, hook.selector, self._latent_size)
                self._check_sites(hook, hook.sites)
            for site in hook.sites:
                wanted.setdefault((site.name, hook.what), []).append(hook)
        # Edits before captures, each in registration order (sorted() is stable).
        self._hooks_at = {key: sorted(hooks, key=lambda h: isinstance(h, Capture)) for key, hooks in wanted.items()}
        for key in list(self._installed):
            if key not in wanted:
                self._uninstall(key)
        for key in wanted:
            if key not in self._installed:
                self._install(key)

    def _install(self, key: tuple[str, str]) -> None:
        site_name, what = key
        site = self.sites_by_name[site_name]
        if what == "probs":
            attn = site.module
            original = attn.processor
            attn.set_processor(ExplicitAttnProcessor(original, lambda probs: self._dispatch(site, "probs", probs), owner=self))
            self._installed[key] = original
            return
        if site.kind == "unet":
            hook = _UnetTensorHook(self, site, what)
            # The trace's own pre-hook (step bookkeeping) was registered first, so it runs first.
            self._installed[key] = (site.module.register_forward_pre_hook(hook, with_kwargs=True) if what == "input"
                                    else site.module.register_forward_hook(hook))
            return
        module = getattr(site.module, {"q": "to_q", "k": "to_k", "v": "to_v"}[what]) if what in ("q", "k", "v") else site.module
        self._installed[key] = module.register_forward_hook(_SiteTensorHook(self, site, what))

    def _uninstall(self, key: tuple[str, str]) -> None:
        installed = self._installed.pop(key)
        if key[1] == "probs":
            self.sites_by_name[key[0]].module.set_processor(installed)  # the very object that was there
        else:
            installed.remove()

    # -- step bookkeeping (UNet pre-forward hook) -------------------------------------------

    def _schedule(self) -> list[float]:
        timesteps = getattr(self.scheduler, "timesteps", None)
        return [] if timesteps is None else [float(t) for t in torch.as_tensor(timesteps).flatten().tolist()]

    def _begin_unet_call(self, sample: torch.Tensor, timestep, encoder_hidden_states) -> None:
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        batch = sample.shape[0]
        latent_size = (sample.shape[-2], sample.shape[-1])
        # Timesteps decrease during a generation: a larger one (or a new latent size) starts a new
        # generation; the same one again is the second call of a step (split guidance).
        new_run = self._last_timestep is None or t > self._last_timestep or latent_size != self._latent_size
        if new_run:
            self._run_step, self._calls_at_timestep = 0, 0
            for hook in self._hooks:
                if isinstance(hook, Capture):
                    hook._pending.clear()
        elif t == self._last_timestep:
            self._calls_at_timestep += 1
        else:
            if self.guidance == "auto" and self._split_seen and self._calls_at_timestep == 0:
                self._split_seen = False  # a step with a single call: the loop is not split after all
            self._run_step += 1
            self._calls_at_timestep = 0
        self._last_timestep = t

        guidance, part = self._guidance_of_call(batch)
        if part == "both":
            uncond, cond = slice(0, batch // 2), slice(batch // 2, batch)
        elif part == "uncond":
            uncond, cond = slice(0, batch), slice(0, 0)
        else:
            uncond, cond = slice(0, 0), slice(0, batch)
        schedule = self._schedule()
        schedule_index = schedule.index(t) if t in schedule else None
        self._ctx = StepContext(
            step=schedule_index if schedule_index is not None else self._run_step,
            run_step=self._run_step,
            timestep=t,
            num_steps=len(schedule) or None,
            guidance=guidance,
            part=part,
            uncond=uncond,
            cond=cond,
            batch_size=batch,
            latent_size=latent_size,
            call=self._calls,
        )
        self._calls += 1
        if new_run:
            self._latent_size = latent_size
            self._sync()
            tokens = encoder_hidden_states.shape[1] if isinstance(encoder_hidden_states, torch.Tensor) else 77
            steps_left = len(schedule) - schedule_index if schedule_index is not None else max(len(schedule), 1)
            images = batch // 2 if guidance == "batched" else batch
            estimate = self._estimate(latent_size, images, steps_left, tokens, guided=guidance != "none")
            if self.memory_limit is not None and estimate.total_bytes > self.memory_limit:
                self._refuse(estimate)

    def _guidance_of_call(self, batch: int) -> tuple[str, str]:
        mode = self.guidance
        if mode == "auto":
            if self._calls_at_timestep == 1 and not self._split_seen:
                self._split_seen = True
                # The previous call was taken as "cond" before we could know. Captures that hold
                # nothing but that call start over, so they never mix it in with the wrong label.
                for hook in self._hooks:
                    if isinstance(hook, Capture) and hook._first_call == self._calls - 1:
                        hook.reset()
                warnings.warn(
                    f"lab: the UNet was called twice with timestep {self._last_timestep:g}: treating this as "
                    "split classifier-free guidance (uncond call first, then cond). The first call of "
                    "this step had been taken as 'cond' (edits ran as for cond; captures dropped it, so "
                    "cfg='uncond'/'both' captures miss this step); pass lab.trace(..., guidance='split') "
                    "to get it right from the start.",
                    stacklevel=4,
                )
            if self._split_seen:
                mode = "split"
            elif self._pipeline_guides() and batch % 2 == 0:
                mode = "batched"
            else:
                mode = "none"
        if mode == "batched":
            if batch % 2:
                raise ValueError(f"guidance='batched' needs an even batch of [uncond, cond] rows, got {batch}")
            return "batched", "both"
        if mode == "split":
            first, second = ("uncond", "cond") if self.uncond_first else ("cond", "uncond")
            return "split", first if self._calls_at_timestep % 2 == 0 else second
        return "none", "cond"

    def _pipeline_guides(self) -> bool:
        try:
            return bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        except AttributeError:  # the property reads state set by __call__: no call yet
            return False

    def _site_context(self, site: Site) -> StepContext:
        # A site called directly (not through the UNet) gets the context of the last UNet call.
        if self._ctx is None:
            raise RuntimeError(f"{site.name} ran outside a UNet forward call; lab hooks need the UNet to be called")
        return dataclasses.replace(self._ctx, site=site, size=site.spatial_size(self._ctx.latent_size))

    def _dispatch(self, site: Site, what: str, x: torch.Tensor) -> torch.Tensor:
        """Run the edits, then the captures, registered for (site, what) on this tensor."""
        ctx = self._site_context(site)
        layout = _layout(site, what, ctx.size, x.ndim)
        found = [x.shape[dim] for dim in layout.token_dims] + ([tuple(x.shape[-2:])] if layout.grid else [])
        expected = [ctx.size[0] * ctx.size[1]] * len(layout.token_dims) + ([ctx.size] if layout.grid else [])
        if found != expected:
            raise RuntimeError(
                f"{site.name}: expected {what} of {ctx.size[0]}x{ctx.size[1]} positions (latent "
                f"{ctx.latent_size}, level {site.level}), got shape {tuple(x.shape)}"
            )
        for hook in self._hooks_at.get((site.name, what), ()):
            if not hook.wants(ctx):
                continue
            if isinstance(hook, Edit):
                x = hook.apply(x, ctx)
            else:
                hook.record(site, x, ctx, layout)
        return x

    # -- memory -----------------------------------------------------------------------------

    def estimate(self, height: int | None = None, width: int | None = None, *, batch: int = 1, steps: int = 50,
                 tokens: int = 77, guidance: bool = True, latent_size: tuple[int, int] | None = None) -> MemoryEstimate:
        """Bytes the registered captures would store for one generation.

        height, width  image size in pixels (divided by the pipeline's VAE factor), or latent_size.
        batch          images per generation (prompts x num_images_per_prompt).
        guidance       whether classifier-free guidance runs (matters for cfg="both"/"uncond").
        """
        if latent_size is None:
            if height is None or width is None:
                raise ValueError("give height and width (pixels) or latent_size=(h, w)")
            factor = getattr(self.pipe, "vae_scale_factor", 8)
            latent_size = (math.ceil(height / factor), math.ceil(width / factor))
        return self._estimate(tuple(latent_size), batch, steps, tokens, guided=guidance)

    def _estimate(self, latent_size, images: int, steps: int, tokens: int, guided: bool) -> MemoryEstimate:
        per_capture = []
        for hook in self._hooks:
            if not isinstance(hook, Capture):
                continue
            rows = {"cond": images, "uncond": images if guided else 0, "both": 2 * images if guided else images}[hook.cfg]
            chosen = _select(self.all_sites, hook.selector, latent_size)
            nbytes = 0
            for site in chosen:
                shape = _hook_shape(site, hook.what, rows, latent_size, tokens)
                layout = _layout(site, hook.what, site.spatial_size(latent_size))
                stored = hook.reduce.stored_shape(hook.reduce.prepared_shape(shape, layout), steps)
                nbytes += math.prod(stored) * 4 if rows else 0
            if isinstance(hook.reduce, Stack):
                nbytes += hook.nbytes()  # per-step storage keeps what earlier generations stored
            per_capture.append((repr(hook), nbytes))
        return MemoryEstimate(sum(n for _, n in per_capture), per_capture, self.memory_limit)

    def _refuse(self, estimate: MemoryEstimate) -> None:
        captures = [hook for hook in self._hooks if isinstance(hook, Capture)]
        biggest = max(zip(estimate.per_capture, captures), key=lambda pair: pair[0][1])[1]
        raise CaptureTooLarge(
            f"the captures would store {_human(estimate.total_bytes)}, over the limit of "
            f"{_human(self.memory_limit)}:\n{estimate}\nTo narrow {biggest!r}: {_narrowing_advice(biggest)}; "
            "or raise the limit: lab.trace(pipe, memory_limit=...)."
        )

    def describe(self) -> list[str]:
        """One line per registered hook, in registration order."""
        return [repr(hook) for hook in self._hooks]


# ----------------------------------------------------------------------------------------------
# Listing and removing hooks (for notebooks after an interrupted cell)
# ----------------------------------------------------------------------------------------------


def _leftover_hooks(unet: torch.nn.Module) -> list[tuple[torch.nn.Module, str, Any]]:
    """lab processors and torch hooks on the UNet that no active trace owns."""
    owner = _ACTIVE_TRACES.get(unet)
    found = []
    for module in unet.modules():
        processor = getattr(module, "processor", None)
        if isinstance(module, Attention) and isinstance(processor, ExplicitAttnProcessor) and processor.owner is not owner:
            found.append((module, "processor", module.processor))
        for dict_name in ("_forward_hooks", "_forward_pre_hooks"):
            for handle_id, hook in getattr(module, dict_name).items():
                if getattr(hook, "lab_hook", False) and getattr(hook, "trace", None) is not owner:
                    found.append((module, dict_name, handle_id))
    return found


def active_hooks(model) -> list[str]:
    """What lab has installed on the pipeline's UNet: the active trace's hooks and any leftovers."""
    unet = _unet_of(model)
    lines = []
    active = _ACTIVE_TRACES.get(unet)
    if active is not None:
        lines.append(f"trace: step tracking (UNet pre-forward hook); {len(active._installed)} site hooks installed")
        lines += active.describe()
    for module, kind, _ in _leftover_hooks(unet):
        lines.append(f"leftover {kind} on {type(module).__name__}")
    return lines


def remove_all_hooks(model) -> int:
    """Close the active trace on the UNet and remove any lab leftovers. Returns how many were removed."""
    unet = _unet_of(model)
    removed = 0
    active = _ACTIVE_TRACES.get(unet)
    if active is not None:
        removed += len(active._installed) + 1
        active.close()
    for module, kind, item in _leftover_hooks(unet):
        if kind == "processor":
            module.set_processor(item.original)
        else:
            del getattr(module, kind)[item]
            for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                getattr(module, extra, {}).pop(item, None)
        removed += 1
    return removed
