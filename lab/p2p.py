"""Prompt-to-Prompt (Hertz et al., "Prompt-to-Prompt Image Editing with Cross Attention Control", ICLR 2023,
arXiv 2208.01626): edit an image by editing its prompt, keeping the source's attention maps.

    result = lab.prompt_to_prompt(pipe, "a red circle", "a red star", generator=torch.manual_seed(0))
    result.images                   # [source, edited]
    result = lab.prompt_to_prompt(pipe, "a red circle", "a striped red circle", local_blend="circle")
    result = lab.prompt_to_prompt(pipe, "a large red circle", "a large red circle", reweight={"large": 3})
    inv = lab.inversion.null_text_inversion(pipe, photo, "a red circle", guidance_scale=5)
    result = lab.prompt_to_prompt(pipe, "a red circle", "a green circle", inversion=inv)   # a real image

The source and the target prompts run as one batch from the same x_T, rows named "source" and "target"
(Trace.name_rows; target images 1, 2, ... for several target prompts). At the cond rows of every UNet call:

  cross-attention   M_target <- alpha_t * Edit(M_source, M_target) + (1 - alpha_t) * M_target, per target token,
                    alpha_t = 1 for the steps in cross_steps (the paper's tau_c, per word with a dict)
       replace      Edit = M_source A  (A maps source tokens to target tokens; the prompts have as many words,
                    a swapped word with another token count shares its attention evenly, ptp's
                    get_replacement_mapper); refine: Edit = M_source at the target tokens aligned (global
                    alignment of the token sequences, ptp's seq_aligner) to a source token, M_target at new ones
       reweight     Edit = (the edit above, or M_source) * c, c = the given scale at the word's tokens, 1 elsewhere
  self-attention    M_target <- M_source for the steps in self_steps (tau_s), at sites whose maps have at most
                    self_max_fraction of the latent's side (the null-text notebook's <= 32 x 32 of SD's 64 x 64: 0.5;
                    the first P2P notebook's <= 16 x 16: 0.25)

The unconditional rows are never edited (as the reference, which edits attn[h // 2:]).

LocalBlend (the paper's section 3.2, ptp's LocalBlend): the cross-attention maps of the blend words, at the down
and up sites of the resolution closest to the latent's side / 4 (the reference's 16 x 16 of 64 x 64; on TinyWorld
8 x 8, its coarsest down/up cross-attention), averaged over sites and heads and summed over the steps so far, are
max-pooled (3 x 3), upsampled to the latent, divided by their maximum and thresholded (0.3); the mask is the union
of the source's and the target's, and after each step from blend_start on (the null-text notebook's 0.2)

    x_t[target] <- x_t[source] + mask * (x_t[target] - x_t[source])

Real images: `inversion=` (any lab.inversion result) starts every row at its x_T, runs its DDIM steps with its
guidance and, step by step, its unconditional embeddings (null-text's optimised ones, the source prompt's for
negative-prompt inversion), for source and target rows alike; the source row then regenerates the image. An EDICT
inversion runs its coupled steps (lab.inversion's) with the same edits; LocalBlend then blends both latents.

Deviations from the reference, each because the reference is wrong or SD-specific:
  - the replacement mapper maps the tokens after the last swapped word position for position (i -> j); the
    reference maps them j -> j, which shifts them when the swapped words differ in token count;
  - sizes are relative to the latent, so SD 1.x at 512, SD 2.x at 768, SDXL at 1024 and TinyWorld at 64 px get the
    same rule;
  - the generated path draws x_T as the pipeline would for one image (pipe.prepare_latents) and runs the pipeline's
    own loop (callback_on_step_end), with whatever scheduler it has.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lab import diffusion, hooks
from lab import inversion as inversions
from lab.results import Result, as_uint8_images
from lab.tokens import _encode, _tokenizers, token_indices

__all__ = ["prompt_to_prompt", "PromptToPromptResult", "replacement_mapper", "refinement_mapper", "EDITS"]

EDITS = ("auto", "replace", "refine")
_REFUSED = {
    "prompt": "give the source and target prompts as the first arguments",
    "prompt_embeds": "prompt_to_prompt encodes the prompts itself",
    "negative_prompt_embeds": "prompt_to_prompt encodes the prompts itself",
    "num_images_per_prompt": "one image per prompt; run again with another generator for more",
    "image": "a real image goes through lab.inversion first: prompt_to_prompt(..., inversion=inv)",
}


@dataclass
class PromptToPromptResult(Result):
    """The source image and its edits.

    prompts       [source, target, ...]; images / image_arrays in that order (uint8 (n, H, W, 3))
    masks         LocalBlend: (steps, targets, h, w) float 0/1, the mask applied after each step (zeros before
                  blend_start), on the latent grid; None without LocalBlend
    blend_maps    LocalBlend: (targets, 2, h', w') the final summed maps of the blend words, source's then target's,
                  normalised to max 1, on the attention grid; None without LocalBlend
    latents       the final latents, float32 (n, C, h, w), source first
    settings      every argument that made it: edit, cross/self steps, reweight, blend words, sites, steps, guidance
    """

    prompts: list[str]
    settings: dict
    masks: torch.Tensor | None = None
    blend_maps: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    image_arrays: np.ndarray | None = None

    FORMAT = "sdlab.p2p.PromptToPromptResult"
    VERSION = 1

    def __repr__(self):
        return f"<PromptToPromptResult {self.settings['edit']}: {self.prompts[0]!r} -> {self.prompts[1:]!r}>"

    @property
    def source_image(self):
        return self.images[0]

    @property
    def edited_images(self):
        return self.images[1:]

    def to_record(self):
        names = ("masks", "blend_maps", "latents")
        tensors = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        return {"prompts": self.prompts, "settings": self.settings}, tensors

    @classmethod
    def from_record(cls, metadata, tensors, images):
        masks, blend_maps, latents = (tensors.get(name) for name in ("masks", "blend_maps", "latents"))
        return cls(metadata["prompts"], metadata["settings"], masks, blend_maps, latents, images)


# ----------------------------------------------------------------------------------------------
# Token alignment: which source token each target token takes its attention from
# ----------------------------------------------------------------------------------------------


def _ids(pipe, prompt: str) -> list[int]:
    tokenizer = next(iter(_tokenizers(pipe).values()))
    return _encode(tokenizer, prompt, special=True)


def _word_spans(pipe, prompt: str) -> list[tuple[str, list[int]]]:
    """(word, its token positions) for every space-separated word of the prompt, in order."""
    spans, used = [], {}
    for word in prompt.split():
        occurrence = used.get(word, 0)
        spans.append((word, token_indices(pipe, prompt, word, occurrence=occurrence)))
        used[word] = occurrence + 1
    return spans


def _length(pipe) -> int:
    return next(iter(_tokenizers(pipe).values())).model_max_length


def replacement_mapper(pipe, source: str, target: str) -> torch.Tensor:
    """(tokens, tokens) A with M_target = M_source A: word swaps between prompts of as many words."""
    source_words, target_words = _word_spans(pipe, source), _word_spans(pipe, target)
    if len(source_words) != len(target_words):
        raise ValueError(
            f"replace needs prompts of as many words (one word swapped for another): {source!r} has "
            f"{len(source_words)}, {target!r} has {len(target_words)}. Use edit='refine' for added or removed words."
        )
    n = _length(pipe)
    mapper = torch.zeros(n, n)
    mapper[0, 0] = 1  # start token
    i = j = 1
    for (_, s_tokens), (_, t_tokens) in zip(source_words, target_words):
        if len(s_tokens) == len(t_tokens):
            for s, t in zip(s_tokens, t_tokens):
                mapper[s, t] = 1
        else:  # as the reference: each target token gets 1/len of every source token of the word
            mapper[s_tokens[0] : s_tokens[-1] + 1, t_tokens[0] : t_tokens[-1] + 1] = 1 / len(t_tokens)
        i, j = s_tokens[-1] + 1, t_tokens[-1] + 1
    while i < n and j < n:  # end token and padding, position for position
        mapper[i, j] = 1
        i, j = i + 1, j + 1
    return mapper


def refinement_mapper(pipe, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, alpha), each (tokens,): target token j takes source token index[j]'s attention where alpha[j] = 1;
    alpha 0 (index -1 -> 0) at tokens the source does not have. Global alignment (Needleman-Wunsch, match 1,
    mismatch -1, gap 0, as ptp's seq_aligner) of the two token sequences."""
    s_ids, t_ids = _ids(pipe, source), _ids(pipe, target)
    n = _length(pipe)
    if len(s_ids) > n or len(t_ids) > n:
        raise ValueError(f"the prompts must fit the text encoder's {n} tokens")
    a, b = s_ids[1:-1], t_ids[1:-1]  # content tokens
    score = np.zeros((len(a) + 1, len(b) + 1))
    for x in range(1, len(a) + 1):
        for y in range(1, len(b) + 1):
            match = score[x - 1, y - 1] + (1 if a[x - 1] == b[y - 1] else -1)
            score[x, y] = max(match, score[x - 1, y], score[x, y - 1])
    index = torch.full((n,), -1, dtype=torch.long)
    x, y = len(a), len(b)
    while x > 0 and y > 0:
        if a[x - 1] == b[y - 1] and score[x, y] == score[x - 1, y - 1] + 1:
            index[y] = x  # content token y - 1 of b sits at position y (after the start token)
            x, y = x - 1, y - 1
        elif score[x, y] == score[x - 1, y]:
            x -= 1
        else:
            y -= 1
    index[0] = 0
    tail = torch.arange(len(t_ids) - 1, n)
    index[len(t_ids) - 1 :] = (tail - len(t_ids) + len(s_ids)).clamp(max=n - 1)  # end token and padding
    alpha = (index >= 0).float()
    return index.clamp(min=0), alpha


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


