"""Reducers: how a capture turns one tensor per UNet call into what it stores (Mean, Sum, Stack, TopK)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from lab.hooks.sites import Site


@dataclass(frozen=True)
class TensorLayout:
    """Where the heads and the spatial positions are in a hooked tensor."""

    heads_dim: int | None  # 1 for q, k, v, probs; None otherwise
    token_dims: tuple[int, ...]  # axes of length h*w holding flattened spatial positions
    grid: bool  # True for (batch, channels, h, w) tensors
    size: tuple[int, int]


def tensor_layout(site: Site, what: str, size: tuple[int, int], ndim: int = 3) -> TensorLayout:
    spatial_keys = site.kind == "self"
    if what == "probs":
        return TensorLayout(1, (2, 3) if spatial_keys else (2,), False, size)
    if what == "q":
        return TensorLayout(1, (2,), False, size)
    if what in ("k", "v"):
        return TensorLayout(1, (2,) if spatial_keys else (), False, size)
    if site.is_attention and ndim == 3:
        return TensorLayout(None, (1,), False, size)
    return TensorLayout(None, (), True, size)  # block, merge or unet tensors, or attention output on a 4-D input


def downsampled_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
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

    def prepare(self, x: torch.Tensor, layout: TensorLayout) -> torch.Tensor:
        """Per call: float32, heads averaged, spatially pooled. Batch and steps are left to update()."""
        if "heads" in self.over:
            # Averaging in float32 directly avoids a float32 copy of every head (half-precision models).
            x = x.mean(dim=layout.heads_dim, keepdim=True, dtype=torch.float32)
        else:
            x = x.float()
        if self.downsample and self.downsample > 1:
            new_size = downsampled_size(layout.size, self.downsample)
            if layout.grid:
                x = F.adaptive_avg_pool2d(x, new_size)
            for dim in layout.token_dims:
                moved = x.movedim(dim, -1)
                pooled = F.adaptive_avg_pool2d(moved.reshape(-1, *layout.size), new_size)
                x = pooled.reshape(*moved.shape[:-1], new_size[0] * new_size[1]).movedim(-1, dim)
        if "heads" in self.over:
            x = x.squeeze(layout.heads_dim)
        return x

    def prepared_shape(self, shape: tuple[int, ...], layout: TensorLayout) -> tuple[int, ...]:
        """The shape prepare() gives for an input of `shape`, without running it."""
        shape = list(shape)
        if self.downsample and self.downsample > 1:
            height, width = downsampled_size(layout.size, self.downsample)
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
