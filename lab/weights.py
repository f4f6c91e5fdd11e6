"""Change a pipeline's weights for the length of a `with` block, and get them back bit for bit.

    import lab.weights
    from peft import LoraConfig
    pipe = lab.testing.tiny_sd1_pipeline()
    with lab.weights.WeightEdit(pipe, "unet.*.attn2.to_[kv].weight") as w:
        for name, p in w.parameters.items():
            p.data.mul_(0.5)                    # a closed-form rewrite (UCE), optimizer steps (ESD), ...
        image = pipe("a red circle").images[0]
        w.save("half_kv.safetensors")           # only the parameters that changed, as safetensors
    # every selected parameter is back: values bit for bit, dtype, device, requires_grad, grad

    with lab.weights.load("half_kv.safetensors").apply(pipe):
        image = pipe("a red circle").images[0]  # the same edit, undone again on exit

    with lab.weights.LoraAdapter(pipe, LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"])) as lora:
        ...                                     # train lora.parameters (Concept Sliders), lora.scale = -1.0
        lora.save("slider/")                    # diffusers' LoRA format: plain pipe.load_lora_weights("slider/")
    with lab.weights.LoraWeights(pipe, "slider/", scale=2.0):
        image = pipe("a red circle").images[0]

Names
    A pipeline's parameters are named by component and torch path, "unet.conv_in.weight",
    "text_encoder.text_model.final_layer_norm.weight"; a bare module's by its torch path alone.
    A selector is a full name, a glob ("unet.*.attn2.to_[kv].weight"; `*` also crosses dots), a
    predicate on (name, parameter), or a list of these. Every selector must match something: one that
    matches nothing is a ValueError naming close names, raised before anything is touched.

How it works
    `WeightEdit` clones the selected parameters when it is built (on their device, or on the CPU with
    offload=True; it holds one copy of what you select) and, on leaving the block (normally, on an exception, on KeyboardInterrupt), copies
    the clones back into the very same Parameter objects, so an optimizer or a hook holding them keeps
    seeing the restored values. A parameter whose dtype, device or shape was changed gets its original
    tensor back; one replaced by another Parameter object is put back. If the module that owned a
    name is gone (say a peft wrapper now sits at that path), every value is still restored into the
    original objects and a RuntimeError names the paths: the pipeline's structure is not ours to undo.
    Like baukit's Trace, the object is live from construction: outside a `with` block call restore()
    yourself (an edit dropped unrestored warns). `save` writes safetensors holding the changed values and,
    as metadata, the format and version, the components, each parameter's shape and dtype, and a hash of
    every parameter name and shape of the component; `apply` refuses a model they do not fit.
    LoRA goes through diffusers and peft, never hand-written layers: `LoraAdapter` is
    `unet.add_adapter`, `LoraWeights` is `pipe.load_lora_weights`, the scale is diffusers'
    `set_adapters`, and leaving removes the adapter (`unload_lora` when it was the only one), so the
    UNet's state_dict, module types and requires_grad flags (peft freezes every base parameter while an
    adapter is in) are what they were.

Nesting with lab.trace works both ways, with one exception that is refused: a LoRA context opened
inside a trace that already hooks "q"/"k"/"v" (those hooks sit on the Linear layer peft would wrap,
and would then read it without the LoRA). Open the LoRA first.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import inspect
import json
import warnings
from typing import Callable, Iterable, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = ["WeightEdit", "SavedEdit", "load", "named_parameters", "select_parameters", "LoraAdapter", "LoraWeights"]

FORMAT, VERSION = "sdlab.weights", 1
Selector = Union[str, Callable[[str, torch.nn.Parameter], bool], Iterable]


# ---------------------------------------------------------------------------------------------- names


def _roots(model) -> dict[str, torch.nn.Module]:
    """What names are relative to: a pipeline's torch components by attribute name, or a bare module as ""."""
    if isinstance(model, torch.nn.Module):
        return {"": model}
    components = getattr(model, "components", None)
    if not isinstance(components, dict):
        raise TypeError(f"expected a diffusers pipeline or a torch module, got {type(model).__name__}")
    return {name: c for name, c in components.items() if isinstance(c, torch.nn.Module)}


