"""Heat maps at image size: the reusable picture of "where" that attribution, LocalBlend masks and
attention-guidance maps all produce, with the DAAM paper's normalisation, mask and overlays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["DAAM_THRESHOLD", "HeatMap", "plot_grid", "upsample_and_add"]

DAAM_THRESHOLD = 0.4  # tau of DAAM (Tang et al. 2023), section 3: the default mask threshold


@dataclass
class HeatMap:
    """One attribution map at image size, with what it was computed from.

    values   float32 (height, width), >= 0. DAAM / open-vocabulary: mean attention paid to the word.
             Self-attention: the share of the query pixel's attention landing on each pixel (sums to 1).
    image    the generated image, uint8 (height, width, 3), or None (then overlays show the map alone).
    """

    values: np.ndarray
    word: str
    kind: str  # "daam", "open-vocabulary" or "self-attention"
    prompt: str
    image: np.ndarray | None = None
    steps: tuple[int, ...] = ()
    sites: tuple[str, ...] = ()
    heads: tuple[int, ...] | None = None  # None: all heads

    def __repr__(self):
        height, width = self.values.shape
        heads = "all heads" if self.heads is None else f"heads {list(self.heads)}"
        return (
            f"<HeatMap {self.kind} {self.word!r} {width}x{height}: {len(self.steps)} steps, "
            f"{len(self.sites)} layers, {heads}>"
        )

    def normalized(self) -> np.ndarray:
        """Min-max normalised to [0, 1], as DAAM's reference code does before thresholding (a weak,
        diffuse map still spans [0, 1]); all zeros if the map is constant."""
        low, high = float(self.values.min()), float(self.values.max())
        return (self.values - low) / (high - low) if high > low else np.zeros_like(self.values)

    def mask(self, threshold: float = DAAM_THRESHOLD) -> np.ndarray:
        """The paper's segmentation: normalized() > threshold (bool, height x width)."""
        return self.normalized() > threshold

    def peak(self) -> tuple[int, int]:
        """(x, y) of the largest value."""
        y, x = np.unravel_index(int(np.argmax(self.values)), self.values.shape)
        return int(x), int(y)

    def overlay(self, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
        """The normalised map through a matplotlib colormap, blended over the image (alpha = map's weight)."""
        import matplotlib

        colours = matplotlib.colormaps[cmap](self.normalized())[..., :3] * 255.0
        if self.image is None:
            return Image.fromarray(colours.round().astype(np.uint8))
        blended = (1 - alpha) * self.image.astype(np.float32) + alpha * colours
        return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))

    def plot(self, ax=None, alpha: float = 0.5, cmap: str = "jet", title: str | None = None):
        """Draw the image with the map on top on a matplotlib axis (a new figure if ax is None)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(3, 3))
        if self.image is not None:
            ax.imshow(self.image)
        ax.imshow(self.normalized(), cmap=cmap, alpha=alpha if self.image is not None else 1.0, vmin=0, vmax=1)
        ax.set_title(self.word if title is None else title)
        ax.axis("off")
        return ax


def plot_grid(
    heat_maps: Iterable[HeatMap],
    ncols: int = 4,
    alpha: float = 0.5,
    cmap: str = "jet",
    size: float = 2.5,
    with_image: bool = True,
):
    """Several heat maps side by side (e.g. one per word), the generated image first. Returns the figure."""
    import matplotlib.pyplot as plt

    heat_maps = list(heat_maps)
    if not heat_maps:
        raise ValueError("plot_grid needs at least one heat map")
    show_image = with_image and heat_maps[0].image is not None
    panels = len(heat_maps) + int(show_image)
    ncols = max(1, min(ncols, panels))
    nrows = (panels + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    axes = list(axes.flat)
    if show_image:
        axes[0].imshow(heat_maps[0].image)
        axes[0].set_title("image")
        axes[0].axis("off")
    for ax, heat_map in zip(axes[int(show_image) :], heat_maps):
        heat_map.plot(ax, alpha=alpha, cmap=cmap)
    for ax in axes[panels:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def upsample_and_add(low_resolution: dict[str, torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
    """Sum of the maps, each upsampled bicubically to the image size (the paper's F-up).

    Interpolation is linear, so the maps of one grid size are added first and upsampled once.
    """
    by_grid: dict[tuple[int, int], torch.Tensor] = {}
    for grid_map in low_resolution.values():
        size = tuple(grid_map.shape)
        by_grid[size] = by_grid[size] + grid_map if size in by_grid else grid_map.clone()
    total = torch.zeros(image_size, dtype=torch.float32)
    for grid_map in by_grid.values():
        total += F.interpolate(
            grid_map[None, None].float(), size=tuple(image_size), mode="bicubic", align_corners=False
        )[0, 0]
    return total