def _bounds(value, name: str) -> tuple[float, float]:
    """A fraction f (steps [0, f)) or a pair (start, end) of fractions of the steps."""
    pair = (0.0, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair)
        or not 0 <= pair[0] <= pair[1] <= 1
    ):
        raise ValueError(
            f"{name} must be a fraction of the steps in [0, 1] (0.8: the first 80 %) or a pair (start, end) with "
            f"0 <= start <= end <= 1, got {value!r}"
        )
    return float(pair[0]), float(pair[1])


def _step_range(bounds: tuple[float, float], num_steps: int) -> range:
    return range(int(bounds[0] * num_steps), int(bounds[1] * num_steps))


def cross_alphas(pipe, target: str, cross_steps, num_steps: int) -> torch.Tensor:
    """(steps, tokens) alpha_t of one target prompt: 1 where its cross-attention is injected. cross_steps: a
    fraction, a (start, end) pair, or a dict {word of the target prompt: fraction or pair, "default_": ...}."""
    per_word = dict(cross_steps) if isinstance(cross_steps, dict) else {"default_": cross_steps}
    alphas = torch.zeros(num_steps, _length(pipe))
    default = per_word.pop("default_", 1.0)
    alphas[list(_step_range(_bounds(default, "cross_steps"), num_steps))] = 1.0
    for word, value in per_word.items():
        tokens = token_indices(pipe, target, word)
        steps = _step_range(_bounds(value, f"cross_steps[{word!r}]"), num_steps)
        alphas[:, tokens] = 0.0
        alphas[list(steps), tokens[0] : tokens[-1] + 1] = 1.0
    return alphas


