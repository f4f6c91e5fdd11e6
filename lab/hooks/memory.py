"""Memory estimates: what captures would store, checked before a generation captures anything."""

from __future__ import annotations

from dataclasses import dataclass

from lab.hooks.edits import Capture
from lab.hooks.reducers import Stack
from lab.hooks.sites import Site


class CaptureTooLarge(RuntimeError):
    """Raised before the first UNet call of a generation when captures would exceed the memory limit."""


@dataclass
class MemoryEstimate:
    """Bytes the captures of a trace would store for one generation (float32)."""

    total_bytes: int
    per_capture: list[tuple[str, int]]
    limit: int | None

    def __str__(self):
        lines = [f"{human_bytes(nbytes):>10}  {description}" for description, nbytes in self.per_capture]
        limit = f" (limit {human_bytes(self.limit)})" if self.limit is not None else ""
        return "\n".join(lines + [f"{human_bytes(self.total_bytes):>10}  total{limit}"])


def human_bytes(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def hook_shape(site: Site, what: str, batch: int, latent_size, tokens: int) -> tuple[int, ...]:
    """Shape of the tensor a hook sees at `site` for `batch` rows (static: from the module's sizes)."""
    height, width = site.spatial_size(latent_size)
    queries = height * width
    if site.kind == "unet":
        return (
            batch,
            site.module.config.in_channels if what == "input" else site.module.config.out_channels,
            height,
            width,
        )
    if site.kind == "merge":  # the resnet's input torch.cat([backbone, skip]), split at backbone_channels
        skip_channels = site.module.in_channels - site.backbone_channels
        return (batch, site.backbone_channels if what == "backbone" else skip_channels, height, width)
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


def narrowing_advice(capture: Capture) -> str:
    reduce = capture.reduce
    tips = []
    if len(capture.sites) > 1:
        tips.append("select fewer sites (one block like 'up_blocks.1', or one resolution like 'cross 16x16')")
    if not reduce.downsample:
        tips.append(f"downsample the maps: reduce=lab.{type(reduce).__name__}(..., downsample=4)")
    if not capture.rows.names & {"cond", "uncond"}:
        tips.append("keep one guidance half: rows='cond' (cfg='cond')")
    if capture.what in ("q", "k", "v", "probs") and "heads" not in reduce.over:
        tips.append("average over heads: over=(..., 'heads')")
    if "batch" not in reduce.over:
        tips.append("average over the batch: over=(..., 'batch')")
    if isinstance(reduce, Stack):
        tips.append("drop per-step storage: lab.Mean(over=('steps', ...)) instead of lab.Stack")
    return "; ".join(tips)