def named_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Every parameter of a pipeline (or module) under the names selectors match."""
    return {
        f"{root}.{name}" if root else name: p
        for root, module in _roots(model).items()
        for name, p in module.named_parameters()
    }


def select_parameters(model, selector: Selector) -> dict[str, torch.nn.Parameter]:
    """The parameters a selector chooses, in the model's order; ValueError if any part matches nothing."""
    everything = named_parameters(model)
    parts = [selector] if isinstance(selector, str) or callable(selector) else list(selector)
    if not parts:
        raise ValueError("empty selector: give a name, a glob, a predicate (name, param) -> bool, or a list of them")
    chosen: set[str] = set()
    for part in parts:
        if callable(part):
            hits = [n for n, p in everything.items() if part(n, p)]
        elif isinstance(part, str) and not any(c in part for c in "*?["):
            hits = [part] if part in everything else []  # exact names skip the glob scan (ESD-u lists ~700)
        elif isinstance(part, str):
            hits = [n for n in everything if fnmatch.fnmatchcase(n, part)]
        else:
            raise TypeError(f"a selector part must be a str or a callable, got {type(part).__name__}")
        if not hits:
            raise ValueError(_no_match(part, model, everything))
        chosen.update(hits)
    return {n: p for n, p in everything.items() if n in chosen}


def _no_match(part, model, everything) -> str:
    if callable(part):
        return f"the predicate {getattr(part, '__name__', part)!r} chose no parameter: nothing was changed"
    close = difflib.get_close_matches(part, list(everything), n=5, cutoff=0.5)
    message = f"no parameter matches {part!r}: nothing was changed."
    if close:
        message += " Did you mean:\n  " + "\n  ".join(close)
    roots = [r for r in _roots(model) if r]
    if roots and part.split(".")[0] not in roots and not part.startswith("*"):
        message += f"\nPipeline names start with a component: {', '.join(roots)} (e.g. 'unet.conv_in.weight')."
    if not roots and part.split(".")[0] in ("unet", "text_encoder", "text_encoder_2", "vae"):
        message += "\nThis is a bare module: names have no component prefix (e.g. 'conv_in.weight')."
    return message + "\nlab.weights.named_parameters(model) lists every name."


def _owner(roots: dict[str, torch.nn.Module], name: str) -> tuple[torch.nn.Module | None, str]:
    """The module that holds `name`'s parameter as things are now, and the attribute name, or (None, leaf)."""
    root, _, rest = ("", "", name) if "" in roots else name.partition(".")
    path, _, leaf = rest.rpartition(".")
    try:
        return roots[root].get_submodule(path), leaf
    except (AttributeError, KeyError):
        return None, leaf


# ---------------------------------------------------------------------------------------------- edits


@dataclasses.dataclass
class _Saved:
    param: torch.nn.Parameter
    owner: torch.nn.Module
    leaf: str
    value: torch.Tensor  # the clone: what the parameter's data was, bit for bit
    device: torch.device
    requires_grad: bool
    grad: torch.Tensor | None


