"""What a hook knows about the UNet call it is in: the step, and which batch rows are which.

Rows. A UNet call's batch is a stack of equal *parts*, e.g. [uncond, cond] under batched classifier-free
guidance, or [uncond, cond, perturbed] in diffusers' PAG pipelines; each part holds the same images in
the same order. A technique may also name *images*, e.g. Prompt-to-Prompt's source and target prompts:

    tr.name_rows(source=0, target=1)            # image 0 and image 1 of every part
    tr.edit("cross", "probs", fn, rows="cond target")   # words that all must hold
    tr.capture("cross", "probs", rows=["source", "target"])  # a list: any of them

"both" or "all" picks every row. A part that a call does not hold (uncond without guidance, the other
half of split guidance) selects nothing there, and the hook skips that call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from lab.hooks.sites import Site

GUIDANCE_PARTS = ("uncond", "cond")
KNOWN_PARTS = ("uncond", "cond", "perturbed")  # what the trace recognises from diffusers pipelines
ALL_ROWS = ("both", "all")
CFG_PARTS = ("cond", "uncond", "both")  # the values of the older cfg= argument, all valid rows= too


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
    parts      The parts stacked in this call's batch, in order: ("uncond", "cond"), ("cond",),
               ("uncond", "cond", "perturbed"), or what the technique named with Trace.name_rows.
    groups     {name: row indices} for every part and every named image group of this call.
    pass_name  "main" for the calls the pipeline makes; a technique's own extra UNet calls (SAG's
               degraded pass, Attend-and-Excite's gradient passes) run as side
               passes under their own name (Trace.side_pass), at the step of the call they serve.
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
    parts: tuple[str, ...] = ()
    groups: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    pass_name: str = "main"

    def rows(self, spec="both") -> tuple[int, ...]:
        """The row indices of this call that a rows= choice picks (empty if none)."""
        return Rows(spec).select(self)


def row_groups(parts: tuple[str, ...], batch: int, images: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """{name: row indices} of a batch made of equal `parts`, each holding the same images."""
    if batch % len(parts):
        raise ValueError(f"a batch of {batch} rows cannot hold the {len(parts)} equal parts {list(parts)}")
    per_part = batch // len(parts)
    groups = {part: tuple(range(k * per_part, (k + 1) * per_part)) for k, part in enumerate(parts)}
    for name, indices in images.items():
        outside = [i for i in indices if i >= per_part]
        if outside:
            raise ValueError(
                f"rows named {name!r} are images {list(indices)}, but this UNet call holds {per_part} image(s) "
                f"per part ({batch} rows = {' + '.join(parts)}): name images 0..{per_part - 1}"
            )
        groups[name] = tuple(k * per_part + i for k in range(len(parts)) for i in indices)
    return groups


class Rows:
    """A parsed rows= choice: words that all must hold, or a list of such choices (any of them)."""

    def __init__(self, spec):
        if isinstance(spec, Rows):
            self.spec, self.alternatives = spec.spec, spec.alternatives
            return
        choices = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, (list, tuple)) else None
        if not choices or not all(isinstance(choice, str) and choice.split() for choice in choices):
            raise TypeError(
                f"rows must be a group name such as 'cond', words such as 'cond target', or a list "
                f"of those, got {spec!r}"
            )
        self.spec = spec
        self.alternatives = [tuple(word for word in choice.split() if word not in ALL_ROWS) for choice in choices]

    def __repr__(self):
        return repr(self.spec)

    @property
    def names(self) -> set[str]:
        return {word for words in self.alternatives for word in words}

    def spans_parts(self, parts: tuple[str, ...]) -> bool:
        """True when some choice names no part: under split guidance it gathers rows from both calls."""
        return any(not set(words) & set(parts) for words in self.alternatives)

    def check(self, known: Mapping[str, str]) -> None:
        """Refuse names that no row group has; `known` maps each name to what it is ("part", "images")."""
        unknown = sorted(self.names - set(known))
        if unknown:
            listed = ", ".join(f"{name} ({what})" for name, what in known.items())
            raise ValueError(
                f"rows={self.spec!r} names no row group: {', '.join(map(repr, unknown))}. Row groups: "
                f"{listed}; 'both' or 'all' for every row. Name images with trace.name_rows(...)."
            )

    def select(self, ctx: StepContext) -> tuple[int, ...]:
        chosen: set[int] = set()
        every = set(range(ctx.batch_size))
        for words in self.alternatives:
            rows = set(every)
            for word in words:
                rows &= set(ctx.groups.get(word, ()))
            chosen |= rows
        return tuple(sorted(chosen))


def passes_argument(passes) -> frozenset[str] | None:
    """passes= of a capture or edit: "all" (None), a pass name ("main", "sag", ...) or a collection of them."""
    if passes == "all":
        return None
    names = (
        {passes}
        if isinstance(passes, str)
        else set(passes)
        if isinstance(passes, (list, tuple, set, frozenset))
        else None
    )
    if not names or not all(isinstance(name, str) and name for name in names):
        raise TypeError(f"passes must be 'all', 'main', a side pass name, or a list of those, got {passes!r}")
    return frozenset(names)


def as_slice(rows: tuple[int, ...]) -> slice | None:
    """Contiguous rows as a slice (indexing then makes a view, as before row groups existed), else None."""
    if rows and rows == tuple(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return None


def steps_filter(steps) -> Callable[[StepContext], bool]:
    if steps is None:
        return lambda ctx: True
    if callable(steps):
        return steps
    allowed = explicit_steps(steps)
    return lambda ctx: ctx.step in allowed


def explicit_steps(steps) -> frozenset[int] | None:
    """The step numbers a steps= argument lists (None for all steps or a function). Checks them."""
    if steps is None or callable(steps):
        return None
    if isinstance(steps, bool) or not isinstance(steps, (int, range, list, tuple, set, frozenset)):
        raise TypeError(f"steps must be None, an int, a range/list/set of ints or a function of ctx, got {steps!r}")
    allowed = frozenset([steps] if isinstance(steps, int) else steps)
    if not all(isinstance(step, int) and not isinstance(step, bool) for step in allowed):
        raise TypeError(f"steps must be ints, got {sorted(map(repr, allowed))}")
    # An empty collection is allowed and means "never" (e.g. an injection schedule of zero steps); a
    # non-empty one that misses the whole run is refused by the trace when the run starts.
    negative = sorted(step for step in allowed if step < 0)
    if negative:
        raise ValueError(
            f"steps {negative} are negative: steps count from 0 (the first denoising step) to num_inference_steps - 1"
        )
    return allowed
