"""Measure the judge on rendered images and the embedded model on held-out prompts.

    sdlab tinyworld eval --judge              # judge accuracy + confusion on the fixed rendered split
    sdlab tinyworld eval --model [PATH]       # quality of a pipeline on the held-out prompt split
                         [--seeds 4 --first-seed 0]   # which seeds: first-seed, first-seed + 1, ...

Prompt split: scenes drawn from evaluation seeds (>= 10,000,000; training uses [0, 60,000)),
captioned with every attribute named. TinyWorld is combinatorial, so "held out" means unseen
scenes and wordings, not unseen concepts.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion import predicted_x0
from .judge import judge_rendered, parse_prompt, score_prompt
from .world import COLORS, OPPOSITE_RELATION, RELATIONS, SHAPES, TEXTURES, render, sample_scene

EVAL_SEED = 10_000_000
JUDGE_SPLIT = range(EVAL_SEED, EVAL_SEED + 500)


def prompt_split() -> dict[str, list[str]]:
    """The held-out prompt sets, deterministic: single objects, pairs with a relation, textures and sizes."""
    rng = np.random.default_rng(EVAL_SEED)
    single, pairs, attributes = [], [], []
    for i, shape in enumerate(SHAPES):  # every shape with a spread of colours, plain texture, no size word
        for color in list(COLORS)[i % 2 :: 2]:
            single.append(f"a {color} {shape}")
    seed = EVAL_SEED + 1000
    while len(pairs) < 24:
        relation = RELATIONS[len(pairs) % len(RELATIONS)]
        scene = sample_scene(seed, n_objects=2, relation=relation)
        seed += 1
        a, b = scene.objects
        pairs.append(f"a {a.color} {a.shape} {relation} a {b.color} {b.shape}")
    for k in range(24):
        texture = TEXTURES[1 + k % 2] if k % 3 else "plain"
        size = "small" if k % 2 else "large"
        shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
        tex = "" if texture == "plain" else texture + " "
        attributes.append(f"a {size} {tex}{color} {shape}")
    return {"single": single, "pairs": pairs, "attributes": attributes}


def degrade(image: np.ndarray, blur_sigma: float, drift: float, seed: int) -> np.ndarray:
    """What a generated image looks like next to a rendered one: Gaussian blur, a colour drift of
    (+drift, -drift/2, +drift/2) and pixel noise (std 4)."""
    from scipy import ndimage

    out = ndimage.gaussian_filter(image.astype(float), (blur_sigma, blur_sigma, 0)) + np.array(
        [drift, -drift / 2, drift / 2]
    )
    out += np.random.default_rng(seed).normal(0, 4, out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def evaluate_judge(seeds=JUDGE_SPLIT, blur_sigma: float = 0.0, drift: float = 0.0) -> dict:
    """The judge against the ground truth on rendered scenes, optionally degraded (`degrade`)."""
    correct = total = 0
    confusion = {k: collections.Counter() for k in ("shape", "color", "texture", "size_label")}
    missing = 0
    for seed in tqdm(seeds, desc=f"judge on rendered split (blur {blur_sigma}, drift {drift})"):
        scene = sample_scene(seed)
        image = render(scene).image
        if blur_sigma or drift:
            image = degrade(image, blur_sigma, drift, seed)
        result = judge_rendered(scene, image)
        for row in result["objects"]:
            total += 1
            if row["found"] is None:
                missing += 1
                continue
            ok = all(row["found"][k] == row["truth"][k] for k in confusion)
            correct += ok
            for k in confusion:
                confusion[k][f"{row['truth'][k]} -> {row['found'][k]}"] += 1
    return {
        "objects": total,
        "fully_correct": correct / total,
        "missing": missing,
        "errors": {
            k: {p: n for p, n in c.items() if p.split(" -> ")[0] != p.split(" -> ")[1]} for k, c in confusion.items()
        },
    }


@torch.no_grad()
def evaluate_model(
    pipe,
    seeds=(0, 1, 2, 3),
    steps: int = 20,
    guidance: float = 5.0,
    batch: int = 16,
    sets: dict[str, list[str]] | None = None,
) -> dict:
    """Generate every prompt of the split with each seed and score it with the judge."""
    sets = sets or prompt_split()
    out = {}
    for name, prompts in sets.items():
        jobs = [(p, s) for p in prompts for s in seeds]
        scores = []
        for i in tqdm(range(0, len(jobs), batch), desc=f"generate + judge: {name}"):
            chunk = jobs[i : i + batch]
            generators = [torch.Generator().manual_seed(s) for _, s in chunk]
            images = pipe(
                [p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=generators
            ).images
            scores += [(p, score_prompt(p, im)) for (p, _), im in zip(chunk, images)]
        out[name] = summarize(scores)
    return out


def mirrored(prompt: str) -> str:
    """The prompt with its relation turned around: "a red circle left of a blue square" -> "... right of ..."."""
    spec = parse_prompt(prompt)
    if spec.relation is None:
        raise ValueError(f"{prompt!r} names no relation between two objects (left of, right of, above, below)")
    mirror = OPPOSITE_RELATION[spec.relation]
    text, n = re.subn(rf"\b{spec.relation}\b", mirror, prompt, count=1)
    if n != 1:
        raise ValueError(f"{prompt!r}: write the relation as one of {list(OPPOSITE_RELATION)} to mirror it")
    return text


@torch.no_grad()
def relation_swap_test(
    pipe,
    prompts: list[str],
    seeds=(0, 1, 2, 3),
    steps: int = 20,
    guidance: float = 5.0,
    batch: int = 16,
    moved_px: float = 4.0,
) -> dict:
    """Does the relation word steer the layout? Each two-object prompt and its mirror ("left of" <->
    "right of", "above" <-> "below") are generated from the same seed. A model that reads the relation
    moves the objects; one that ignores it draws the same picture twice (both objects within
    `moved_px` pixels of where they were), placing objects wherever the starting noise suggests."""
    jobs = [(q, s) for p in prompts for s in seeds for q in (p, mirrored(p))]
    scores = []
    for i in tqdm(range(0, len(jobs), batch), desc="relation swap test"):
        chunk = jobs[i : i + batch]
        images = pipe(
            [q for q, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(s) for _, s in chunk],
        ).images
        scores += [score_prompt(q, im) for (q, _), im in zip(chunk, images)]
    read = unchanged = both_right = 0
    for asked, mirror in zip(scores[0::2], scores[1::2]):
        both_right += bool(asked["relation"] and mirror["relation"])
        centres = [o["centre"] for o in asked["objects"] + mirror["objects"]]
        if any(c is None for c in centres):
            continue
        read += 1
        moved = max(float(np.hypot(a[0] - b[0], a[1] - b[1])) for a, b in zip(centres[:2], centres[2:]))
        unchanged += moved < moved_px
    n = len(scores) // 2
    return {
        "n_pairs": n,
        "both_read": read / n,
        "layout_unchanged": unchanged / read if read else None,
        "both_relations_correct": both_right / n,
    }


def colour_centroid(image: np.ndarray, color: str, spread: float = 40.0) -> tuple[float, float] | None:
    """Centre (x, y) of the pixels near one palette colour, weighted by closeness; None if none is near.

    Soft on purpose: it also reads the blurry clean-image estimates of a model's first sampling step, where
    a blob drawn as the mixture of two colours (say purple for red + blue) counts little for either."""
    distance = np.linalg.norm(image.astype(np.float64) - np.array(COLORS[color], dtype=np.float64), axis=-1)
    weight = np.exp(-0.5 * (distance / spread) ** 2)
    if weight.sum() < 1.0:
        return None
    ys, xs = np.mgrid[: image.shape[0], : image.shape[1]]
    return float((weight * xs).sum() / weight.sum()), float((weight * ys).sum() / weight.sum())


def side_offset(relation: str, a: tuple[float, float], b: tuple[float, float]) -> float:
    """How far point a sits on `relation`'s side of point b, along the relation's axis: positive when
    a is where the relation puts the first object (left of b for "left of", above it for "above")."""
    along = 0 if relation in ("left of", "right of") else 1
    sign = -1.0 if relation in ("left of", "above") else 1.0
    return sign * (a[along] - b[along])


def relation_offset(image: np.ndarray, prompt: str) -> float | None:
    """How far (pixels) the first named object sits on the relation's side of the second, judged by colour
    centroids: positive when the picture agrees with the relation, negative when it is mirrored, ~0 when
    both places hold the same mixture. None if the prompt names no relation or two different colours."""
    spec = parse_prompt(prompt)
    a, b = (spec.objects + [{}, {}])[:2]
    if spec.relation is None or not a.get("color") or not b.get("color") or a["color"] == b["color"]:
        return None
    ca, cb = colour_centroid(image, a["color"]), colour_centroid(image, b["color"])
    if ca is None or cb is None:
        return None
    return side_offset(spec.relation, ca, cb)


@torch.no_grad()
def first_step_layout(
    pipe,
    prompts: list[str],
    seeds=(0, 1, 2, 3),
    steps: int = 20,
    guidance: float = 5.0,
    batch: int = 16,
    min_offset_px: float = 2.0,
    return_images: bool = False,
) -> dict:
    """Does the model place the objects as the relation says before the noise has any say?

    At the first sampling step the model's estimate of the clean image (with classifier-free guidance, as
    sampling uses it) is decoded, and each object's colour centroid located. With pure noise as input
    (a zero-terminal-SNR schedule) this estimate is the model's average picture for the prompt: if it
    knows where each object goes it shows them on the right sides; if it only knows the relation's axis
    it shows two blobs on that axis, each a mixture of both objects, and the noise decides later.
    `return_images` adds the decoded estimates (uint8, one per prompt and seed, prompt-major)."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    t = scheduler.timesteps[0]
    alpha = scheduler.alphas_cumprod[int(t)]
    jobs = [(p, s) for p in prompts for s in seeds]
    offsets, decoded = [], []
    for i in tqdm(range(0, len(jobs), batch), desc="first-step layout"):
        chunk = jobs[i : i + batch]
        cond, uncond = pipe.encode_prompt(
            [p for p, _ in chunk], pipe.device, 1, True, negative_prompt=[""] * len(chunk)
        )
        shape = (1, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
        noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for _, s in chunk])
        noise = (noise * scheduler.init_noise_sigma).to(pipe.device, pipe.unet.dtype)
        x = scheduler.scale_model_input(torch.cat([noise, noise]), t)
        out_uncond, out_cond = pipe.unet(x, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        out = out_uncond + guidance * (out_cond - out_uncond)
        clean = predicted_x0(
            model_output=out, sample=noise, alpha_bar=float(alpha), prediction_type=scheduler.config.prediction_type
        ).to(out.dtype)
        images = pipe.vae.decode(clean / pipe.vae.config.scaling_factor).sample
        images = ((images.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).float().cpu().numpy()
        offsets += [relation_offset(im, p) for (p, _), im in zip(chunk, images)]
        decoded += list(images.round().astype(np.uint8)) if return_images else []
    read = [o for o in offsets if o is not None]
    return {
        **({"images": decoded} if return_images else {}),
        "n_images": len(offsets),
        "n_read": len(read),
        "right_side": sum(o >= min_offset_px for o in read) / len(read) if read else None,
        "mirrored": sum(o <= -min_offset_px for o in read) / len(read) if read else None,
        "median_offset_px": float(np.median(read)) if read else None,
    }


def summarize(scores: list[tuple[str, dict]]) -> dict:
    def rate(values):
        values = [v for v in values if v is not None]
        return (sum(values) / len(values)) if values else None

    objs = [o for _, s in scores for o in s["objects"]]
    specs = [parse_prompt(p) for p, _ in scores]
    asked = [
        (want["texture"], got.get("texture_read") or "missing")
        for spec, (_, s) in zip(specs, scores)
        for want, got in zip(spec.objects, s["objects"])
        if want["texture"] is not None
    ]
    return {
        "n_images": len(scores),
        "shape_and_color": rate([o["shape"] and o["color"] is not False for o in objs]),
        "all_objects_present": rate([s["all_present"] for _, s in scores]),
        "relation": rate([s["relation"] for _, s in scores]),
        "texture": rate([o["texture"] for o in objs]),
        "size": rate([o["size"] for o in objs]),
        "exact_object_count": rate([s["n_found"] == len(spec.objects) for spec, (_, s) in zip(specs, scores)]),
        # What the judge read where a texture was asked ("dotted -> striped": 8); "missing": no such object.
        "texture_confusion": dict(sorted(collections.Counter(f"{a} -> {b}" for a, b in asked).items()))
        if asked
        else None,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="sdlab tinyworld eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--judge", action="store_true", help="judge accuracy on the rendered split")
    p.add_argument("--model", nargs="?", const="", default=None, help="evaluate a pipeline (default: the embedded one)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (default: 4)")
    p.add_argument(
        "--first-seed", type=int, default=0, help="the first of them (default: 0, so seeds 0-3; e.g. 4 for seeds 4-7)"
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    results = {}
    if args.judge:
        results["judge"] = evaluate_judge()
        for blur_sigma, drift in ((0.6, 8.0), (0.9, 12.0)):  # robustness to generated images' blur and drift
            results[f"judge_blur{blur_sigma}_drift{drift:g}"] = evaluate_judge(blur_sigma=blur_sigma, drift=drift)
    if args.model is not None:
        from ..pipelines import load_pipeline

        pipe = load_pipeline(args.model or None)
        pipe.set_progress_bar_config(disable=True)
        seeds = tuple(range(args.first_seed, args.first_seed + args.seeds))
        results["model"] = evaluate_model(pipe, seeds=seeds, steps=args.steps, guidance=args.guidance)
        results["model"]["relation_swap"] = relation_swap_test(
            pipe, prompt_split()["pairs"], seeds=seeds, steps=args.steps, guidance=args.guidance
        )
        results["model"]["first_step_layout"] = first_step_layout(
            pipe, prompt_split()["pairs"], seeds=seeds, steps=args.steps, guidance=args.guidance
        )
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
