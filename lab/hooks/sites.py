"""Sites: the named places of a UNet (attention modules, blocks, the UNet call) and the tensors each has."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention

ATTENTION_WHATS = ("q", "k", "v", "probs", "output")
BLOCK_WHATS = ("output",)
UNET_WHATS = ("input", "output")
WHATS_OF_KIND = {"self": ATTENTION_WHATS, "cross": ATTENTION_WHATS, "block": BLOCK_WHATS, "unet": UNET_WHATS}
_WHAT_ALIASES = {"query": "q", "key": "k", "value": "v", "out": "output", "features": "output"}


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


def unet_of(model) -> torch.nn.Module:
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
    unet_module = unet_of(model)
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


def canonical_what(what: str) -> str:
    what = _WHAT_ALIASES.get(what, what)
    if what not in ATTENTION_WHATS + UNET_WHATS:
        raise ValueError(
            f"unknown tensor {what!r}: choose one of {ATTENTION_WHATS} (block sites: 'output'; "
            f"the 'unet' site: {UNET_WHATS})"
        )
    return what