# ----------------------------------------------------------------------------------------------
# Prompt-to-Prompt
# ----------------------------------------------------------------------------------------------


@dataclass
class _Target:
    prompt: str
    mapper: torch.Tensor | None  # replace
    index: torch.Tensor | None  # refine
    alpha_tokens: torch.Tensor | None  # refine
    equalizer: torch.Tensor | None  # reweight
    alphas: torch.Tensor  # (steps, tokens)
    blend_tokens: list[int]


def prompt_to_prompt(
    pipe,
    source_prompt: str,
    target_prompt: str | list[str],
    *,
    edit: str = "auto",
    cross_steps=0.8,
    self_steps=0.4,
    reweight: dict | None = None,
    local_blend=None,
    blend_threshold=0.3,
    blend_start: float = 0.2,
    blend_resolution: int | None = None,
    self_max_fraction: float = 0.5,
    inversion=None,
    progress: bool = True,
    **pipe_kwargs,
) -> PromptToPromptResult:
    """Generate `source_prompt` and each target prompt from one x_T, the targets keeping the source's attention.

    edit               "replace" (word swaps, as many words), "refine" (words added or removed) or "auto"
                       (replace when the prompts have as many words, else refine); a target equal to the source is
                       a pure reweight or a reconstruction
    cross_steps        tau_c: fraction of the steps (from the first) with cross-attention injected, a (start, end)
                       pair, or {word of the target: fraction or pair, "default_": fraction or pair}; default 0.8
    self_steps         tau_s for self-attention, fraction or pair; default 0.4 (the paper's examples: 0.2 to 0.6)
    reweight           {word of the target: scale}: scales the word's (injected) attention, composed after the edit
    local_blend        words (a string or list); each is looked up in the source and in the targets, and the mask is
                       the union of their maps (a word only one prompt has counts for that one)
    blend_threshold    th: a float, or (source's, target's); default 0.3
    blend_start        fraction of the steps before the first blend (the null-text notebook's 0.2)
    blend_resolution   side of the cross-attention maps LocalBlend reads (None: the down/up maps closest to the
                       latent's side / 4, the reference's 16 of 64)
    self_max_fraction  self-attention is injected at maps of at most this fraction of the latent's side
    inversion          a lab.inversion.Inversion: edit that real image (see the module docstring)
    progress           EDICT's coupled steps show a tqdm bar; the pipeline's own loop shows its bar as
                       pipe.set_progress_bar_config says
    pipe_kwargs        go to pipe(...): generator, num_inference_steps, guidance_scale, height, width, negative_prompt,
                       ... (with inversion=, the steps and guidance are the inversion's)
    """
    targets = [target_prompt] if isinstance(target_prompt, str) else list(target_prompt)
    if not isinstance(source_prompt, str) or not targets or not all(isinstance(t, str) for t in targets):
        raise TypeError("source_prompt must be a string and target_prompt a string or a non-empty list of strings")
    if edit not in EDITS:
        raise ValueError(f"edit must be one of {EDITS}, got {edit!r}")
    _check_pipe_kwargs(pipe, pipe_kwargs, inversion)
    if not isinstance(self_max_fraction, (int, float)) or not 0 <= self_max_fraction <= 1:
        raise ValueError(f"self_max_fraction must be in [0, 1], got {self_max_fraction!r}")
    num_steps = _num_steps(pipe, pipe_kwargs, inversion)
    self_range = _step_range(_bounds(self_steps, "self_steps"), num_steps)
    blend_words = _blend_words(local_blend)
    thresholds = _thresholds(blend_threshold) if blend_words else None
    blend_from = int(_bounds(blend_start, "blend_start")[1] * num_steps)
    prepared = [
        _prepare_target(pipe, source_prompt, target, edit, cross_steps, reweight, num_steps) for target in targets
    ]
    source_blend = _tokens_of(pipe, source_prompt, blend_words) if blend_words else []
    if blend_words:
        for target, prepared_target in zip(targets, prepared):
            prepared_target.blend_tokens = _tokens_of(pipe, target, blend_words)
            if not source_blend and not prepared_target.blend_tokens:
                raise ValueError(f"none of the blend words {blend_words} is in {source_prompt!r} or {target!r}")
    height, width = _size(pipe, pipe_kwargs, inversion)
    latent_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    blend_sites = _blend_sites(pipe, latent_size, blend_resolution) if blend_words else []
    prompts = [source_prompt, *targets]
    n = len(prompts)

    state = {"step": 0}
    blend_sum: list[torch.Tensor | None] = [None]  # (rows, h', w', tokens): maps summed over sites, heads, steps
    masks: list[torch.Tensor] = []

    def step_of() -> int:
        return min(state["step"], num_steps - 1)

    def edit_cross(probs, ctx):  # probs: the cond rows [source, target 1, ...], (n, heads, queries, tokens)
        if blend_words and ctx.site in blend_sites:
            maps = probs.float().mean(1).reshape(n, *ctx.size, probs.shape[-1])
            blend_sum[0] = maps if blend_sum[0] is None else blend_sum[0] + maps
        step = step_of()
        base, edited = probs[0], [probs[0]]
        for k, target in enumerate(prepared, start=1):
            alpha = target.alphas[step].to(probs)
            if not alpha.any():
                edited.append(probs[k])
                continue
            new = _edit_attention(base, probs[k], target)
            edited.append(new * alpha + probs[k] * (1 - alpha))
        return torch.stack(edited)

    def edit_self(probs, ctx):
        if step_of() not in self_range or ctx.size[0] * ctx.size[1] > self_max_fraction**2 * math.prod(latent_size):
            return probs
        return probs[:1].expand_as(probs)

    def blend(*latents: torch.Tensor) -> list[torch.Tensor]:
        """LocalBlend after step state['step'] of each latent given (rows [source, target 1, ...]; EDICT: x and y)."""
        if not blend_words or blend_sum[0] is None:
            return list(latents)
        maps = blend_sum[0]
        source_map = _word_map(maps[0], source_blend)
        pairs = [torch.stack([source_map, _word_map(maps[k], t.blend_tokens)]) for k, t in enumerate(prepared, 1)]
        mask = torch.stack([_blend_mask(pair, latent_size, thresholds) for pair in pairs])  # (targets, h, w)
        if state["step"] < blend_from:
            masks.append(torch.zeros_like(mask))
            return list(latents)
        masks.append(mask)
        mask = mask[:, None].to(latents[0])
        return [torch.cat([x[:1], x[:1] + mask * (x[1:] - x[:1])]) for x in latents]

    with hooks.shared_trace(pipe) as tr:
        tr.name_rows(source=0, target=list(range(1, n)))
        tr.edit("cross", "probs", edit_cross, rows="cond", passes="main")
        if len(self_range):
            tr.edit("self", "probs", edit_self, rows="cond", passes="main")
        if inversion is not None and inversion.method == "edict":
            latents = _run_edict(pipe, tr, inversion, prompts, state, blend, progress)
        else:
            latents = _run_pipeline(pipe, tr, prompts, inversion, pipe_kwargs, state, blend)
    images = diffusion.decode_latents(pipe, latents, "np")

    names = [
        "reweight" if t == source_prompt and reweight else _edit_name(edit, pipe, source_prompt, [t]) for t in targets
    ]
    settings = {
        "edit": names[0] if len(set(names)) == 1 else names,
        "cross_steps": _jsonable(cross_steps),
        "self_steps": _jsonable(self_steps),
        "self_max_fraction": self_max_fraction,
        "reweight": reweight,
        "local_blend": blend_words,
        "blend_threshold": list(thresholds) if thresholds else None,
        "blend_start": blend_start,
        "blend_resolution": blend_resolution,
        "blend_sites": [site.name for site in blend_sites],
        "num_inference_steps": num_steps,
        "inversion": None if inversion is None else inversion.method,
        "guidance_scale": inversion.guidance_scale if inversion is not None else pipe_kwargs.get("guidance_scale"),
    }
    blend_maps = None
    if blend_words and blend_sum[0] is not None:
        final = blend_sum[0]
        source_map = _word_map(final[0], source_blend)
        pairs = [torch.stack([source_map, _word_map(final[k], t.blend_tokens)]) for k, t in enumerate(prepared, 1)]
        blend_maps = (
            torch.stack(pairs) / torch.stack(pairs).flatten(2).amax(2).clamp(min=1e-12)[..., None, None]
        ).cpu()
    masks = torch.stack(masks, 0).cpu() if masks else None
    return PromptToPromptResult(prompts, settings, masks, blend_maps, latents.float().cpu(), as_uint8_images(images))


