"""Edits and captures: what a trace runs at a site, for one tensor, at chosen steps and batch rows."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch

from lab.hooks.context import CFG_PARTS, Rows, StepContext, as_slice, explicit_steps, passes_argument, steps_filter
from lab.hooks.reducers import Reducer, Stack, TensorLayout, downsampled_size
from lab.hooks.selectors import Selector
from lab.hooks.sites import Site, canonical_what


def rows_argument(rows, cfg, default: str) -> Rows:
    """rows= (any row group) or the older cfg= ("cond", "uncond", "both"); not both."""
    if rows is not None and cfg is not None:
        raise ValueError(
            f"give rows= or cfg=, not both (got rows={rows!r}, cfg={cfg!r}); cfg= is the older "
            "name for the guidance groups, which rows= accepts too"
        )
    if cfg is not None and cfg not in CFG_PARTS:
        raise ValueError(f"cfg must be one of {CFG_PARTS}, got {cfg!r} (rows= also takes named row groups)")
    return Rows(rows if rows is not None else cfg if cfg is not None else default)


class _Hook:
    """What edits and captures share: where (sites), which tensor, at which steps, which batch rows."""

    def __init__(self, trace, selector, what: str, steps, rows: Rows, passes="all"):
        self.trace = trace
        self.passes = passes_argument(passes)  # None: every pass
        self.selector = Selector.parse(selector)  # parsed once; resolved per latent size by the trace
        self.what = canonical_what(what)
        self.steps = steps
        self.explicit_steps = explicit_steps(steps)  # checks them (ints, none negative)
        self.rows = rows
        self._step_ok = steps_filter(steps)
        self._rows_of_call: tuple[int | None, tuple[int, ...]] = (None, ())
        self.sites: list[Site] = []  # resolved now, or at the first UNet call for resolution selectors

    @property
    def cfg(self):
        """The rows= choice (named cfg before row groups existed)."""
        return self.rows.spec

    def selected_rows(self, ctx: StepContext) -> tuple[int, ...]:
        if self._rows_of_call[0] != ctx.call:  # asked once by wants(), again by apply()/record()
            self._rows_of_call = (ctx.call, self.rows.select(ctx))
        return self._rows_of_call[1]

    def wants(self, ctx: StepContext) -> bool:
        if self.passes is not None and ctx.pass_name not in self.passes:
            return False
        return self._step_ok(ctx) and bool(self.selected_rows(ctx))

    def _where(self) -> str:
        sites = (
            f"{len(self.sites)} site{'s' if len(self.sites) != 1 else ''}" if self.sites else "sites resolved at run"
        )
        return f"{self.what} at {self.selector!r} ({sites})"


class Edit(_Hook):
    """fn(tensor, ctx) -> tensor of the same shape, applied at the chosen sites, steps and batch rows."""

    def __init__(self, trace, selector, what, fn, steps, rows: Rows, passes="all"):
        super().__init__(trace, selector, what, steps, rows, passes)
        if not callable(fn):
            raise TypeError(f"the edit function must be callable, got {type(fn).__name__}")
        self.fn = fn

    def __repr__(self):
        return f"edit {self._where()} with {getattr(self.fn, '__name__', self.fn)!r}, steps={self.steps!r}, rows={self.cfg!r}"

    def apply(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        rows = self.selected_rows(ctx)
        contiguous = as_slice(rows)
        if contiguous == slice(0, x.shape[0]):
            part = x
        else:
            index = contiguous if contiguous is not None else torch.tensor(rows, device=x.device)
            part = x[index]
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
        if contiguous is not None:
            return torch.cat([x[: contiguous.start], new, x[contiguous.stop :]])
        return x.index_copy(0, index, new)  # out of place: autograd through edits keeps working


class Capture(_Hook):
    """Accumulates one tensor per site through a reducer. Read it with result() or capture[site_name].

    Captures accumulate over every UNet call of the trace they belong to (all generations run
    inside the `with` block); reset() starts over. `contexts` holds the StepContext (without site)
    of each UNet call folded in, in order: with Stack, entry i of every site's tensor is contexts[i]
    (split guidance with rows spanning both halves: the step's second call).
    """

    def __init__(self, trace, selector, what, reduce: Reducer, steps, rows: Rows, device, detach, passes="main"):
        super().__init__(trace, selector, what, steps, rows, passes)
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
        return f"capture {self._where()} with {self.reduce!r}, rows={self.cfg!r}, steps={self.steps!r}"

    def record(self, site: Site, x: torch.Tensor, ctx: StepContext, layout: TensorLayout) -> None:
        rows = self.selected_rows(ctx)
        contiguous = as_slice(rows)
        x = x[contiguous if contiguous is not None else torch.tensor(rows, device=x.device)]
        if self.detach:
            x = x.detach()
        x = self.reduce.prepare(x, layout)
        if self.device is not None:
            x = x.to(self.device)
        self.sizes[site.name] = downsampled_size(layout.size, self.reduce.downsample or 1)
        if self._first_call is None:
            self._first_call = ctx.call
        if ctx.guidance == "split" and self.rows.spans_parts(("uncond", "cond")):
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
                f"matched steps={self.steps!r} and rows={self.cfg!r} ('uncond' needs guidance)"
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
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise ValueError(
            f"scale_tokens needs token positions as non-negative ints, got {indices!r}; "
            "lab.token_indices(pipe, prompt, word) gives a word's positions"
        )

    def scale(probs: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        keys = probs.shape[-1]
        outside = [i for i in indices if i >= keys]
        if outside:
            raise ValueError(
                f"scale_tokens: token positions {outside} are past the {keys} keys attended to at "
                f"{ctx.site.name if ctx.site else 'this site'} (text tokens 0..{keys - 1}); "
                "lab.prompt_tokens(pipe, prompt) lists the positions, lab.token_indices(pipe, prompt, word) a word's"
            )
        weights = torch.ones(keys, dtype=probs.dtype, device=probs.device)
        weights[indices] = factor
        return probs * weights

    scale.__name__ = f"scale_tokens({indices}, {factor})"
    return scale
