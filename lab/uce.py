"""UCE: Unified Concept Editing in Diffusion Models (Gandikota, Orgad, Belinkov, Materzyńska, Bau; WACV 2024).

Erase concepts from a text-to-image UNet in closed form, with no training: every cross-attention key and
value projection W (`to_k`, `to_v` of every cross-attention layer of the UNet, SD 1.x / 2.x / XL) is
rewritten so that the concepts to erase, c_i, now give what a guide concept gives, v*_i = W_old c_guide(i),
while the concepts to preserve, c_j, keep their old outputs, and W stays close to W_old:

    min_W  Σ_erase ‖W c_i − v*_i‖²  +  Σ_preserve ‖W c_j − W_old c_j‖²  +  λ ‖W − W_old‖²_F

    W_new = (λ W_old + Σ_erase v*_i c_iᵀ + Σ_preserve W_old c_j c_jᵀ) (λ I + Σ_erase c_i c_iᵀ + Σ_preserve c_j c_jᵀ)⁻¹

(the paper's eq. 7; erase and preserve terms weighted by erase_scale and preserve_scale). The preserve
terms appear on both sides and cancel from the change, which leaves a rank ≤ #erase update with one
d × d matrix shared by every layer (d: the text embedding width):

    W_new = W_old + (V* − W_old C_E) K,    K = s_E C_Eᵀ (λ I + s_E C_E C_Eᵀ + s_P C_P C_Pᵀ)⁻¹

with C_E, C_P the erase / preserve embeddings as columns and V* = W_old C_guide. `erase` solves for K
once (float64) and applies it layer by layer; tests check it against the paper's formula solved directly.

    with lab.uce.erase(pipe, ["star"], preserve=["circle", "square"]) as edit:
        image = pipe("a red star").images[0]     # "star" now gives, in every to_k / to_v, what "" gives
        edit.save("no_star.safetensors")         # only the changed to_k / to_v weights, as safetensors
    # every weight is back, bit for bit (also after an exception in the block)

    with lab.weights.load("no_star.safetensors").apply(pipe):
        ...                                      # the same edit, undone again on exit
    lab.uce.erase(pipe, ["star"], persistent=True)   # or edit.keep() inside the block: the change stays

What c is. The reference (rohitgandikota/unified-concept-editing, trainscripts/uce_sd_erase.py) encodes
each concept on its own with the pipeline's encode_prompt (no guidance) and takes one row of it, the one
at `attention_mask.sum() - 2`: the last content token, which in CLIP's causal text encoder has read the
whole concept ("van gogh" → "gogh</w>", "hexagon" → "agon</w>"). For the empty prompt "" that index is 0,
the start-of-text token, so the default "erase towards nothing" maps the concept onto the start token's
output. Done the same here, through lab.diffusion.encode_prompt, so c is exactly the row the UNet's
cross-attention reads: for SDXL the concatenation of both text encoders' penultimate layers. A concept of
several tokens is accepted (multi-word names are UCE's main use) and its last token is used;
`edit.tokens` shows, per concept, the position and token taken. Only that position is edited: the same
word in a longer prompt has a different embedding (it has read other words), which the edit reaches only
as far as the two are alike.

Defaults, as in the paper and the current reference: λ = 0.5, erase_scale = 1, preserve_scale = 1, guide ""
for every erased concept. The reference's older train-scripts/train_erase.py also always preserved "" (all
77 of its tokens) and used preserve_scale = max(0.1, 1 / (1 + len(preserve))), and took the erased
concept's last token together with every token after it (end and padding tokens). Not done here; pass
preserve_scale to reproduce the old weighting.

On the embedded TinyWorld model (8 seeds, 20 steps, CFG 5; lab.tinyworld.judge), "a red star" shows a star in
7 of 8 images before; after erasing "star" alone 6, with preserve=["circle", "square"] 3, with the five other
shapes preserved 1 (mostly triangles instead); "a blue circle" keeps its circle in 8 of 8 each time. Preserving
helps the erasure itself. The concept alone sits at position 1, and there it shares much with any word at
position 1: erasing "star" alone moves the value of "a" in "a red star" (position 1) 64 % of the way to the
guide's, and "star</w>" (position 3) only 30 %; with the five other shapes preserved, 7 % and 59 % (layer
down_blocks.0's to_v). The end and padding tokens, which have read the whole prompt, do not move.

Debiasing (the paper's edit that moderates an attribute's proportion, e.g. gender across professions) is
lab.uce_debias: for fixed attribute weights α it is this same closed form (`rewrite`) with guide vectors
c_i + Σ_a α_ia c_a; the paper finds α by a generate-and-classify loop around it.

Input is checked before anything changes: concepts must be non-empty strings (the guide may be ""),
without duplicates or overlap between erase and preserve, within the text encoder's 75 content tokens;
preserve=[] is refused (pass None for no preservation: an empty list is more often a filter that removed
everything than a choice); λ, erase_scale and preserve_scale must be finite and > 0.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass

import torch

from lab import diffusion
from lab.hooks.sites import sites
from lab.weights import WeightEdit

__all__ = ["erase", "Erasure", "Token", "concept_embeddings", "layer_names", "rewrite"]


def erase(
    pipe,
    concepts,
    preserve=None,
    guide=None,
    lam: float = 0.5,
    *,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    persistent: bool = False,
    offload: bool = False,
) -> "Erasure":
    """Erase `concepts` (a string or a list of them) from every cross-attention to_k / to_v of pipe's UNet.

    preserve   concepts whose outputs to keep (a list of strings), or None
    guide      what each erased concept should give instead: None → "" (nothing), a string for all of
               them, or a list with one guide per erased concept
    lam        λ, how strongly W stays near W_old on everything else
    persistent keep the change when the block ends (same as edit.keep()); offload: snapshot on the CPU

    Returns the edit, already applied: a lab.weights.WeightEdit (use it in `with`; save, keep, restore,
    changed, delta) that also says what was done (concepts, guides, preserve, tokens, seconds).
    """
    started = time.perf_counter()
    concepts, guides, preserve = _checked(concepts, preserve, guide)
    lam = _positive("lam", lam)
    erase_scale = _positive("erase_scale", erase_scale)
    preserve_scale = _positive("preserve_scale", preserve_scale)
    names = layer_names(pipe)

    embeddings, tokens = concept_embeddings(pipe, list(dict.fromkeys(concepts + guides + preserve)))
    C_E = torch.stack([embeddings[c] for c in concepts], dim=1)  # (d, n_erase), float64
    C_G = torch.stack([embeddings[g] for g in guides], dim=1)
    C_P = torch.stack([embeddings[c] for c in preserve], dim=1) if preserve else C_E[:, :0]

    edit = Erasure(pipe, names, persistent=persistent, offload=offload)
    try:
        rewrite(edit.parameters, C_E, C_G, C_P, lam, erase_scale, preserve_scale)
    except BaseException:
        edit.restore()
        raise
    edit.concepts, edit.guides, edit.preserve, edit.tokens = concepts, guides, preserve, tokens
    edit.lam, edit.erase_scale, edit.preserve_scale = lam, erase_scale, preserve_scale
    edit.seconds = time.perf_counter() - started
    return edit


def rewrite(weights: dict, C_E, C_G, C_P, lam: float, erase_scale: float, preserve_scale: float, originals=None):
    """Write the closed form into `weights` ({name: to_k / to_v weight}), in place, from `originals` (W_old;
    default the weights as they are). C_E, C_G, C_P: erase, guide and preserve embeddings as columns (d, n).
    A guide column may be any vector: debiasing (lab.uce_debias) passes c_i + Σ_a α_a c_a."""
    d = C_E.shape[0]
    M = lam * torch.eye(d, dtype=C_E.dtype) + erase_scale * C_E @ C_E.T + preserve_scale * C_P @ C_P.T
    K = erase_scale * torch.linalg.solve(M, C_E).T  # (n_erase, d): s_E C_Eᵀ M⁻¹, M symmetric
    with torch.no_grad():
        for name, W in weights.items():
            work = _work_dtype(W.device)
            W_old = (W if originals is None else originals[name]).detach().to(W.device, work)
            V_star = W_old @ C_G.to(W.device, work)  # the guides' old outputs, (out, n_erase)
            W_new = W_old + (V_star - W_old @ C_E.to(W.device, work)) @ K.to(W.device, work)
            W.copy_(W_new.to(W.dtype))


class Erasure(WeightEdit):
    """A UCE edit: the WeightEdit over every cross-attention to_k / to_v weight, plus what was done.

    concepts, guides (one per concept), preserve, lam, erase_scale, preserve_scale: the settings;
    tokens: {concept: Token} for every concept, guide and preserved concept, the position of the
    encoded prompt used as its embedding and that token; seconds: how long the edit took."""

    concepts: list[str]
    guides: list[str]
    preserve: list[str]
    tokens: dict[str, "Token"]
    lam: float
    erase_scale: float
    preserve_scale: float
    seconds: float

    def __repr__(self) -> str:
        state = "closed" if self._saved is None else "open"
        guides = "" if set(self.guides) == {""} else f" towards {self.guides}"
        return (
            f"Erasure({self.concepts}{guides}, preserve={self.preserve}, lam={self.lam}, "
            f"{len(self.parameters)} weights, {state})"
        )


@dataclass(frozen=True)
class Token:
    """The row of a concept's encoded prompt that UCE uses: its position and the token there."""

    index: int
    token: str


