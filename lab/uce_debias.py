"""UCE debiasing: move the proportions of an attribute in what a concept generates (Gandikota, Orgad, Belinkov,
Materzyńska, Bau, "Unified Concept Editing in Diffusion Models", WACV 2024, §3 "debiasing").

    def size_of(image):                                # any classifier: image → one of the attributes, or None
        found = lab.tinyworld.judge.read_image(image).objects
        return found[0].size_label if found else None

    with lab.uce_debias.debias(pipe, ["a star"], ["small", "large"], size_of, desired=[0.8, 0.2]) as edit:
        edit.history[-1]                               # the proportions measured in the last round
        image = pipe("a star").images[0]               # small four times out of five
    # every weight is back, bit for bit

The edit. Every cross-attention to_k / to_v is rewritten in UCE's closed form (lab.uce.rewrite) so that concept
c_i gives what c_i plus a mix of the attributes gave before, and the preserved concepts keep their outputs:

    v*_i = W_old (c_i + Σ_a α_ia c_a)

For fixed α this is the erase edit with guide vectors in place of guide words. α is found as the paper does, by a
loop around the closed form: α starts at 0; each round generates `images` images of every concept with the
current edit, classifies them, and moves α_ia by step · (desired_a − measured_ia); it stops once every
|desired − measured| < tolerance, or after `rounds` rounds, and keeps the last edit.

Defaults are the reference's (trainscripts/uce_sd_debias.py): λ = 0.5, edit and preserve scales 1, desired
proportions equal, tolerance 0.05, at most 30 rounds, 10 images per concept and round. Differences:
  - the reference adds (desired − measured) to v* in place, so its α accumulates the differences with step 1
    (its --step_size is parsed but never used); here the same rule is written as α += step · (desired − measured)
    with step = 1 by default.
  - the reference's CLIP classifier always picks one of the attributes; here the classifier may answer None
    (neither: e.g. the object is not drawn), and the proportions are taken among the images it classified, so they
    still sum to 1 and the α of the attributes move against each other as in the reference. (Counting None in the
    denominator made every gap positive whenever the concept faded, and α grew until it was gone.)
  - each round uses the same seeds (seed, seed + 1, ...), so rounds differ only by the edit, not by the noise.
  - c_i is the concept's last content token, as in lab.uce (the reference takes the same row).
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from lab import uce

__all__ = ["debias", "Debiasing"]


class Debiasing(uce.Erasure):
    """A debiasing edit (a lab.weights.WeightEdit): `alphas` (concept × attribute), `history` (per round, the
    measured proportions, concept × attribute), `converged`, and the settings it was made with. `alphas` are
    those of the weights in place, the round measured last (history[-1])."""

    attributes: list[str]
    desired: list[float]
    alphas: np.ndarray
    history: list[np.ndarray]
    converged: bool

    def __repr__(self) -> str:
        state = "closed" if self._saved is None else "open"
        return (
            f"Debiasing({self.concepts} over {self.attributes}, desired={self.desired}, "
            f"{len(self.history)} rounds, converged={self.converged}, {state})"
        )


def debias(
    pipe,
    concepts,
    attributes,
    classify,
    *,
    desired=None,
    preserve=None,
    lam: float = 0.5,
    edit_scale: float = 1.0,
    preserve_scale: float = 1.0,
    rounds: int = 30,
    tolerance: float = 0.05,
    step: float = 1.0,
    images: int = 10,
    seed: int = 0,
    persistent: bool = False,
    progress: bool = True,
    **pipe_kwargs,
) -> Debiasing:
    """Debias `concepts` (prompts, e.g. ["doctor"]) over `attributes` (e.g. ["male", "female"]) toward `desired`
    proportions (default: equal), with `classify(image) -> attribute or None` reading each generated image (what
    the pipeline returns: PIL by default).

    Returns the edit, applied: use it in `with` (restored on exit) or keep it (persistent=True / edit.keep()).
    pipe_kwargs go to every generation (num_inference_steps, guidance_scale, height, ...)."""
    started = time.perf_counter()
    concepts = [concepts] if isinstance(concepts, str) else concepts
    concepts, _, preserve = uce._checked(concepts, preserve, None)
    attributes = uce._strings("attributes", attributes)
    if len(attributes) < 2 or len(set(attributes)) != len(attributes) or not all(a.strip() for a in attributes):
        raise ValueError(f"attributes must be two or more distinct non-empty words, got {attributes!r}")
    if not callable(classify):
        raise TypeError("classify must be a function: image -> one of the attributes (or None)")
    desired = [1 / len(attributes)] * len(attributes) if desired is None else [float(x) for x in desired]
    if len(desired) != len(attributes) or any(not math.isfinite(x) or x < 0 for x in desired):
        raise ValueError(f"desired must give one proportion >= 0 per attribute, got {desired!r}")
    if abs(sum(desired) - 1) > 1e-6:
        raise ValueError(f"desired proportions must sum to 1, got {desired!r} (sum {sum(desired):g})")
    for label, value in (("rounds", rounds), ("images", images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    lam, edit_scale = uce._positive("lam", lam), uce._positive("edit_scale", edit_scale)
    preserve_scale, tolerance = uce._positive("preserve_scale", preserve_scale), uce._positive("tolerance", tolerance)
    step = uce._positive("step", step)
    names = uce.layer_names(pipe)

    embeddings, tokens = uce.concept_embeddings(pipe, list(dict.fromkeys(concepts + attributes + preserve)))
    C_E = torch.stack([embeddings[c] for c in concepts], dim=1)  # (d, n_concepts), float64
    C_A = torch.stack([embeddings[a] for a in attributes], dim=1)  # (d, n_attributes)
    C_P = torch.stack([embeddings[c] for c in preserve], dim=1) if preserve else C_E[:, :0]

    edit = Debiasing(pipe, names, persistent=persistent, offload=False)
    try:
        originals = {name: W.detach().clone() for name, W in edit.parameters.items()}
        alphas = np.zeros((len(concepts), len(attributes)))
        history, converged = [], False
        bar = tqdm(range(rounds), desc="UCE debiasing", disable=not progress)
        for _ in bar:
            applied = alphas.copy()
            guides = C_E + C_A @ torch.as_tensor(alphas.T, dtype=C_E.dtype)  # c_i + Σ_a α_ia c_a, as columns
            uce.rewrite(edit.parameters, C_E, guides, C_P, lam, edit_scale, preserve_scale, originals)
            measured = np.array(
                [_proportions(pipe, c, attributes, classify, images, seed, pipe_kwargs) for c in concepts]
            )
            history.append(measured)
            gap = np.array(desired)[None, :] - measured
            bar.set_postfix(gap=f"{np.abs(gap).max():.2f}")
            if np.abs(gap).max() < tolerance:
                converged = True
                break
            alphas = alphas + step * gap
    except BaseException:
        edit.restore()
        raise
    edit.concepts, edit.guides, edit.preserve, edit.tokens = concepts, [""] * len(concepts), preserve, tokens
    edit.lam, edit.erase_scale, edit.preserve_scale = lam, edit_scale, preserve_scale
    edit.attributes, edit.desired, edit.history, edit.converged = attributes, desired, history, converged
    edit.alphas = applied  # the α of the edit left in place: the last measured one (not the update after it)
    edit.seconds = time.perf_counter() - started
    return edit


def _proportions(pipe, concept, attributes, classify, images, seed, pipe_kwargs) -> list[float]:
    generators = [torch.Generator().manual_seed(seed + k) for k in range(images)]
    out = pipe([concept] * images, generator=generators, **pipe_kwargs).images
    labels = [classify(image) for image in out]
    wrong = [label for label in labels if label is not None and label not in attributes]
    if wrong:
        raise ValueError(f"classify returned {wrong[0]!r}, which is not one of {attributes} (or None)")
    if all(label is None for label in labels):
        warnings.warn(
            f"classify answered None for all {len(labels)} images of {concept!r}: no proportion can be read. It gets "
            f"what the pipeline returns ({type(out[0]).__name__}; output_type='np' gives floats in [0, 1])",
            stacklevel=3,
        )
    read = sum(label is not None for label in labels)  # the proportions among the images classified, as CLIP's
    return [labels.count(a) / max(read, 1) for a in attributes]
