"""The trace: hooks on one UNet for the duration of a `with` block, and finding and removing leftovers."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
import weakref
from typing import Any, Callable

import torch
from diffusers.models.attention_processor import Attention

from lab.hooks.context import GUIDANCE_PARTS, KNOWN_PARTS, StepContext, row_groups
from lab.hooks.edits import Capture, Edit, _Hook, rows_argument
from lab.hooks.memory import CaptureTooLarge, MemoryEstimate, hook_shape, human_bytes, narrowing_advice
from lab.hooks.processor import ExplicitAttnProcessor, unsupported_reason
from lab.hooks.reducers import Mean, Reducer, Stack, tensor_layout
from lab.hooks.sites import ATTENTION_WHATS, BLOCK_WHATS, MERGE_WHATS, UNET_WHATS, WHATS_OF_KIND, Site, sites, unet_of

GUIDANCE_MODES = ("auto", "batched", "split", "none")
_UNET_POSITIONAL = ("sample", "timestep", "encoder_hidden_states")  # UNet2DConditionModel.forward's first arguments
DEFAULT_MEMORY_LIMIT = 2 * 1024**3  # bytes of captured tensors per generation; None disables the check

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
        inputs = {**dict(zip(_UNET_POSITIONAL, args)), **kwargs}
        extended = self.trace._begin_unet_call(inputs)
        return None if extended is None else ((), extended)


class _UnetCallEndHook(_LabHook):
    """Forward hook after every other one on the UNet: drops the rows extra_rows added to the call."""

    def __init__(self, trace: "Trace"):
        self.trace = trace

    def __call__(self, unet, args, output):
        keep = self.trace._end_unet_call()
        if keep is None:
            return None
        if isinstance(output, tuple):
            return (output[0][:keep], *output[1:])
        return type(output)(**{**output, "sample": output.sample[:keep]})


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


class _MergeHook(_LabHook):
    """Forward pre-hook on a decoder resnet (a "merge" site), whose input is torch.cat([backbone, skip], dim=1).

    One hook serves both tensors: it splits the input at `site.backbone_channels`, dispatches "backbone"
    then "skip" (those that hooks asked for) and concatenates again only when one of them changed.
    """

    def __init__(self, trace: "Trace", site: Site):
        self.trace, self.site = trace, site

    def __call__(self, resnet, args, kwargs):
        merged = args[0] if args else kwargs["input_tensor"]
        split = self.site.backbone_channels
        parts = {"backbone": merged[:, :split], "skip": merged[:, split:]}
        edited = {
            what: self.trace._dispatch(self.site, what, x) if (self.site.name, what) in self.trace._installed else x
            for what, x in parts.items()
        }
        if all(edited[what] is parts[what] for what in parts):
            return None
        joined = torch.cat([edited["backbone"], edited["skip"]], dim=1)
        return ((joined, *args[1:]), kwargs) if args else (args, {**kwargs, "input_tensor": joined})


# ----------------------------------------------------------------------------------------------
# The trace
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def shared_trace(model, **trace_options):
    """The trace to register a technique's hooks on: the one already active on the model's UNet, or
    a new one for the duration of the block. What is registered through it is removed on exit (also on
    an exception), so techniques stack with each other and with the user's own trace:

        with lab.trace(pipe) as tr, lab.freeu(pipe), lab.pag(pipe):    # each technique uses shared_trace
            maps = tr.capture("cross", "probs")

    trace_options (guidance=, ...) apply only when a new trace is opened.
    """
    active = _ACTIVE_TRACES.get(unet_of(model))
    if active is None:
        with Trace(model, **trace_options) as opened:
            yield opened
        return
    hooks, parts, images = list(active._hooks), active._named_parts, dict(active._named_images)
    try:
        yield active
    finally:
        active._hooks = [hook for hook in active._hooks if any(hook is kept for kept in hooks)]
        active._named_parts, active._named_images = parts, images
        if active._state == "active":
            active._sync()


# UNet -> the trace active on it. Weak keys: a deleted pipeline takes its entry with it.
_ACTIVE_TRACES: "weakref.WeakKeyDictionary[torch.nn.Module, Trace]" = weakref.WeakKeyDictionary()


def trace(
    model,
    *,
    guidance: str = "auto",
    uncond_first: bool = True,
    memory_limit: int | None = DEFAULT_MEMORY_LIMIT,
    scheduler=None,
) -> "Trace":
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

    Batch rows: every call's batch is read as equal parts, [uncond, cond] under batched guidance,
    [uncond, cond, perturbed] in diffusers' PAG pipelines; a technique names its own parts and images
    with name_rows(...), and captures and edits pick rows by name (rows=; see lab.hooks.context).

    A trace is entered once. Only one trace may be active on a UNet at a time.
    """

    def __init__(self, model, *, guidance="auto", uncond_first=True, memory_limit=DEFAULT_MEMORY_LIMIT, scheduler=None):
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {guidance!r}")
        self.pipe = model if hasattr(model, "unet") else None
        self.unet = unet_of(model)
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
        # named rows (see name_rows)
        self._named_parts: tuple[str, ...] | None = None
        self._named_images: dict[str, tuple[int, ...]] = {}
        self._split_seen = False
        # side passes (see side_pass)
        self._side: tuple[str, tuple[str, ...]] | None = None
        self._main_inputs: dict[str, Any] | None = None
        # extra rows (see extra_rows): (part, copy_of) in order; per running call, the rows to keep
        self._extra_parts: list[tuple[str, str]] = []
        self._keep_rows: list[int | None] = []
        self._unet_end_handle = None
        self._resolve_pending = False  # a resolution selector registered between runs, resolved at the next call

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
            raise RuntimeError(
                f"lab hooks are left on this UNet ({len(leftovers)}): call lab.remove_all_hooks(pipe) first"
            )
        _ACTIVE_TRACES[self.unet] = self
        self._unet_handle = self.unet.register_forward_pre_hook(_UnetCallHook(self), with_kwargs=True)
        self._unet_end_handle = self.unet.register_forward_hook(_UnetCallEndHook(self))
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
                self._unet_end_handle.remove()
            self._main_inputs = None
            if _ACTIVE_TRACES.get(self.unet) is self:
                del _ACTIVE_TRACES[self.unet]
        if errors:
            raise errors[0]

    # -- naming batch rows ------------------------------------------------------------------

    def name_rows(self, *, parts: tuple[str, ...] | list[str] | None = None, **images) -> "Trace":
        """Name the rows of every UNet call, so captures and edits can pick them with rows=.

        parts   the equal parts stacked in each call's batch, in order, when the trace cannot
                recognise them from the pipeline, e.g. ("uncond", "cond", "perturbed") for a
                technique that adds a perturbed copy of the batch. Default: the guidance layout
                (see the class docstring) and diffusers' PAG layout.
        images  image indices within each part: name_rows(source=0, target=1) for a batch of two
                prompts, name_rows(edited=[1, 2, 3]).
        Call it before registering the hooks that use these names.
        """
        if parts is not None:
            parts = tuple(parts)
            if (
                not parts
                or not all(isinstance(p, str) and p.isidentifier() for p in parts)
                or len(set(parts)) < len(parts)
            ):
                raise ValueError(f"parts must be distinct names such as ('uncond', 'cond', 'perturbed'), got {parts!r}")
            self._named_parts = parts
        taken = set(self.row_names()) - set(self._named_images)
        for name, indices in images.items():
            indices = (indices,) if isinstance(indices, int) else tuple(indices)
            if name in taken or name in ("both", "all"):
                raise ValueError(f"{name!r} already names a part of the batch: choose another name for images")
            if not indices or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
                raise ValueError(f"name_rows({name}=...) takes image indices (non-negative ints), got {indices!r}")
            self._named_images[name] = indices
        return self

    def row_names(self) -> dict[str, str]:
        """Every name rows= accepts on this trace, and what it is."""
        parts = self._named_parts if self._named_parts is not None else KNOWN_PARTS
        parts = (*parts, *(part for part, _ in self._extra_parts if part not in parts))
        return {**{part: "part" for part in parts}, **{name: "images" for name in self._named_images}}

    # -- registering edits and captures -----------------------------------------------------

    def capture(
        self,
        sites,
        what: str,
        *,
        reduce: Reducer | None = None,
        rows=None,
        steps=None,
        device: str | torch.device | None = "cpu",
        detach: bool = True,
        cfg: str | None = None,
        passes="main",
    ) -> Capture:
        """Record `what` at `sites` through `reduce` (default Mean over steps).

        rows    which batch rows: "cond" (default), "uncond", "both" ([uncond, cond] rows, also for
                split guidance), "perturbed" (PAG), an image group named with name_rows ("target"),
                words that all must hold ("cond target") or a list of choices. cfg= is its older name.
        steps   None (all), an int, a range/list of step numbers (StepContext.step) or f(ctx) -> bool.
        device  where results are stored: "cpu" (default) or None for the model's device.
        detach  False keeps the autograd graph (e.g. to optimise latents through attention maps).
        passes  "main" (default): the pipeline's own UNet calls, not the extra passes techniques run
                (SAG, PAG, Attend-and-Excite; see side_pass); a pass name, a list of them, or "all".
        """
        rows = rows_argument(rows, cfg, default="cond")
        reduce = reduce if reduce is not None else Mean()
        capture = Capture(self, sites, what, reduce, steps, rows, device, detach, passes)
        if capture.what in UNET_WHATS and "heads" in capture.reduce.over:
            raise ValueError(f"{capture.what!r} has no heads axis: drop 'heads' from over")
        self._register(capture)
        return capture

    def edit(
        self,
        sites,
        what: str,
        fn: Callable[[torch.Tensor, StepContext], torch.Tensor],
        *,
        steps=None,
        rows=None,
        cfg: str | None = None,
        passes="all",
    ) -> Edit:
        """Replace `what` at `sites` by fn(tensor, ctx), at the chosen steps and batch rows (default all;
        rows as in capture). fn sees only the chosen rows, stacked in batch order. passes: "all" by
        default (an edit to the model holds in techniques' side passes too, as FreeU does in diffusers'
        PAG pipeline), or "main", a side pass name, a list of them."""
        edit = Edit(self, sites, what, fn, steps, rows_argument(rows, cfg, default="both"), passes)
        self._register(edit)
        return edit

    def _register(self, hook: _Hook) -> None:
        if self._state != "active":
            raise RuntimeError("register edits and captures inside `with lab.trace(pipe) as tr:`")
        # Check everything first, so a bad request leaves the UNet exactly as it was. Resolution
        # selectors are checked here for their words and resolved (and checked) by _sync().
        hook.rows.check(self.row_names())
        chosen = hook.selector.resolve(self.all_sites, None)
        if not hook.selector.needs_latent_size:
            self._check_sites(hook, chosen)
            hook.sites = chosen
        self._hooks.append(hook)
        try:
            self._sync(lenient=hook)
        except BaseException:
            self._hooks.remove(hook)
            self._sync()
            raise

    def _check_sites(self, hook: _Hook, chosen: list[Site]) -> None:
        missing = [site.name for site in chosen if hook.what not in WHATS_OF_KIND[site.kind]]
        if missing:
            raise ValueError(
                f"{hook.what!r} does not exist at {', '.join(missing)} (attention sites have "
                f"{ATTENTION_WHATS}, blocks {BLOCK_WHATS}, merge sites {MERGE_WHATS}, the 'unet' site {UNET_WHATS})"
            )
        problems = [
            f"{site.name} {reason}"
            for site in chosen
            if site.is_attention
            for reason in [unsupported_reason(site, hook.what, self)]
            if reason
        ]
        if problems:
            raise ValueError("cannot hook faithfully:\n  " + "\n  ".join(problems))

    # -- installing torch hooks and processors ----------------------------------------------

    def _sync(self, lenient: _Hook | None = None) -> None:
        """Make the installed hooks match the registered ones (resolution selectors follow the latent).

        lenient: a hook just registered whose resolution selector may not fit the last run's latent size;
        it waits for the next UNet call (the next generation may have another size), which checks it."""
        wanted: dict[tuple[str, str], list[_Hook]] = {}
        self._resolve_pending = False
        for hook in self._hooks:
            if hook.selector.needs_latent_size:
                if self._latent_size is None:
                    continue
                try:
                    hook.sites = hook.selector.resolve(self.all_sites, self._latent_size)
                    self._check_sites(hook, hook.sites)
                except ValueError:
                    if hook is not lenient:
                        raise
                    hook.sites, self._resolve_pending = [], True
                    continue
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
            attn.set_processor(
                ExplicitAttnProcessor(original, lambda probs: self._dispatch(site, "probs", probs), owner=self)
            )
            self._installed[key] = original
            return
        if site.kind == "merge":
            # Both tensors of a merge site share one pre-hook: installed with the first, removed with the last.
            shared = [handle for (name, _), handle in self._installed.items() if name == site_name]
            self._installed[key] = (
                shared[0] if shared else site.module.register_forward_pre_hook(_MergeHook(self, site), with_kwargs=True)
            )
            return
        if site.kind == "unet":
            hook = _UnetTensorHook(self, site, what)
            # The trace's own pre-hook (step bookkeeping) was registered first, so it runs first.
            self._installed[key] = (
                site.module.register_forward_pre_hook(hook, with_kwargs=True)
                if what == "input"
                else site.module.register_forward_hook(hook, prepend=True)  # before the end hook trims extra rows
            )
            return
        module = (
            getattr(site.module, {"q": "to_q", "k": "to_k", "v": "to_v"}[what])
            if what in ("q", "k", "v")
            else site.module
        )
        self._installed[key] = module.register_forward_hook(_SiteTensorHook(self, site, what))

    def _uninstall(self, key: tuple[str, str]) -> None:
        installed = self._installed.pop(key)
        if key[1] == "probs":
            self.sites_by_name[key[0]].module.set_processor(installed)  # the very object that was there
        elif not any(handle is installed for handle in self._installed.values()):  # a merge site's other tensor
            installed.remove()

    # -- step bookkeeping (UNet pre-forward hook) -------------------------------------------

    def _schedule(self) -> list[float]:
        timesteps = getattr(self.scheduler, "timesteps", None)
        return [] if timesteps is None else [float(t) for t in torch.as_tensor(timesteps).flatten().tolist()]

    def _begin_unet_call(self, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """Step bookkeeping for a UNet call; returns the call's inputs when extra_rows extends its batch."""
        sample, timestep, encoder_hidden_states = (inputs.get(name) for name in _UNET_POSITIONAL)
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        batch = sample.shape[0]
        latent_size = (sample.shape[-2], sample.shape[-1])
        if self._side is not None:
            self._keep_rows.append(None)
            self._begin_side_call(t, batch, latent_size)
            return None
        self._keep_rows = [None]  # a main call is never inside another: anything left is from a failed call
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

        guidance, part, parts = self._guidance_of_call(batch)
        groups = row_groups(parts, batch, self._named_images)
        extended = None
        if self._extra_parts and guidance != "split":
            extended, parts, groups = self._extend(inputs, parts, groups)
            self._keep_rows = [batch]
            batch = extended["sample"].shape[0]
        self._main_inputs = extended if extended is not None else inputs
        uncond, cond = (_span(groups.get(name, ())) for name in ("uncond", "cond"))
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
            parts=parts,
            groups=groups,
        )
        self._calls += 1
        if new_run or self._resolve_pending:
            self._latent_size = latent_size
            self._sync()
        if new_run:
            self._check_steps_run(self._ctx.step, len(schedule))
            tokens = encoder_hidden_states.shape[1] if isinstance(encoder_hidden_states, torch.Tensor) else 77
            steps_left = len(schedule) - schedule_index if schedule_index is not None else max(len(schedule), 1)
            images = batch // len(parts) if guidance != "split" else batch
            estimate = self._estimate(
                latent_size, images, steps_left, tokens, GUIDANCE_PARTS if guidance == "split" else parts
            )
            if self.memory_limit is not None and estimate.total_bytes > self.memory_limit:
                self._refuse(estimate)
        return extended

    def _end_unet_call(self) -> int | None:
        """Rows of the finishing call's output to keep (None: all)."""
        return self._keep_rows.pop() if self._keep_rows else None

    # -- extra rows: parts a technique adds to the pipeline's batch ---------------------------

    @contextlib.contextmanager
    def extra_rows(self, part: str, copy_of: str = "cond"):
        """Inside the block, every main UNet call gets a copy of its `copy_of` rows appended as part `part`.

        What diffusers' PAG pipeline does with its third of the batch: [uncond, cond] becomes [uncond, cond,
        perturbed], one UNet call, so edits can treat the new rows differently (rows="perturbed") and read
        them at the "unet" output; after every hook of the call has run, the added rows are dropped, and the
        pipeline gets the batch it asked for. Every batched input (latent, text embeddings, SDXL's
        added_cond_kwargs, ...) is copied at those rows. Not under split guidance (one part per call).
        """
        if not isinstance(part, str) or not part.isidentifier():
            raise ValueError(f"part must be a name such as 'perturbed', got {part!r}")
        taken = {name for name, _ in self._extra_parts} | set(self._named_images)
        if part in taken or part in ("uncond", "cond", "both", "all"):
            raise ValueError(f"{part!r} already names rows of this trace: choose another name")
        entry = (part, copy_of)
        self._extra_parts.append(entry)
        try:
            yield self
        finally:
            self._extra_parts.remove(entry)

    @property
    def extra_parts(self) -> tuple[str, ...]:
        """The parts extra_rows adds to every main call now (dropped before the pipeline sees the output)."""
        return tuple(part for part, _ in self._extra_parts)

    def _extend(self, inputs, parts, groups):
        batch = inputs["sample"].shape[0]
        index = []
        for part, copy_of in self._extra_parts:
            if copy_of not in groups:
                raise ValueError(f"extra_rows({part!r}, copy_of={copy_of!r}): this call's rows are {list(parts)}")
            index += list(groups[copy_of])
            parts = (*parts, part)
        extended = _inputs_at_rows(inputs, list(range(batch)) + index)
        return extended, parts, row_groups(parts, batch + len(index), self._named_images)

    # -- side passes: a technique's own UNet calls ------------------------------------------

    @contextlib.contextmanager
    def side_pass(self, name: str, parts: tuple[str, ...] | list[str] = ("cond",)):
        """UNet calls inside this block are a technique's side pass, not steps of the pipeline.

        They keep the step of the call they serve (or, before the pipeline's first call, the step of
        their timestep in the schedule), never advance the step bookkeeping, and their StepContext says
        pass_name=name with the batch read as `parts`. Edits run in every pass unless registered with
        passes=; captures record only the "main" pass unless asked. Nested side passes are refused.
        """
        parts = tuple(parts)
        if not name or name == "main" or not isinstance(name, str):
            raise ValueError(f"a side pass needs a name other than 'main', got {name!r}")
        if not parts or len(set(parts)) < len(parts):
            raise ValueError(f"parts must be distinct names such as ('cond',), got {parts!r}")
        if self._side is not None:
            raise RuntimeError(f"side pass {name!r} started inside side pass {self._side[0]!r}: not supported")
        if self._state != "active":
            raise RuntimeError("side passes run inside an active trace")
        saved = self._ctx
        self._side = (name, parts)
        try:
            yield self
        finally:
            self._side = None
            self._ctx = saved  # the main call a side pass ran inside goes on with its own context

    def call_unet(self, name: str, rows, *, parts: tuple[str, ...] | list[str] = ("cond",), **inputs) -> torch.Tensor:
        """Run the UNet again as side pass `name` on `rows` of the current main call's inputs.

        For techniques that need another prediction at this step (SAG's degraded latent, PAG's
        perturbed attention): every input of the pipeline's call (sample, timestep, text embeddings,
        SDXL's added_cond_kwargs, ...) is taken at `rows`, then replaced by `inputs` given here.
        Returns the prediction. Call it from an edit of the "unet" output.
        """
        if self._main_inputs is None:
            raise RuntimeError("call_unet runs during a pipeline's UNet call (from an edit of the 'unet' output)")
        call = _inputs_at_rows(self._main_inputs, list(rows))
        call.update(inputs)
        call["return_dict"] = False
        with self.side_pass(name, parts):
            return self.unet(**call)[0]

    def _begin_side_call(self, t: float, batch: int, latent_size: tuple[int, int]) -> None:
        name, parts = self._side
        if latent_size != self._latent_size or self._resolve_pending:  # e.g. a pass before the pipeline's first call
            self._latent_size = latent_size
            self._sync()
        schedule = self._schedule()
        if self._ctx is not None and self._ctx.timestep == t:
            step, run_step, num_steps = self._ctx.step, self._ctx.run_step, self._ctx.num_steps
        else:
            step = schedule.index(t) if t in schedule else self._run_step
            run_step, num_steps = step, len(schedule) or None
        groups = row_groups(parts, batch, self._named_images)
        uncond, cond = (_span(groups.get(part, ())) for part in ("uncond", "cond"))
        batched = set(GUIDANCE_PARTS) <= set(parts)
        self._ctx = StepContext(
            step=step,
            run_step=run_step,
            timestep=t,
            num_steps=num_steps,
            guidance="batched" if batched else "none",
            part="both" if batched else parts[0],
            uncond=uncond,
            cond=cond,
            batch_size=batch,
            latent_size=latent_size,
            call=self._calls,
            parts=parts,
            groups=groups,
            pass_name=name,
        )
        self._calls += 1

    def _guidance_of_call(self, batch: int) -> tuple[str, str, tuple[str, ...]]:
        """(guidance, part, parts) of this call: see StepContext."""
        if self._named_parts is not None:
            parts = self._named_parts
            batched = set(GUIDANCE_PARTS) <= set(parts)
            return ("batched" if batched else "none"), ("both" if batched else "cond"), parts
        mode = self.guidance
        if mode == "auto" and self._pipeline_flag("do_perturbed_attention_guidance"):
            # diffusers' PAG pipelines stack [uncond, cond, perturbed] (or [cond, perturbed] without CFG).
            if self._pipeline_flag("do_classifier_free_guidance"):
                return "batched", "both", ("uncond", "cond", "perturbed")
            return "none", "cond", ("cond", "perturbed")
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
            elif self._pipeline_flag("do_classifier_free_guidance") and batch % 2 == 0:
                mode = "batched"
            else:
                mode = "none"
        if mode == "batched":
            if batch % 2:
                raise ValueError(f"guidance='batched' needs an even batch of [uncond, cond] rows, got {batch}")
            return "batched", "both", GUIDANCE_PARTS
        if mode == "split":
            first, second = ("uncond", "cond") if self.uncond_first else ("cond", "uncond")
            part = first if self._calls_at_timestep % 2 == 0 else second
            return "split", part, (part,)
        return "none", "cond", ("cond",)

    def _pipeline_flag(self, name: str) -> bool:
        try:
            return bool(getattr(self.pipe, name, False))
        except AttributeError:  # the property reads state set by __call__: no call yet
            return False

    def _check_steps_run(self, first_step: int, num_steps: int) -> None:
        """Refuse, before anything runs, hooks whose steps= this generation never reaches."""
        if not num_steps:
            return  # no schedule to check against (a bare UNet without scheduler)
        run = set(range(first_step, num_steps))
        for hook in self._hooks:
            if hook.explicit_steps and not hook.explicit_steps & run:
                raise ValueError(
                    f"{hook!r}: steps={hook.steps!r} are all outside this generation's steps "
                    f"{first_step}..{num_steps - 1} ({num_steps} in the schedule), so it would never run. "
                    "Steps count from 0 in scheduler.timesteps; image-to-image starts late (StepContext.step)."
                )

    def _site_context(self, site: Site) -> StepContext:
        # A site called directly (not through the UNet) gets the context of the last UNet call.
        if self._ctx is None:
            raise RuntimeError(f"{site.name} ran outside a UNet forward call; lab hooks need the UNet to be called")
        return dataclasses.replace(self._ctx, site=site, size=site.spatial_size(self._ctx.latent_size))

    def _dispatch(self, site: Site, what: str, x: torch.Tensor) -> torch.Tensor:
        """Run the edits, then the captures, registered for (site, what) on this tensor."""
        ctx = self._site_context(site)
        layout = tensor_layout(site, what, ctx.size, x.ndim)
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

    def estimate(
        self,
        height: int | None = None,
        width: int | None = None,
        *,
        batch: int = 1,
        steps: int = 50,
        tokens: int = 77,
        guidance: bool = True,
        latent_size: tuple[int, int] | None = None,
    ) -> MemoryEstimate:
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
        if self._named_parts is not None:
            parts = self._named_parts
        else:
            parts = GUIDANCE_PARTS if guidance else ("cond",)
        return self._estimate(tuple(latent_size), batch, steps, tokens, parts)

    def _estimate(self, latent_size, images: int, steps: int, tokens: int, parts: tuple[str, ...]) -> MemoryEstimate:
        per_capture = []
        for hook in self._hooks:
            if not isinstance(hook, Capture):
                continue
            groups = row_groups(parts, images * len(parts), self._named_images)
            context = StepContext(
                0,
                0,
                0.0,
                None,
                "batched",
                "both",
                slice(0),
                slice(0),
                images * len(parts),
                tuple(latent_size),
                -1,
                parts=parts,
                groups=groups,
            )
            rows = len(hook.rows.select(context))
            chosen = hook.selector.resolve(self.all_sites, latent_size)
            nbytes = 0
            for site in chosen:
                shape = hook_shape(site, hook.what, rows, latent_size, tokens)
                layout = tensor_layout(site, hook.what, site.spatial_size(latent_size))
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
            f"the captures would store {human_bytes(estimate.total_bytes)}, over the limit of "
            f"{human_bytes(self.memory_limit)}:\n{estimate}\nTo narrow {biggest!r}: {narrowing_advice(biggest)}; "
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
        if (
            isinstance(module, Attention)
            and isinstance(processor, ExplicitAttnProcessor)
            and processor.owner is not owner
        ):
            found.append((module, "processor", module.processor))
        for dict_name in ("_forward_hooks", "_forward_pre_hooks"):
            for handle_id, hook in getattr(module, dict_name).items():
                if getattr(hook, "lab_hook", False) and getattr(hook, "trace", None) is not owner:
                    found.append((module, dict_name, handle_id))
    return found


def active_hooks(model) -> list[str]:
    """What lab has installed on the pipeline's UNet: the active trace's hooks and any leftovers."""
    unet = unet_of(model)
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
    unet = unet_of(model)
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
            for extra in (
                "_forward_pre_hooks_with_kwargs",
                "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called",
            ):
                getattr(module, extra, {}).pop(item, None)
        removed += 1
    return removed


def _inputs_at_rows(inputs: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """A UNet call's inputs at the given batch rows: every tensor batched like the latent (also inside dicts
    such as SDXL's added_cond_kwargs) is indexed; everything else (the timestep, options) is kept."""
    batch = inputs["sample"].shape[0]

    def take(value):
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
            return value[torch.tensor(rows, device=value.device)]
        if isinstance(value, dict):
            return {key: take(item) for key, item in value.items()}
        return value

    return {key: take(value) for key, value in inputs.items()}


def _span(rows: tuple[int, ...]) -> slice:
    """A part's rows (always contiguous) as a slice; an empty slice when the call has no such part."""
    return slice(rows[0], rows[-1] + 1) if rows else slice(0, 0)