def _edit_attention(base: torch.Tensor, target_probs: torch.Tensor, target: _Target) -> torch.Tensor:
    """Edit(M_source, M_target) of one target: replace / refine / identity, then reweight."""
    if target.mapper is not None:
        new = torch.einsum("hqs,st->hqt", base, target.mapper.to(base))
    elif target.index is not None:
        alpha = target.alpha_tokens.to(base)
        new = base[..., target.index.to(base.device)] * alpha + target_probs * (1 - alpha)
    else:
        new = base
    if target.equalizer is not None:
        new = new * target.equalizer.to(base)
    return new


def _word_map(maps: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """(h', w') summed over the given tokens (zeros when none)."""
    if not tokens:
        return torch.zeros(maps.shape[:2])
    return maps[..., tokens].sum(-1)


def _blend_mask(pair: torch.Tensor, latent_size, thresholds) -> torch.Tensor:
    """The union of the source's and the target's thresholded maps, on the latent grid (h, w)."""
    pooled = F.max_pool2d(pair[:, None].float(), 3, stride=1, padding=1)
    up = F.interpolate(pooled, size=latent_size)
    up = up / up.flatten(1).amax(1).clamp(min=1e-12)[:, None, None, None]
    over = torch.stack([up[0, 0] > thresholds[0], up[1, 0] > thresholds[1]])
    return (over[0] | over[1]).float()


# ----------------------------------------------------------------------------------------------
# Running: the pipeline's loop (generated images, DDIM-type inversions) or EDICT's coupled steps
# ----------------------------------------------------------------------------------------------


def _run_pipeline(pipe, tr, prompts, inversion, pipe_kwargs, state, blend):
    n = len(prompts)
    kwargs = dict(pipe_kwargs)
    user_callback = kwargs.pop("callback_on_step_end", None)
    tensor_inputs = list(kwargs.pop("callback_on_step_end_tensor_inputs", None) or ["latents"])
    run_pipe = pipe
    step_embeddings = None
    if inversion is not None:
        scheduler = inversions._scheduler_from(inversion.settings["scheduler_config"], inversion.num_inference_steps)
        run_pipe = copy.copy(pipe)  # the same modules, config and progress bar; only its scheduler is the inversion's
        run_pipe.scheduler = scheduler
        step_embeddings = inversion.step_embeddings(pipe)
        height, width = inversion.settings["image_size"]
        kwargs.update(num_inference_steps=inversion.num_inference_steps, guidance_scale=inversion.guidance_scale)
        kwargs.update(height=height, width=width)
        kwargs.update(_embedding_kwargs(pipe, prompts, step_embeddings[0], inversion.guidance_scale > 1))
        latents = inversion.x_T.to(pipe.unet.device, pipe.unet.dtype).expand(n, -1, -1, -1).clone()
        for name in ("prompt_embeds", "add_text_embeds"):
            if name in type(pipe)._callback_tensor_inputs and name not in tensor_inputs:
                tensor_inputs.append(name)
    else:
        kwargs["prompt"] = prompts
        latents = _first_latent(pipe, kwargs).expand(n, -1, -1, -1).clone()
    guided = kwargs.get("guidance_scale", _default(pipe, "guidance_scale")) > 1
    tr.name_rows(parts=("uncond", "cond") if guided else ("cond",))  # the pipeline's batch, whichever runs it

    def on_step_end(pipeline, i, t, tensors):
        outputs = dict(user_callback(pipeline, i, t, tensors) or {}) if user_callback is not None else {}
        state["step"] = i
        outputs["latents"] = blend(outputs.get("latents", tensors["latents"]))[0]
        state["step"] = i + 1
        if step_embeddings is not None and guided and i + 1 < len(step_embeddings):
            following = step_embeddings[i + 1]
            embeds = tensors["prompt_embeds"].clone()
            embeds[:n] = following.uncond.to(embeds)
            outputs["prompt_embeds"] = embeds
            if following.pooled_uncond is not None:
                pooled = tensors["add_text_embeds"].clone()
                pooled[:n] = following.pooled_uncond.to(pooled)
                outputs["add_text_embeds"] = pooled
        return outputs

    output = run_pipe(
        latents=latents,
        callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=tensor_inputs,
        output_type="latent",
        **kwargs,
    )
    return output.images


def _run_edict(pipe, tr, inv, prompts, state, blend, progress):
    """EDICT's coupled denoising (lab.inversion) of every row from (x_T, y_T), the edits on; blends both latents."""
    n = len(prompts)
    w = inv.guidance_scale
    height, width = inv.settings["image_size"]
    scheduler = inversions._scheduler_from(inv.settings["scheduler_config"], inv.num_inference_steps)
    base = inv.step_embeddings(pipe)[0]
    encoded = diffusion.encode_prompt(pipe, prompts, guidance=True)
    embeddings = diffusion.PromptEmbeddings(
        encoded.cond.float(),
        base.uncond.expand(n, -1, -1),
        None if encoded.pooled_cond is None else encoded.pooled_cond.float(),
        None if base.pooled_uncond is None else base.pooled_uncond.expand(n, -1),
    )
    inputs = inversions._unet_inputs(pipe, embeddings, height, width, w != 1)
    tr.name_rows(parts=("uncond", "cond") if w != 1 else ("cond",))
    device = pipe.unet.device
    pair = [inv.x_T.to(device).expand(n, -1, -1, -1).clone(), inv.y_T.to(device).expand(n, -1, -1, -1).clone()]

    def after_step(i, pair):
        state["step"] = i
        pair[:] = blend(*pair)
        state["step"] = i + 1

    with torch.no_grad():
        trajectory = inversions._edict_generate(pipe, scheduler, pair, inputs, w, inv.settings, progress, after_step)
    return trajectory[-1][0]


# ----------------------------------------------------------------------------------------------
# Checking and preparing, all before anything runs
# ----------------------------------------------------------------------------------------------


def _prepare_target(pipe, source, target, edit, cross_steps, reweight, num_steps) -> _Target:
    name = _edit_name(edit, pipe, source, [target])
    mapper = index = alpha_tokens = None
    if target != source:
        if name == "replace":
            mapper = replacement_mapper(pipe, source, target)
        else:
            index, alpha_tokens = refinement_mapper(pipe, source, target)
    equalizer = None
    if reweight:
        if not isinstance(reweight, dict):
            raise TypeError(f"reweight must be a dict {{word of the target prompt: scale}}, got {reweight!r}")
        equalizer = torch.ones(_length(pipe))
        for word, scale in reweight.items():
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise ValueError(f"reweight[{word!r}] must be a finite number, got {scale!r}")
            equalizer[token_indices(pipe, target, word)] = float(scale)
    alphas = cross_alphas(pipe, target, cross_steps, num_steps)
    return _Target(target, mapper, index, alpha_tokens, equalizer, alphas, [])


def _edit_name(edit, pipe, source, targets) -> str:
    if edit != "auto":
        return edit
    same = all(len(t.split()) == len(source.split()) for t in targets)
    return "replace" if same else "refine"


def _blend_words(local_blend) -> list[str]:
    if local_blend is None:
        return []
    words = [local_blend] if isinstance(local_blend, str) else list(local_blend)
    if not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(f"local_blend must be a word or a list of words, got {local_blend!r}")
    return words


def _tokens_of(pipe, prompt: str, words: list[str]) -> list[int]:
    found = []
    for word in words:
        try:
            found += token_indices(pipe, prompt, word)
        except ValueError:
            continue  # a blend word only one of the prompts has
    return sorted(set(found))


def _thresholds(value) -> tuple[float, float]:
    pair = (value, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in pair)
    ):
        raise ValueError(f"blend_threshold must be in [0, 1) or a pair (source's, target's), got {value!r}")
    return float(pair[0]), float(pair[1])


