"""Open-vocabulary attention maps (Marcos-Manchon et al., "Open-Vocabulary Attention Maps with Token
Optimization for Semantic Segmentation in Diffusion Models", CVPR 2024; OVAM).

A map for a word that need not be in the generation prompt. The queries Q of every cross-attention layer
are stored at every step (lab.daam.trace(..., open_vocabulary=True)); afterwards an attribution prompt
holding the word is encoded with the pipeline's own text encoder(s), projected by each layer's `to_k`, and

    F_ovam[t, l, h] = softmax(Q[t, l, h] K_l[h]^T * scale_l)    (over the attribution tokens)

takes the place of F in the DAAM sum. With the generation prompt as attribution prompt this is exactly the
DAAM map. Token optimisation (the paper's section 3.2): fit the word's rows of the attribution prompt's text
embedding so the map's min-max normalisation matches a mask (binary cross-entropy); the OptimizedToken then
gives sharper maps of that concept on other images of the same pipeline.

These functions take an AttributionRun; its methods `open_vocab_map` and `optimize_token` call them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from lab.heatmap import HeatMap
from lab.tokens import token_indices

if TYPE_CHECKING:
    from lab.daam import AttributionRun  # noqa: F401  (annotations)

__all__ = ["OptimizedToken", "open_vocab_map", "optimize_token"]


@dataclass
class OptimizedToken:
    """A text embedding whose word rows were fitted to a mask by AttributionRun.optimize_token (OVAM).

    embedding  (77, dim) float32: the attribution prompt's text-encoder output with the word's rows optimised
    losses     the loss at every optimisation step
    Use it on any run traced with open_vocabulary=True by the same pipeline: run.open_vocab_map(token).
    """

    word: str
    attribution_prompt: str
    tokens: tuple[int, ...]
    embedding: torch.Tensor
    losses: list[float]

    def __repr__(self):
        last = f"{self.losses[-1]:.4f}" if self.losses else "n/a"
        return f"<OptimizedToken {self.word!r} in {self.attribution_prompt!r}: {len(self.losses)} steps, loss {last}>"

    def save(self, path: str | Path) -> Path:
        """One safetensors file; the word, prompt, token positions and losses go in its metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        metadata = {
            "format": "sdlab.daam.OptimizedToken",
            "word": self.word,
            "attribution_prompt": self.attribution_prompt,
            "tokens": json.dumps(list(self.tokens)),
            "losses": json.dumps(self.losses),
        }
        save_file({"embedding": self.embedding.contiguous()}, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "OptimizedToken":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != "sdlab.daam.OptimizedToken":
                raise ValueError(f"{path} is not an sdlab optimised token (saved by OptimizedToken.save)")
            embedding = f.get_tensor("embedding")
        return cls(
            word=metadata["word"],
            attribution_prompt=metadata["attribution_prompt"],
            tokens=tuple(json.loads(metadata["tokens"])),
            embedding=embedding,
            losses=json.loads(metadata["losses"]),
        )


def open_vocab_map(
    run,
    word: str | OptimizedToken,
    attribution_prompt: str | None = None,
    image: int = 0,
    steps=None,
    sites=None,
    heads=None,
    occurrence: int | None = None,
    pipe=None,
) -> HeatMap:
    """The OVAM map of `word`, which need not be in the generation prompt.

    word                a word, or an OptimizedToken from optimize_token (then attribution_prompt
                        and occurrence come from it)
    attribution_prompt  the text encoded for the keys; it must contain `word`. Default: the word alone.
    pipe                the pipeline that generated the run (for its text encoder and to_k layers);
                        default: the one that traced it (pass it after AttributionRun.load).
    steps, sites, heads, occurrence: as in heat_map.
    """
    pipe = ovam_pipe(run, pipe)
    image = run._image_index(image)
    if isinstance(word, OptimizedToken):
        token, embedding = word, word.embedding
        word, attribution_prompt, tokens = token.word, token.attribution_prompt, list(token.tokens)
        # Keyed by content, not id(): a new token may reuse a collected one's id.
        digest = hashlib.sha1(embedding.detach().float().cpu().numpy().tobytes()).hexdigest()
        key = ("ovam-optimized", image, attribution_prompt, tuple(tokens), digest)
    else:
        attribution_prompt = word if attribution_prompt is None else attribution_prompt
        tokens = token_indices(run._tokenizer(), attribution_prompt, word, occurrence)
        embedding = None
        key = ("ovam", image, attribution_prompt, tuple(tokens))
    if key not in run._word_maps:
        if embedding is None:
            embedding = text_embedding(run, pipe, attribution_prompt)
        with torch.no_grad():
            run._word_maps[key] = ovam_token_maps(run, pipe, image, embedding, tokens)
    values, chosen = run._sum_maps(run._word_maps[key], True, steps, sites, heads)
    return run._heat_map(values, word, "open-vocabulary", image, chosen, prompt=attribution_prompt)


def optimize_token(
    run,
    word: str,
    mask,
    attribution_prompt: str | None = None,
    image: int = 0,
    steps=None,
    sites=None,
    heads=None,
    occurrence: int | None = None,
    epochs: int = 100,
    lr: float = 0.05,
    pipe=None,
    progress: bool = True,
) -> OptimizedToken:
    """OVAM's token optimisation: fit the word's text embedding so its open-vocabulary map
    matches `mask` on this image; the returned token then segments the same concept in other
    runs of the same pipeline: `other_run.open_vocab_map(token)`.

    mask     the target, (height, width) at the run's image size: bool / 0-1 array, tensor or PIL image.
    epochs   optimisation steps; lr: Adam's step size in embedding units.
    Loss: binary cross-entropy between the min-max normalised map (as thresholded by mask())
    and the mask, as in OVAM's reference code; Adam instead of its SGD at lr 300, so the step
    size does not depend on the scale of one model's gradients. Only the word's rows of the
    attribution prompt's text embedding change; the pipeline's weights are read, never updated.
    Memory: the backward pass keeps every chosen (step, layer) softmax; on SD-sized models narrow
    it with steps= / sites= (e.g. sites="16x16" for SD 1.x), as the paper does with its blocks.
    """
    pipe = ovam_pipe(run, pipe)
    image = run._image_index(image)
    target = as_mask(run, mask)
    attribution_prompt = word if attribution_prompt is None else attribution_prompt
    tokens = token_indices(run._tokenizer(), attribution_prompt, word, occurrence)
    base = text_embedding(run, pipe, attribution_prompt)
    rows = base[tokens].clone().requires_grad_(True)
    optimizer = torch.optim.Adam([rows], lr=lr)
    losses = []
    for _ in tqdm(range(epochs), desc=f"optimise token {word!r}", disable=not progress, leave=False):
        embedding = base.index_put((torch.tensor(tokens),), rows)
        values, _ = run._sum_maps(ovam_token_maps(run, pipe, image, embedding, tokens), True, steps, sites, heads)
        normalized = (values - values.min()) / (values.max() - values.min()).clamp(min=1e-12)
        loss = F.binary_cross_entropy(normalized.clamp(1e-6, 1 - 1e-6), target)
        # autograd.grad, not backward(): only the embedding gets a gradient, the model's .grad stay untouched.
        (rows.grad,) = torch.autograd.grad(loss, [rows])
        optimizer.step()
        losses.append(float(loss.detach()))
    embedding = base.index_put((torch.tensor(tokens),), rows.detach())
    return OptimizedToken(
        word=word, attribution_prompt=attribution_prompt, tokens=tuple(tokens), embedding=embedding, losses=losses
    )


def ovam_pipe(run, pipe):
    if not run.queries:
        raise ValueError("open-vocabulary maps need the stored queries: trace with open_vocabulary=True")
    pipe = pipe if pipe is not None else run.pipe
    if pipe is None:
        raise ValueError("open-vocabulary maps need the pipeline (text encoder and to_k): pass pipe=")
    return pipe


def as_mask(run, mask) -> torch.Tensor:
    """A (height, width) float tensor of 0/1 at the run's image size."""
    if isinstance(mask, HeatMap):
        mask = mask.mask()
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L")) > 127
    array = mask.detach().cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
    height, width = run.image_size
    if array.ndim != 2:
        raise ValueError(f"the mask must be 2-D (height, width) = ({height}, {width}), got shape {array.shape}")
    if array.shape != (height, width):
        raise ValueError(
            f"the mask is {array.shape[1]}x{array.shape[0]} but the run's images are {width}x{height} "
            "(width x height): give one value per image pixel"
        )
    return torch.from_numpy((array > 0.5).astype(np.float32))


def ovam_token_maps(run, pipe, image: int, embedding: torch.Tensor, tokens: list[int]) -> dict[str, torch.Tensor]:
    """{layer: (steps, heads, h, w)}: the word's attention with `embedding`'s keys in place of the
    generation prompt's. Differentiable with respect to `embedding`."""
    keys = keys_of(run, pipe, embedding)
    maps = {}
    for name, queries in run.queries.items():
        site = run.sites[name]
        query = queries[:, image].float()  # (steps, heads, queries, head_dim)
        # The layer's own attention, with the attribution prompt's keys in place of the generation's.
        probs = torch.softmax(query @ keys[name].transpose(-1, -2) * site.scale, dim=-1)
        word = probs[..., tokens].mean(dim=-1)  # (steps, heads, queries)
        maps[name] = word.reshape(*word.shape[:2], *site.grid)
    return maps


def text_embedding(run, pipe, attribution_prompt: str) -> torch.Tensor:
    """(77, dim): the pipeline's text encoding of the attribution prompt (both encoders' for SDXL)."""
    if attribution_prompt not in run._attribution_embeddings:
        with torch.no_grad():
            embedding = pipe.encode_prompt(
                prompt=attribution_prompt,
                device=pipe.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                clip_skip=run.settings.get("clip_skip"),
            )[0]
        run._attribution_embeddings[attribution_prompt] = embedding[0].float().cpu()
    return run._attribution_embeddings[attribution_prompt]


def keys_of(run, pipe, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
    """{layer: (heads, 77, head_dim)}: each layer's to_k of the text embedding (differentiable)."""
    keys = {}
    for name in run.queries:
        attn = pipe.unet.get_submodule(name)
        if embedding.shape[-1] != attn.to_k.in_features:
            raise ValueError(
                f"this text embedding is {embedding.shape[-1]} wide but {name} reads "
                f"{attn.to_k.in_features}-wide text: an OptimizedToken works only with the "
                "pipeline it was optimised on"
            )
        text = embedding.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)[None]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        key = attn.to_k(text)[0].float().cpu()  # (77, heads * head_dim)
        keys[name] = key.reshape(key.shape[0], attn.heads, -1).transpose(0, 1)
    return keys


# -- run-attention -------------------------------------------------------------------------