def layer_names(pipe) -> list[str]:
    """The weights UCE rewrites: "unet.<site>.to_k.weight" and "to_v" for every cross-attention site."""
    cross = [site for site in sites(pipe) if site.kind == "cross"]
    if not cross:
        raise ValueError("this pipeline's UNet has no cross-attention layers: UCE edits their to_k / to_v")
    names = []
    for site in cross:
        for projection in ("to_k", "to_v"):
            layer = getattr(site.module, projection)
            if not isinstance(layer, torch.nn.Linear):
                raise ValueError(
                    f"{site.name}.{projection} is a {type(layer).__name__}, not a Linear layer (a LoRA adapter "
                    "loaded?): fuse or unload it before a UCE edit"
                )
            if layer.bias is not None:
                raise ValueError(f"{site.name}.{projection} has a bias; UCE's closed form is for W c without one")
            names.append(f"unet.{site.name}.{projection}.weight")
    return names


def concept_embeddings(pipe, concepts: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Token]]:
    """c for each concept (float64 on the CPU, the UNet's cross-attention width) and the Token it was read at.

    The concept alone is encoded by the pipeline's encode_prompt; c is its row at the last content token
    (the start token, position 0, for ""), as in the reference's `attention_mask.sum() - 2`."""
    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
    if not tokenizers:
        raise ValueError("this pipeline has no tokenizer: UCE encodes its concepts with the pipeline's text encoder")
    tokens = {}
    for concept in concepts:
        per_tokenizer = [tok(concept, truncation=False, verbose=False)["input_ids"] for tok in tokenizers]
        if any(ids != per_tokenizer[0] for ids in per_tokenizer):
            raise ValueError(f"the pipeline's tokenizers split {concept!r} differently: {per_tokenizer}")
        ids, tokenizer = per_tokenizer[0], tokenizers[0]
        index = len(ids) - 2  # start, content..., end: the last content token (0, the start token, for "")
        if len(ids) > tokenizer.model_max_length:
            raise ValueError(
                f"{concept[:40]!r}... is {index} tokens long; the text encoder keeps "
                f"{tokenizer.model_max_length - 2}: shorten it"
            )
        tokens[concept] = Token(index, tokenizer.convert_ids_to_tokens(ids[index]))
    encoded = diffusion.encode_prompt(pipe, concepts, guidance=False).cond  # (n, 77, d): what the UNet reads
    embeddings = {c: encoded[i, tokens[c].index].detach().to("cpu", torch.float64) for i, c in enumerate(concepts)}
    width = getattr(pipe.unet.config, "cross_attention_dim", None)
    if width is not None and encoded.shape[-1] != width:
        raise ValueError(
            f"the text embeddings are {encoded.shape[-1]} wide but the UNet's cross-attention reads {width}"
        )
    return embeddings, tokens