def _blend_sites(pipe, latent_size, resolution) -> list:
    """The down and up cross-attention sites whose maps have the side `resolution`, or by default those closest to
    the latent's side / 4 (ties: finer)."""
    candidates = [site for site in hooks.sites(pipe.unet) if site.kind == "cross" and site.place != "mid"]
    if not candidates:
        raise ValueError("this UNet has no cross-attention in its down or up blocks: LocalBlend cannot read maps")
    side = {site: max(site.spatial_size(latent_size)) for site in candidates}
    if resolution is not None:
        if resolution not in side.values():
            raise ValueError(
                f"blend_resolution={resolution!r}: at this image size the down/up cross-attention maps have sides "
                f"{sorted(set(side.values()))}"
            )
        return [site for site in candidates if side[site] == resolution]
    goal = max(latent_size) / 4
    best = min(side.values(), key=lambda s: (abs(s - goal), -s))
    return [site for site in candidates if side[site] == best]


def _check_pipe_kwargs(pipe, pipe_kwargs, inversion) -> None:
    parameters = inspect.signature(pipe.__call__).parameters
    if not {"latents", "callback_on_step_end"} <= set(parameters) or not hasattr(pipe, "prepare_latents"):
        raise TypeError(
            f"{type(pipe).__name__} does not take latents= and callback_on_step_end=: use a StableDiffusionPipeline "
            "or StableDiffusionXLPipeline"
        )
    refused = [f"{name}= ({why})" for name, why in _REFUSED.items() if name in pipe_kwargs]
    if "image" in parameters:
        refused.append(f"{type(pipe).__name__} is an image-to-image pipeline ({_REFUSED['image']})")
    if inversion is not None:
        if not isinstance(inversion, inversions.Inversion):
            raise TypeError(f"inversion must be a lab.inversion.Inversion, got {type(inversion).__name__}")
        refused += [
            f"{name}= (the inversion's is used: {inversion.settings.get(name, getattr(inversion, name, None))})"
            for name in ("num_inference_steps", "guidance_scale", "height", "width", "generator", "latents")
            if name in pipe_kwargs
        ]
        if inversion.method == "edict" and pipe_kwargs:
            refused.append(
                f"{', '.join(sorted(pipe_kwargs))} (an EDICT inversion is edited by lab's coupled steps, not by the "
                "pipeline's loop: pipeline arguments do not apply)"
            )
        if inversion.latents.shape[2] != pipe.unet.config.in_channels:
            raise ValueError("this inversion was made with another pipeline: edit with the pipeline that inverted it")
    if refused:
        raise ValueError("prompt_to_prompt cannot take " + "; ".join(refused))
    unknown = sorted(set(pipe_kwargs) - set(parameters))
    if unknown:
        raise TypeError(f"{type(pipe).__name__} takes no argument(s) {', '.join(unknown)}")


