"""Sites: the named places of a UNet (attention modules, blocks, decoder merges, the UNet call) and their tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention

ATTENTION_WHATS = ("q", "k", "v", "probs", "output")
BLOCK_WHATS = ("output",)
UNET_WHATS = ("input", "output")
MERGE_WHATS = ("backbone", "skip")
WHATS_OF_KIND = {
    "self": ATTENTION_WHATS,
    "cross": ATTENTION_WHATS,
    "block": BLOCK_WHATS,
    "merge": MERGE_WHATS,
    "unet": UNET_WHATS,
}
_WHAT_ALIASES = {"query": "q", "key": "k", "value": "v", "out": "output", "features": "output"}


@dataclass(frozen=True)
class Site:
    """One hookable place in the UNet.

    level: how many times the latent was downsampled before this site. The queries of an attention
    site (or the output of a block site) are the latent size halved `level` times, rounding up
    as the UNet's stride-2 convolutions do: a 64x96 latent at level 2 gives 16x24.

    A "merge" site is a decoder resnet (`up_blocks.1.resnets.0`), where a skip connection joins the
    backbone: the resnet's input is torch.cat([backbone, skip], dim=1), and `backbone_channels` says
    where the two parts meet.
    """

    name: str
    kind: str  # "self", "cross", "block", "merge" or "unet"
    place: str  # "down", "mid", "up"; "unet" for the unet site
    level: int
    module: torch.nn.Module = field(compare=False, repr=False)
    backbone_channels: int | None = field(default=None, compare=False, repr=False)  # merge sites only

    @property
    def is_attention(self) -> bool:
        return self.kind in ("self", "cross")

    def spatial_size(self, latent_size: tuple[int, int]) -> tuple[int, int]:
        height, width = latent_size
        for _ in range(self.level):
            height, width = (height + 1) // 2, (width + 1) // 2
        return height, width


def unet_of(model) -> torch.nn.Module:
    unet = getattr(model, "unet", model)
    if not (hasattr(unet, "down_blocks") and hasattr(unet, "up_blocks")):
        raise TypeError(
            f"expected a diffusers Stable Diffusion pipeline (with .unet) or a UNet2DConditionModel, "
            f"got {type(model).__name__}"
        )
    return unet


def sites(model, *, unet: bool = False) -> list[Site]:
    """Every attention module, every decoder merge and every block of the UNet, in execution order.

    `model` is a pipeline or a UNet. Inside each block the attention and merge sites come first, in
    the order they run (in an up block: resnets.0's merge, attentions.0's attention, resnets.1's
    merge, ...), then the block site itself (whose output is what the block returns). unet=True puts
    the "unet" site (the UNet call) first.
    """
    unet_module = unet_of(model)
    blocks = [("down", f"down_blocks.{i}", block) for i, block in enumerate(unet_module.down_blocks)]
    if getattr(unet_module, "mid_block", None) is not None:
        blocks.append(("mid", "mid_block", unet_module.mid_block))
    blocks += [("up", f"up_blocks.{i}", block) for i, block in enumerate(unet_module.up_blocks)]
    backbone_channels = _merge_channels(unet_module)

    found = [Site("unet", "unet", "unet", 0, unet_module)] if unet else []
    level = 0
    for place, block_name, block in blocks:
        inner = []  # (run order, site): attention modules (and merges in up blocks) in the order they run
        for sub_name, module in block.named_modules():
            if isinstance(module, Attention):
                kind = "cross" if module.is_cross_attention else "self"
                inner.append((_run_order(sub_name), Site(f"{block_name}.{sub_name}", kind, place, level, module)))
        if place == "up":
            for i, resnet in enumerate(block.resnets):
                name = f"{block_name}.resnets.{i}"
                if name in backbone_channels:
                    inner.append(((i, 0), Site(name, "merge", place, level, resnet, backbone_channels[name])))
            inner.sort(key=lambda pair: pair[0])  # stable: attention modules keep their relative order
        found += [site for _, site in inner]
        # A down block ends with its downsampler and an up block with its upsampler, so the
        # block's output is one level away from its attention layers.
        if place == "down" and getattr(block, "downsamplers", None):
            level += 1
        if place == "up" and getattr(block, "upsamplers", None):
            level -= 1
        found.append(Site(block_name, "block", place, level, block))
    return found


def _run_order(sub_name: str) -> tuple[float, int]:
    """Sort key of an attention module inside an up block: attentions.i runs right after resnets.i (key (i, 0))."""
    parts = sub_name.split(".")
    return (int(parts[1]), 1) if parts[0] == "attentions" and parts[1:2] and parts[1].isdigit() else (float("inf"), 1)


def _merge_channels(unet) -> dict[str, int]:
    """{"up_blocks.N.resnets.i": backbone channels} for every decoder resnet fed torch.cat([backbone, skip]).

    The skips are what the encoder stacked (conv_in's output, every down resnet's, every downsampler's),
    popped last first; the backbone is the mid block's output, the previous up block's or the previous
    resnet's. A resnet whose input is not backbone + skip channels (an architecture this bookkeeping does
    not know) gets no merge site, and neither do the resnets after it in that block.
    """
    skips = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        skips += [resnet.out_channels for resnet in block.resnets]
        skips += [sampler.out_channels for sampler in getattr(block, "downsamplers", None) or ()]
    mid = getattr(unet, "mid_block", None)
    backbone = mid.resnets[-1].out_channels if mid is not None else skips[-1]
    found = {}
    for n, block in enumerate(unet.up_blocks):
        known = True
        for i, resnet in enumerate(block.resnets):
            skip = skips.pop() if skips else None
            if known and skip is not None and resnet.in_channels == backbone + skip:
                found[f"up_blocks.{n}.resnets.{i}"] = backbone
            else:
                known = False
            backbone = resnet.out_channels
        for sampler in getattr(block, "upsamplers", None) or ():
            backbone = sampler.out_channels
    return found


def canonical_what(what: str) -> str:
    what = _WHAT_ALIASES.get(what, what)
    if what not in ATTENTION_WHATS + UNET_WHATS + MERGE_WHATS:
        raise ValueError(
            f"unknown tensor {what!r}: choose one of {ATTENTION_WHATS} (block sites: 'output'; merge "
            f"sites: {MERGE_WHATS}; the 'unet' site: {UNET_WHATS})"
        )
    return what