def _work_dtype(device: torch.device) -> torch.dtype:
    # float64 wherever torch has it; Apple's MPS has no float64, so there the layer products run in float32
    return torch.float32 if device.type == "mps" else torch.float64


def _checked(concepts, preserve, guide) -> tuple[list[str], list[str], list[str]]:
    """(concepts, guides, preserve) as lists of strings, or a ValueError / TypeError saying what is wrong."""
    if isinstance(concepts, str):
        concepts = [concepts]
    concepts = _strings("concepts", concepts)
    if not concepts:
        raise ValueError("concepts is empty: give at least one concept to erase")
    if preserve is None:
        preserve = []
    elif isinstance(preserve, str):
        raise TypeError(f"preserve must be a list of concepts, got the string {preserve!r}: write [{preserve!r}]")
    else:
        preserve = _strings("preserve", preserve)
        if not preserve:
            raise ValueError("preserve=[] preserves nothing: pass preserve=None for no preservation")
    for label, items in (("concepts", concepts), ("preserve", preserve)):
        empty = [c for c in items if not c.strip()]
        if empty:
            raise ValueError(
                f"{label} contains an empty concept {empty[0]!r}: its embedding would be the start-of-text token "
                'every prompt shares (only a guide may be "")'
            )
        twice = sorted({c for c in items if items.count(c) > 1})
        if twice:
            raise ValueError(f"{label} lists {twice} more than once")
    both = [c for c in concepts if c in preserve]
    if both:
        raise ValueError(f"{both} is both erased and preserved")

    if guide is None:
        guides = [""] * len(concepts)
    elif isinstance(guide, str):
        guides = [guide] * len(concepts)
    else:
        guides = _strings("guide", guide)
        if len(guides) != len(concepts):
            raise ValueError(
                f"guide has {len(guides)} concepts for {len(concepts)} to erase: give one guide per erased "
                'concept, one string for all, or None for ""'
            )
    return concepts, guides, preserve


def _strings(label: str, items) -> list[str]:
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"{label} must be a list of strings, got {type(items).__name__}") from None
    wrong = [item for item in items if not isinstance(item, str)]
    if wrong:
        raise TypeError(f"{label} must hold strings (concepts as text), got {wrong[0]!r} ({type(wrong[0]).__name__})")
    return items


def _positive(label: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{label} must be a finite number > 0, got {value!r}")
    return float(value)