def _default(pipe, name):
    return inspect.signature(pipe.__call__).parameters[name].default


def _num_steps(pipe, pipe_kwargs, inversion) -> int:
    if inversion is not None:
        return inversion.num_inference_steps
    steps = pipe_kwargs.get("num_inference_steps", _default(pipe, "num_inference_steps"))
    if (
        isinstance(steps, bool)
        or not isinstance(steps, int)
        or not 1 <= steps <= pipe.scheduler.config.num_train_timesteps
    ):
        raise ValueError(
            f"num_inference_steps must be an int from 1 to {pipe.scheduler.config.num_train_timesteps}, got {steps!r}"
        )
    return steps


def _size(pipe, pipe_kwargs, inversion) -> tuple[int, int]:
    if inversion is not None:
        return tuple(inversion.settings["image_size"])
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return pipe_kwargs.get("height") or default, pipe_kwargs.get("width") or default


def _first_latent(pipe, kwargs) -> torch.Tensor:
    """x_T for one image, drawn as the pipeline would (then shared by every row, as the reference)."""
    height, width = _size(pipe, kwargs, None)
    device = pipe._execution_device
    steps = kwargs.get("num_inference_steps", _default(pipe, "num_inference_steps"))
    pipe.scheduler.set_timesteps(steps, device=device)  # as the pipeline will: init_noise_sigma may depend on it
    given = kwargs.pop("latents", None)
    latents = pipe.prepare_latents(
        1, pipe.unet.config.in_channels, height, width, pipe.unet.dtype, device, kwargs.get("generator"), given
    )
    return latents / pipe.scheduler.init_noise_sigma  # the pipeline multiplies given latents by it


def _embedding_kwargs(pipe, prompts, first: diffusion.PromptEmbeddings, guided: bool) -> dict:
    """prompt_embeds (+ SDXL pooled) of the prompts, and the inversion's first unconditional embedding."""
    encoded = diffusion.encode_prompt(pipe, prompts, guidance=False)
    dtype, n = pipe.unet.dtype, len(prompts)
    kwargs = {"prompt_embeds": encoded.cond.to(dtype)}
    if encoded.pooled_cond is not None:
        kwargs["pooled_prompt_embeds"] = encoded.pooled_cond.to(dtype)
    if guided:
        kwargs["negative_prompt_embeds"] = first.uncond.to(dtype).expand(n, -1, -1)
        if first.pooled_uncond is not None:
            kwargs["negative_pooled_prompt_embeds"] = first.pooled_uncond.to(dtype).expand(n, -1)
    return kwargs


def _jsonable(value):
    if isinstance(value, dict):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value