class WeightEdit:
    """Snapshot the selected parameters now; put them back on leaving the `with` block (see module docstring).

    `parameters` maps each selected name to its live Parameter: change them any way you like.
    persistent=True (or `keep()` inside the block) keeps the change and just drops the snapshot.
    """

    def __init__(self, model, select: Selector, *, persistent: bool = False, offload: bool = False):
        self.model, self.persistent = model, persistent
        self.parameters = select_parameters(model, select)
        roots = _roots(model)
        # inference_mode(False): a clone made in inference mode could not be put back into a trainable parameter
        with torch.inference_mode(False), torch.no_grad():
            self._saved: dict[str, _Saved] | None = {
                name: _Saved(
                    p,
                    *_owner(roots, name),
                    _clone(p, offload),
                    p.device,
                    p.requires_grad,
                    None if p.grad is None else _clone(p.grad, offload),
                )
                for name, p in self.parameters.items()
            }

    def __enter__(self) -> "WeightEdit":
        return self

    def __exit__(self, *exc) -> bool:
        if self.persistent:
            self._saved = None  # keep the change; free the snapshot
        else:
            self.restore()
        return False  # never swallow the exception (or KeyboardInterrupt) that ended the block

    def keep(self) -> None:
        """Keep the change when the block ends (same as persistent=True)."""
        self.persistent = True

    def restore(self) -> None:
        """Put every snapshotted parameter back now and close the edit (idempotent)."""
        if self._saved is None:
            return
        moved, failed, roots = [], [], _roots(self.model)
        with torch.inference_mode(False), torch.no_grad():
            for name in list(self._saved):
                # popped one at a time: a KeyboardInterrupt in here leaves the rest for a second restore()
                s = self._saved.pop(name)
                try:
                    p = s.param
                    if (p.dtype, p.device, p.shape) == (s.value.dtype, s.device, s.value.shape):
                        p.data.copy_(s.value)  # in place: whoever holds the storage sees it restored
                    else:
                        p.data = s.value.to(s.device)  # dtype/device/shape was changed: the original tensor
                    p.requires_grad_(s.requires_grad)
                    p.grad = None if s.grad is None else s.grad.to(s.device)
                    owner, leaf = _owner(roots, name)
                    if owner is not s.owner:
                        now = type(owner).__name__ if owner is not None else "nothing"
                        moved.append(
                            f"{name}: {'another ' if type(owner) is type(s.owner) else ''}{now} "
                            f"at that path, was {type(s.owner).__name__}"
                        )
                    elif owner._parameters.get(leaf) is not p:
                        setattr(owner, leaf, p)  # a new Parameter object was assigned: ours goes back
                except Exception as error:  # restore the others before reporting
                    failed.append(f"{name}: {error!r}")
        self._saved = None
        if failed or moved:
            raise RuntimeError(
                "lab.weights could not put everything back. Values were restored into the original parameter objects"
                + ("; these failed:\n  " + "\n  ".join(failed) if failed else "")
                + (
                    "\nThe module structure changed under these names (undo that change, e.g. remove the adapter "
                    "or put the module back, inside the block):\n  " + "\n  ".join(moved)
                    if moved
                    else ""
                )
            )

    def _open(self) -> dict[str, _Saved]:
        if self._saved is None:
            raise RuntimeError("this edit is closed (its snapshot was restored or kept): read changes inside the block")
        return self._saved

    def changed(self) -> list[str]:
        """Names whose current value (or dtype/shape) differs from the snapshot."""
        return [n for n, s in self._open().items() if not _same(s.param, s.value)]

    def delta(self) -> dict[str, torch.Tensor]:
        """{name: current - original} in float32, for the changed names."""
        saved = self._open()
        return {
            n: saved[n].param.detach().float() - saved[n].value.to(saved[n].param.device).float()
            for n in self.changed()
        }

    def save(self, path) -> list[str]:
        """Write the changed parameters' current values to a safetensors file; returns their names."""
        names = self.changed()
        if not names:
            raise ValueError("nothing changed since the snapshot: nothing to save")
        tensors = {n: self.parameters[n].detach().to("cpu").contiguous() for n in names}
        roots = _roots(self.model)
        touched = sorted({n.split(".")[0] if "" not in roots else "" for n in names})
        metadata = {
            "format": FORMAT,
            "version": str(VERSION),
            "components": json.dumps({r: type(roots[r]).__name__ for r in touched}),
            "architecture": json.dumps({r: _fingerprint(roots[r]) for r in touched}),
            "parameters": json.dumps(
                {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in tensors.items()}
            ),
        }
        save_file(tensors, str(path), metadata=metadata)
        return names

    def __del__(self):
        # the one way to lose an edit's undo: building it outside `with` and dropping it
        if getattr(self, "_saved", None) is not None and not self.persistent:
            warnings.warn(
                f"{self!r} was dropped without being restored: its change stays. Use it in a `with` block, "
                "call restore(), or pass persistent=True",
                RuntimeWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        state = "closed" if self._saved is None else "open"
        size = sum(p.numel() * p.element_size() for p in self.parameters.values())
        return f"WeightEdit({len(self.parameters)} parameters, {size / 2**20:.1f} MiB, {state})"


def _clone(t: torch.Tensor, offload: bool) -> torch.Tensor:
    return t.detach().to("cpu", copy=True) if offload else t.detach().clone()


def _same(p: torch.Tensor, value: torch.Tensor) -> bool:
    return p.dtype == value.dtype and p.shape == value.shape and torch.equal(p.detach().to(value.device), value)


def _fingerprint(module: torch.nn.Module) -> str:
    """Names and shapes of every parameter: equal for two checkpoints of one architecture, different otherwise."""
    text = ";".join(f"{n}:{tuple(p.shape)}" for n, p in module.named_parameters())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass
class SavedEdit:
    """An edit read from a file: `tensors` by name and the `metadata` it was saved with."""

    tensors: dict[str, torch.Tensor]
    metadata: dict

    def apply(self, model, *, persistent: bool = False, offload: bool = False, strict: bool = True) -> WeightEdit:
        """Write the saved values into `model` now; returns the WeightEdit that undoes it (use it in `with`).

        Names and shapes must fit; strict=False also accepts a model whose other parameters differ."""
        tensors = self._rebased(model)
        live = named_parameters(model)
        missing = [n for n in tensors if n not in live]
        wrong = [
            f"{n}: file {tuple(t.shape)}, model {tuple(live[n].shape)}"
            for n, t in tensors.items()
            if n in live and live[n].shape != t.shape
        ]
        if missing or wrong:
            raise ValueError(
                "this edit does not fit this model; nothing was changed."
                + (f"\nMissing names ({len(missing)}): " + ", ".join(missing[:5]) if missing else "")
                + ("\nOther shapes:\n  " + "\n  ".join(wrong[:5]) if wrong else "")
                + f"\nThe edit was saved from: {self.metadata.get('components')}"
            )
        roots, saved = _roots(model), self.metadata.get("architecture", {})
        touched = {""} if "" in roots else {n.split(".")[0] for n in tensors}
        others = [r for r in touched if _fingerprint(roots[r]) not in saved.values()]
        if others:
            message = (
                f"the edit's names and shapes fit, but {', '.join(others) or 'the model'} has other parameters "
                f"than the {self.metadata.get('components')} it was saved from (another architecture)"
            )
            if strict:
                raise ValueError(message + "; nothing was changed. strict=False applies it anyway.")
            warnings.warn(message, stacklevel=2)
        edit = WeightEdit(model, list(tensors), persistent=persistent, offload=offload)
        try:
            with torch.no_grad():
                for name, t in tensors.items():
                    edit.parameters[name].data.copy_(t)  # copy_ casts to the model's dtype and device
        except BaseException:
            edit.restore()
            raise
        return edit

    def _rebased(self, model) -> dict[str, torch.Tensor]:
        """Names for `model`: an edit saved from `pipe.unet` applies to `pipe`, and the other way round."""
        saved = self.metadata.get("components", {})
        roots = _roots(model)
        if len(saved) != 1 or set(saved) <= set(roots):
            return self.tensors
        ((saved_root, cls),) = saved.items()
        if saved_root == "":  # bare module -> the pipeline component of that class
            match = [r for r, m in roots.items() if type(m).__name__ == cls]
            return {f"{match[0]}.{n}": t for n, t in self.tensors.items()} if len(match) == 1 else self.tensors
        if "" in roots and type(roots[""]).__name__ == cls:  # pipeline component -> a bare module of that class
            return {n[len(saved_root) + 1 :]: t for n, t in self.tensors.items()}
        return self.tensors


def load(path) -> SavedEdit:
    """Read an edit written by `WeightEdit.save` (safetensors; never pickle)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an sdlab weight edit (its metadata has no format {FORMAT!r})")
    if int(metadata.get("version", 0)) > VERSION:
        raise ValueError(f"{path} was written by a newer sdlab (format version {metadata['version']} > {VERSION})")
    parsed = {k: json.loads(v) if k in ("components", "architecture", "parameters") else v for k, v in metadata.items()}
    return SavedEdit(load_file(str(path)), parsed)


# ---------------------------------------------------------------------------------------------- LoRA


class _PeftState:
    """What adding or loading an adapter changes besides modules: requires_grad flags (peft freezes every
    base parameter), diffusers' peft attributes, and which earlier adapters were active in each layer."""

    def __init__(self, module: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.module = module
        self.flags = [(p, p.requires_grad) for p in module.parameters()]
        self.attrs = {k: vars(module)[k] for k in ("peft_config", "_hf_peft_config_loaded") if k in vars(module)}
        self.active = {m: list(m.active_adapters) for m in module.modules() if isinstance(m, BaseTunerLayer)}

    def restore(self) -> None:
        for layer, names in self.active.items():
            layer.set_adapter(names)  # also marks those adapters trainable: the flags below fix that
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for k in ("peft_config", "_hf_peft_config_loaded"):
            if k in self.attrs:
                setattr(self.module, k, self.attrs[k])
            elif k in vars(self.module):
                delattr(self.module, k)


def _refuse_hooked(unet: torch.nn.Module) -> None:
    """A forward hook on a layer peft just wrapped would read it without the LoRA (see module docstring)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    hooked = [
        n
        for n, m in unet.named_modules()
        if isinstance(m, BaseTunerLayer)
        and (m.get_base_layer()._forward_hooks or m.get_base_layer()._forward_pre_hooks)
    ]
    if hooked:
        raise ValueError(
            "LoRA refused: these layers already have forward hooks (a lab.trace reading 'q'/'k'/'v'?), "
            "which would see them without the LoRA. Open the LoRA context first, then the trace:\n  "
            + "\n  ".join(hooked[:5])
        )


def _refuse_taken(adapter_name: str, modules) -> None:
    # checked before anything is added: undoing a failed add must not delete someone else's adapter
    if any(adapter_name in (getattr(m, "peft_config", None) or {}) for m in modules):
        raise ValueError(f"an adapter named {adapter_name!r} is already loaded: pass another adapter_name")


class _LoraContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._set_scale(float(value))
        self._scale = float(value)

    def _restore(self, states: list[_PeftState], remove_only_ours: Callable[[], None], remove_all: Callable[[], None]):
        if self._closed:
            return
        self._closed = True
        if any(s.active for s in states):
            remove_only_ours()  # other adapters stay (diffusers may leave an empty peft wrapper)
        else:
            remove_all()  # puts the original Linear / Conv modules back
        for s in states:
            s.restore()


class LoraAdapter(_LoraContext):
    """A fresh, trainable peft LoRA adapter on the UNet for the length of a `with` block.

    `parameters` are the adapter's tensors (everything else is frozen meanwhile); `scale` is the adapter
    weight; `save(folder)` writes it in diffusers' LoRA format.
    """

    def __init__(self, model, config, *, adapter_name: str = "sdlab", scale: float = 1.0):
        self.pipe = None if isinstance(model, torch.nn.Module) else model
        self.unet, self.adapter_name, self._closed = getattr(model, "unet", model), adapter_name, False
        _refuse_taken(adapter_name, [self.unet])
        self._state = _PeftState(self.unet)
        try:
            self.unet.add_adapter(config, adapter_name=adapter_name)
            _refuse_hooked(self.unet)
            self.parameters = {
                n: p for n, p in self.unet.named_parameters() if "lora_" in n and f".{adapter_name}." in n
            }
            self.scale = scale
        except BaseException:
            self.close()  # whatever got added (peft may fail half way) is removed again
            raise

    def _set_scale(self, value: float) -> None:
        self.unet.set_adapters([self.adapter_name], [value])

    def close(self) -> None:
        """Remove the adapter (idempotent); leaving the block calls this."""
        self._restore([self._state], lambda: self.unet.delete_adapters(self.adapter_name), self.unet.unload_lora)

    def save(self, folder, *, weight_name: str | None = None) -> None:
        """Save as diffusers' training scripts do, so that plain `pipe.load_lora_weights(folder)` loads it."""
        from diffusers.loaders import StableDiffusionLoraLoaderMixin
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet, adapter_name=self.adapter_name))
        saver = type(self.pipe) if hasattr(self.pipe, "save_lora_weights") else StableDiffusionLoraLoaderMixin
        config, extra = self.unet.peft_config[self.adapter_name], {}
        if "unet_lora_adapter_metadata" in inspect.signature(saver.save_lora_weights).parameters:
            extra["unet_lora_adapter_metadata"] = config.to_dict()  # lora_alpha, rank patterns travel with the file
        elif config.lora_alpha != config.r or config.use_rslora or config.rank_pattern or config.alpha_pattern:
            raise NotImplementedError(
                "this diffusers cannot store lora_alpha in a LoRA file, so loading would use "
                "alpha = r: use LoraConfig(lora_alpha=r) or a diffusers with LoRA metadata"
            )
        saver.save_lora_weights(
            folder, unet_lora_layers=layers, weight_name=weight_name, safe_serialization=True, **extra
        )


class LoraWeights(_LoraContext):
    """A saved LoRA loaded with diffusers' `pipe.load_lora_weights` at `scale`, unloaded on leaving the block."""

    def __init__(self, pipe, source, *, scale: float = 1.0, adapter_name: str = "sdlab_lora", **load_kwargs):
        self.pipe, self.adapter_name, self._closed = pipe, adapter_name, False
        _refuse_taken(adapter_name, _roots(pipe).values())
        self._states = [_PeftState(m) for m in _roots(pipe).values()]
        try:
            pipe.load_lora_weights(source, adapter_name=adapter_name, **load_kwargs)
            _refuse_hooked(pipe.unet)
            self.scale = scale
        except BaseException:
            self.close()  # a half-loaded LoRA is undone too
            raise

    def _set_scale(self, value: float) -> None:
        self.pipe.set_adapters([self.adapter_name], adapter_weights=[value])

    def close(self) -> None:
        """Unload the LoRA (idempotent); leaving the block calls this."""
        self._restore(
            self._states, lambda: self.pipe.delete_adapters([self.adapter_name]), self.pipe.unload_lora_weights
        )
