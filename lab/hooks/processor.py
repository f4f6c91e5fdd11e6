"""The attention processor that makes attention probabilities explicit, and which processors hooks can trust."""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.models import attention_processor as _attention_processor
from diffusers.models.attention_processor import Attention

from lab.hooks.sites import Site

# Processors that compute plain attention from attn.to_q / to_k / to_v and nothing else. Only at
# sites using one of these can hooks be faithful: q/k/v hooks need the processor to call to_q etc.,
# and "probs" swaps in ExplicitAttnProcessor, which must compute the same thing. A processor that
# adds keys and values (IP-Adapter) or fuses projections is refused. Append your own processor class
# here if it is plain attention.
STANDARD_PROCESSORS: list[type] = [
    getattr(_attention_processor, name)
    for name in (
        "AttnProcessor",
        "AttnProcessor2_0",
        "XFormersAttnProcessor",
        "SlicedAttnProcessor",
        "AttnProcessorNPU",
    )
    if hasattr(_attention_processor, name)
]


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

    def __call__(
        self,
        attn: Attention,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)

        batch_size, key_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
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


def unsupported_reason(site: Site, what: str, trace) -> str | None:
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
