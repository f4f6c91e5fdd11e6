"""Look inside a Stable Diffusion UNet and edit what it does, one `with` block at a time.

    import lab
    pipe = lab.testing.tiny_sd1_pipeline()            # or any diffusers SD / SDXL pipeline
    with lab.trace(pipe) as tr:
        maps = tr.capture("cross", "probs", reduce=lab.Mean(over=("steps", "heads")))
        tr.edit("up_blocks.1.attentions.*.attn2", "probs", lambda p, ctx: p * 2, steps=range(5, 10))
        image = pipe("a red circle", num_inference_steps=10).images[0]
    maps.result()     # {site name: float32 tensor (batch, queries, keys)}

Vocabulary
    site     A place in the UNet, named by its diffusers module path. Attention sites are the
             `Attention` modules ("up_blocks.1.attentions.0.transformer_blocks.0.attn2"), of kind
             "self" or "cross"; block sites are "down_blocks.N", "mid_block" and "up_blocks.N"; merge
             sites are the decoder resnets ("up_blocks.1.resnets.0"), whose input joins the backbone
             and a skip connection, torch.cat([backbone, skip], dim=1).
    what     The tensor read or edited at a site. Attention sites: "q", "k", "v" shaped
             (batch, heads, tokens, head_dim); "probs" shaped (batch, heads, queries, keys);
             "output" shaped (batch, queries, channels). Block sites: "output" (batch, channels, h, w).
             Merge sites: "backbone" and "skip", (batch, channels, h, w) each. Merge sites are picked
             by name, kind("merge"), the shorthand word "merge" or a glob/regex naming "resnets", so
             selectors that never mention them ("up", "*") pick what they always picked.
             The "unet" site is the UNet call itself, the denoising step: "input" is the latent x_t it
             is given (after the scheduler's scale_model_input) and "output" its prediction (noise,
             v or sample), both (batch, channels, h, w). Only its exact name "unet" selects it: globs,
             regexes, predicates and shorthands never do, and lab.sites(pipe) lists it only with unet=True.
    ctx      A `StepContext` passed to every callback: denoising step, timestep, which rows of the
             batch are unconditional / conditional under classifier-free guidance, the site.

How it works
    Entering a trace adds one forward pre-hook on the UNet that reads the timestep and latent of each
    call (step bookkeeping). Registering a capture or an edit installs, at the selected sites only:
      - "q", "k", "v": a forward hook on `attn.to_q` / `to_k` / `to_v` (the processor is kept, so
        fused SDPA, attention slicing or xformers keep running);
      - "output": a forward hook on the `Attention` module or on the block;
      - "unet" site: a forward pre-hook ("input") or a forward hook ("output") on the UNet;
      - merge sites: one forward pre-hook on the resnet for both tensors, which splits its input
        by channels and concatenates it again only when an edit changed a part;
      - "probs": `ExplicitAttnProcessor`, which computes the attention probabilities explicitly
        with the standard math so they can be read and edited. This is the only case that replaces
        a processor, and only at the sites that asked for probabilities.
    Leaving the trace (normally, on an exception or on KeyboardInterrupt) removes every torch hook
    and puts back the very processor objects that were there before. Sites nobody hooked are
    never touched. No diffusers class is patched.

Order of hooks at one site and tensor: all edits in registration order, then all captures (which
therefore see the edited tensor).

Techniques (lab.freeu, lab.pag, ...) register their hooks on `shared_trace(pipe)`: the trace already
active on the UNet, or one of their own, so they stack with each other and with the user's captures.
Their extra UNet calls (SAG's degraded pass, Attend-and-Excite's gradient passes) are side passes (Trace.side_pass,
Trace.call_unet); rows a technique adds to the pipeline's own calls (PAG's "perturbed") come from Trace.extra_rows: StepContext.pass_name names them, edits run in every pass and captures only in
the pipeline's own ("main") calls unless registered with passes=.

Batch rows beyond the two CFG halves: captures and edits pick rows by name (`rows="cond"`, "uncond",
"perturbed" in diffusers' PAG pipelines, or images a technique names with `tr.name_rows(source=0,
target=1)`); see lab.hooks.context.

The package, one idea a file:
    sites.py      Site, sites(): the names of every place in a UNet and the tensors each has
    selectors.py  Selector: which sites, parsed once and composable (`parse("up") & kind("cross")`)
    context.py    StepContext and named batch rows
    reducers.py   Mean, Sum, Stack, TopK: what a capture stores
    edits.py      Edit, Capture, scale_tokens
    processor.py  ExplicitAttnProcessor: attention probabilities made explicit
    memory.py     MemoryEstimate, CaptureTooLarge: the guard before a capture
    trace.py      Trace: installs and removes everything; active_hooks, remove_all_hooks
"""

from lab.hooks.context import CFG_PARTS, Rows, StepContext
from lab.hooks.edits import Capture, Edit, scale_tokens
from lab.hooks.memory import CaptureTooLarge, MemoryEstimate
from lab.hooks.processor import STANDARD_PROCESSORS, ExplicitAttnProcessor
from lab.hooks.reducers import Mean, Reducer, Stack, Sum, TopK
from lab.hooks.selectors import SELECTOR_HELP, SHORTHAND_WORDS, Selector, is_shorthand, kind, select_sites
from lab.hooks.sites import ATTENTION_WHATS, BLOCK_WHATS, UNET_WHATS, Site, sites
from lab.hooks.trace import (
    _ACTIVE_TRACES,  # noqa: F401  (tests simulate a lost registry)
    DEFAULT_MEMORY_LIMIT,
    GUIDANCE_MODES,
    Trace,
    active_hooks,
    remove_all_hooks,
    shared_trace,
    trace,
)

__all__ = [
    "Site",
    "StepContext",
    "Rows",
    "Selector",
    "Trace",
    "Capture",
    "Edit",
    "Reducer",
    "Mean",
    "Sum",
    "Stack",
    "TopK",
    "MemoryEstimate",
    "CaptureTooLarge",
    "ExplicitAttnProcessor",
    "STANDARD_PROCESSORS",
    "trace",
    "shared_trace",
    "sites",
    "select_sites",
    "kind",
    "is_shorthand",
    "active_hooks",
    "remove_all_hooks",
    "scale_tokens",
    "ATTENTION_WHATS",
    "BLOCK_WHATS",
    "UNET_WHATS",
    "CFG_PARTS",
    "GUIDANCE_MODES",
    "DEFAULT_MEMORY_LIMIT",
    "SELECTOR_HELP",
    "SHORTHAND_WORDS",
]
