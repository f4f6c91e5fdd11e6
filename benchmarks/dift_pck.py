"""DIFT on TinyWorld: PCK of semantic keypoints across rendered images of one shape class.

    python benchmarks/dift_pck.py                       # everything: about 8 min on a quiet 2-core box
    python benchmarks/dift_pck.py --parts cost          # re-measure one part, keep the rest of the results
    python benchmarks/dift_pck.py --val-pairs 12 --pairs 24 --parts pck --out /tmp/dift   # a quick look

Pairs. Pair i of a split is two one-object scenes of class SHAPES[i % 6] that differ in colour, size
(one small, one large), texture and background, all drawn without replacement from the world's values,
and in position (each drawn independently); the attribute choices come from seed base + 2i, the scenes
from sample_scene seeds base + 2i and base + 2i + 1. Validation: base 40,000,000; test: 41,000,000
(training scenes use seeds [0, 60,000), the model's held-out prompts 10,000,000 +, vae_textures.py
30,000,000 +). Every keypoint of the first image is transferred into the second (one direction).

Score. A transfer lands on a pixel (x, y); its centre (x + 0.5, y + 0.5) is compared with the keypoint's
continuous coordinates (the renderer's pixel i covers [i, i + 1)). PCK@0.1: the share of transfers within
0.1 x 64 = 6.4 px (image), or within 0.1 x max(height, width) of the target object's mask bounding box
(SPair's convention; 1.3-3.0 px on these 13-30 px objects). Pooled over keypoints; 95 % intervals from
2,000 bootstrap resamples of the pairs.

Matching is lab.dift.match_points for every method: the features of both images upsampled bilinearly to
64 x 64, cosine, argmax. The baselines go through it wrapped in lab.dift.DiftFeatures:
  pixels  a k x k patch around each pixel, RGB or luminance, raw (values in [-1, 1]) or with the patch's
          mean removed (cosine is then normalised cross-correlation); the variant (13 of them) is chosen
          on validation, as DIFT's settings are.
  VAE     the embedded VAE's posterior mean (lab.diffusion.encode_image, 4 x 16 x 16), cosine as DIFT.
  same place  the source pixel itself (no features): what position alone gives.

Validation chooses, in this order: (block or pair of blocks, timestep, prompt) by PCK@0.1 of the image
(ties: bounding box), then the ensemble among 1, 2, 4, 8. The sweep reads every block from one
lab.dift.extract call with all seven blocks per (timestep, prompt): a block's features are its channels of
that call, re-normalised. That is exactly what extract(blocks=[block]) gives for the 16 x 16 blocks; a
coarser block (4 x 4, 8 x 8) reaches the image size through the 16 x 16 grid (bilinear twice), so the
validation part also measures every block extracted alone at t = 261 to show the difference. Everything
reported on the test split is extracted with exactly the setting named.

Cross-class: same-named keypoints of different classes ("center" on all six; "bottom_left" and
"bottom_right" on square and triangle), from the first image of test pair j of one class into the second
image of test pair j of another, for the 15 class pairs.

Cost: seconds per image of lab.dift.extract (default batch_size 8) with ensemble 1 and 8, on the
embedded model at 64 x 64 and on lab.testing.sd15_sized_pipeline() (random SD-1.5-sized UNet, 860M, with
the tiny test VAE and a one-layer text encoder, so the UNet is what is timed) at 512 x 512.

Writes <out>/dift_pck.json, dift_pck.md and dift_sweep.png. The chosen setting is what
lab.dift.PRESETS["tinyworld"] should hold; the script says whether it does.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import lab
import lab.dift
from lab.tinyworld.world import BACKGROUNDS, COLORS, SHAPES, SIZES, TEXTURES, render, sample_scene

RESULTS = Path(__file__).parent / "results"
VAL_BASE, TEST_BASE = 40_000_000, 41_000_000
ALPHA = 0.1
IMAGE_SIZE = 64
PAPER = dict(timestep=261, blocks=("up_blocks.1",), ensemble=8)  # Tang et al.'s SD 2.1 setting
# "" and "a {shape}": TinyWorld's captions read "a red star"; the paper's template is "a photo of a {class}".
PROMPTS = ("empty", "class")
ENSEMBLES = (1, 2, 4, 8)
SWEEP_ENSEMBLE = 8


# -- The data ---------------------------------------------------------------------------------


@dataclass
class View:
    """One rendered image with its object's keypoints and bounding-box size."""

    image: np.ndarray  # uint8 (64, 64, 3)
    shape: str
    keypoints: dict[str, tuple[float, float]]
    bbox: float  # max(height, width) of the object's mask, px
    seed: int
    attributes: dict


def render_view(seed: int, **attributes) -> View:
    scene = sample_scene(seed, n_objects=1, **attributes)
    rendered = render(scene)
    rows, cols = np.nonzero(rendered.masks[0])
    obj = scene.objects[0]
    return View(
        rendered.image,
        obj.shape,
        {name: (float(x), float(y)) for name, (x, y) in rendered.keypoints[0].items()},
        float(max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)),
        seed,
        dict(
            color=obj.color,
            size=round(obj.size, 2),
            texture=obj.texture,
            background=scene.background,
            centre=(round(obj.cx, 2), round(obj.cy, 2)),
        ),
    )


def make_split(base: int, n_pairs: int) -> tuple[list[View], list[tuple[int, int, list[str]]]]:
    """Views 2i (source) and 2i + 1 (target) of pair i, and the pairs as (source, target, keypoint names)."""
    views, pairs = [], []
    for i in range(n_pairs):
        shape = SHAPES[i % len(SHAPES)]
        rng = np.random.default_rng(base + 2 * i)
        colors = rng.choice(list(COLORS), 2, replace=False)
        sizes = rng.permutation(SIZES)
        textures = rng.choice(TEXTURES, 2, replace=False)
        backgrounds = rng.choice(BACKGROUNDS, 2, replace=False)
        for k in range(2):
            views.append(
                render_view(
                    base + 2 * i + k,
                    shape=shape,
                    color=str(colors[k]),
                    size_label=str(sizes[k]),
                    texture=str(textures[k]),
                    background=str(backgrounds[k]),
                )
            )
        pairs.append((2 * i, 2 * i + 1, list(views[2 * i].keypoints)))
    return views, pairs


def cross_class_pairs(views: list[View], n_pairs: int) -> list[tuple[int, int, list[str]]]:
    """Source of test pair j of class a -> target of test pair j of class b, same-named keypoints only."""
    by_class = {shape: [i for i in range(n_pairs) if SHAPES[i % len(SHAPES)] == shape] for shape in SHAPES}
    pairs = []
    for a, b in itertools.combinations(SHAPES, 2):
        for i, j in zip(by_class[a], by_class[b]):
            names = [name for name in views[2 * i].keypoints if name in views[2 * j + 1].keypoints]
            pairs.append((2 * i, 2 * j + 1, names))
    return pairs


def prompts_for(views: list[View], prompt: str) -> list[str]:
    return [""] * len(views) if prompt == "empty" else [f"a {view.shape}" for view in views]


# -- Scoring ----------------------------------------------------------------------------------


def transfer(features, views, pairs, *, per_pair=None) -> list[dict]:
    """One record per transferred keypoint: its distance to the ground truth and both thresholds.
    features: a DiftFeatures holding every view (indices as in `views`), or None with per_pair(s, t)
    giving (DiftFeatures, source index, target index); "same place" when both are None."""
    records = []
    for p, (s, t, names) in enumerate(pairs):
        points = [views[s].keypoints[name] for name in names]
        if features is None and per_pair is None:
            where = np.floor(np.array(points))
        else:
            feats, si, ti = (features, s, t) if per_pair is None else per_pair(s, t)
            where = lab.dift.match_points(feats, points, source_index=si, target_index=ti)[0][0].numpy()
        truth = np.array([views[t].keypoints[name] for name in names])
        distance = np.linalg.norm(where + 0.5 - truth, axis=1)
        others = {n: np.linalg.norm(where + 0.5 - np.array(xy), axis=1) for n, xy in views[t].keypoints.items()}
        for k, (name, d) in enumerate(zip(names, distance)):
            nearest = min(others, key=lambda n: others[n][k])
            records.append(
                dict(
                    pair=p,
                    name=name,
                    shape=views[s].shape,
                    target_shape=views[t].shape,
                    distance=float(d),
                    bbox=views[t].bbox,
                    # a miss that lands on another keypoint of the target (a flip or a confusion)
                    on_other=bool(d > ALPHA * IMAGE_SIZE and others[nearest][k] <= ALPHA * IMAGE_SIZE),
                )
            )
    return records


def pck(records: list[dict], interval: bool = False, seed: int = 0) -> dict:
    """PCK@ALPHA of the image and of the target's bounding box; with interval=True, 95 % bootstrap
    intervals over pairs."""
    d = np.array([r["distance"] for r in records])
    hit_image = d <= ALPHA * IMAGE_SIZE
    hit_bbox = d <= ALPHA * np.array([r["bbox"] for r in records])
    out = dict(
        image=float(hit_image.mean()),
        bbox=float(hit_bbox.mean()),
        pairs=len({r["pair"] for r in records}),
        keypoints=len(records),
        median_px=float(np.median(d)),
        misses_on_another_keypoint=int(sum(r["on_other"] for r in records)),
    )
    if interval:
        pair_ids = np.array([r["pair"] for r in records])
        unique, inverse = np.unique(pair_ids, return_inverse=True)
        sums = [np.bincount(inverse, weights=h.astype(float)) for h in (hit_image, hit_bbox)]
        counts = np.bincount(inverse)
        rng = np.random.default_rng(seed)
        draws = rng.integers(len(unique), size=(2000, len(unique)))
        for key, total in zip(("image", "bbox"), sums):
            rates = total[draws].sum(1) / counts[draws].sum(1)
            out[f"{key}_ci"] = [float(np.percentile(rates, 2.5)), float(np.percentile(rates, 97.5))]
    return out


def breakdown(records: list[dict], key: str) -> dict:
    return {value: pck([r for r in records if r[key] == value]) for value in dict.fromkeys(r[key] for r in records)}


# -- Features ---------------------------------------------------------------------------------


def dift(pipe, views, prompt, timestep, blocks, ensemble):
    return lab.dift.extract(
        pipe,
        [v.image for v in views],
        prompt=prompts_for(views, prompt),
        timestep=timestep,
        blocks=list(blocks),
        ensemble=ensemble,
        batch_size=64,
        progress=False,
    )


def take(features, layout: dict, blocks) -> lab.dift.DiftFeatures:
    """The channels of `blocks` in a multi-block DiftFeatures, re-normalised (see the module docstring)."""
    parts = [features.features[:, layout[b][0] : layout[b][1]] for b in blocks]
    settings = dict(features.settings, blocks=list(blocks), read_from="all-block features")
    return lab.dift.DiftFeatures(F.normalize(torch.cat(parts, dim=1), dim=1), features.image_size, settings)


def pixel_features(arrays: np.ndarray, k: int, colour: str, centred: bool) -> lab.dift.DiftFeatures:
    """k x k patches of RGB or luminance in [-1, 1] at every pixel (replicate padding); centred: patch mean
    removed, so cosine is normalised cross-correlation."""
    x = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1
    if colour == "gray":
        x = (x * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
    n, channels, height, width = x.shape
    if k > 1:
        x = F.unfold(F.pad(x, (k // 2,) * 4, mode="replicate"), k).reshape(n, channels * k * k, height, width)
    if centred:
        x = x - x.mean(1, keepdim=True)
    name = variant_name((colour, k, centred))
    return lab.dift.DiftFeatures(
        x, (height, width), dict(baseline=f"pixels {name}", timestep=None, blocks=[name], ensemble=1)
    )


PIXEL_VARIANTS = (  # (colour, k, centred)
    [("rgb", k, False) for k in (1, 5, 9, 15, 21)]
    + [("rgb", k, True) for k in (5, 9, 15, 21)]
    + [("gray", k, True) for k in (5, 9, 15, 21)]
)


def variant_name(variant) -> str:
    colour, k, centred = variant
    return f"{colour} {k}x{k}{' centred' if centred else ''}"


def pixel_matcher(views, variant):
    def per_pair(s, t):
        return pixel_features(np.stack([views[s].image, views[t].image]), variant[1], variant[0], variant[2]), 0, 1

    return per_pair


def vae_features(pipe, views) -> lab.dift.DiftFeatures:
    with torch.no_grad():
        latents = torch.cat([lab.diffusion.encode_image(pipe, v.image) for v in views]).float()
    return lab.dift.DiftFeatures(
        latents,
        (IMAGE_SIZE, IMAGE_SIZE),
        dict(baseline="VAE posterior mean", timestep=None, blocks=["vae"], ensemble=1),
    )


def setting_name(s: dict) -> str:
    return f"t={s['timestep']}, {'+'.join(s['blocks'])}, ensemble {s['ensemble']}, prompt {s['prompt']}"


# -- The parts --------------------------------------------------------------------------------


def run_pck(pipe, args, log) -> dict:
    blocks = [site.name for site in lab.sites(pipe) if site.kind == "block"]
    val_views, val_pairs = make_split(VAL_BASE, args.val_pairs)
    test_views, test_pairs = make_split(TEST_BASE, args.pairs)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    out = dict(blocks=blocks, timesteps=timesteps)

    # Channel layout of the all-block features, and each block's grid.
    probe = {b: dift(pipe, val_views[:1], "empty", 261, [b], 1).features.shape[1:] for b in blocks}
    layout, start = {}, 0
    for b in blocks:
        layout[b] = (start, start + probe[b][0])
        start += probe[b][0]
    out["block_grid"] = {b: f"{probe[b][0]} ch at {probe[b][2]}x{probe[b][1]}" for b in blocks}
    out["alpha_bar"] = {str(t): float(pipe.scheduler.alphas_cumprod[t]) for t in timesteps}
    sd21 = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)  # SD 2.1: scaled_linear, no ZTSNR
    out["alpha_bar_sd21"] = {str(t): float(sd21[t]) for t in timesteps}

    # 1. Validation sweep: block x timestep x prompt, and pairs of blocks.
    log("validation sweep")
    sweep, all_block = {}, {}
    cells = list(itertools.product(PROMPTS, timesteps))
    for prompt, t in tqdm(cells, desc="sweep (validation)"):
        all_block[prompt, t] = dift(pipe, val_views, prompt, t, blocks, SWEEP_ENSEMBLE)
        for b in blocks:
            sweep[prompt, t, b] = pck(transfer(take(all_block[prompt, t], layout, [b]), val_views, val_pairs))
    pair_sweep = {}
    for (prompt, t), (a, b) in tqdm(
        list(itertools.product(cells, itertools.combinations(blocks, 2))), desc="block pairs (validation)"
    ):
        pair_sweep[prompt, t, a + "+" + b] = pck(
            transfer(take(all_block[prompt, t], layout, [a, b]), val_views, val_pairs)
        )
    candidates = {**sweep, **pair_sweep}
    prompt, timestep, chosen_blocks = max(candidates, key=lambda c: (candidates[c]["image"], candidates[c]["bbox"]))
    chosen_blocks = tuple(chosen_blocks.split("+"))
    del all_block
    out["sweep"] = [dict(prompt=p, timestep=t, blocks=b, **r) for (p, t, b), r in sweep.items()]
    out["pair_sweep"] = [dict(prompt=p, timestep=t, blocks=b, **r) for (p, t, b), r in pair_sweep.items()]

    # 2. The sweep's shortcut against each block extracted alone (t = 261, the chosen prompt).
    log("exact per-block check")
    out["slice_check"] = []
    for b in tqdm(blocks, desc="each block alone (validation, t=261)"):
        exact = pck(transfer(dift(pipe, val_views, prompt, 261, [b], SWEEP_ENSEMBLE), val_views, val_pairs))
        out["slice_check"].append(
            dict(blocks=b, prompt=prompt, timestep=261, exact=exact, sliced=sweep[prompt, 261, b])
        )

    # 3. Ensemble, on validation, with the chosen block(s), timestep and prompt, extracted exactly.
    ensemble_val = {}
    for e in tqdm(ENSEMBLES, desc="ensemble (validation)"):
        ensemble_val[e] = pck(transfer(dift(pipe, val_views, prompt, timestep, chosen_blocks, e), val_views, val_pairs))
    ensemble = max(ENSEMBLES, key=lambda e: (ensemble_val[e]["image"], ensemble_val[e]["bbox"], -e))
    out["ensemble_val"] = {str(e): r for e, r in ensemble_val.items()}
    chosen = dict(timestep=timestep, blocks=list(chosen_blocks), ensemble=ensemble, prompt=prompt)
    out["chosen"] = chosen
    log(f"chosen on validation: {setting_name(chosen)}")

    # 4. Pixel baselines on validation (variant chosen like DIFT's settings), the VAE for reference.
    pixel_val = {}
    for variant in tqdm(PIXEL_VARIANTS, desc="pixel variants (validation)"):
        pixel_val[variant] = pck(transfer(None, val_views, val_pairs, per_pair=pixel_matcher(val_views, variant)))
    pixel_best = max(PIXEL_VARIANTS, key=lambda v: (pixel_val[v]["image"], pixel_val[v]["bbox"]))
    out["pixel_val"] = {variant_name(v): r for v, r in pixel_val.items()}
    out["pixel_chosen"] = variant_name(pixel_best)
    out["vae_val"] = pck(transfer(vae_features(pipe, val_views), val_views, val_pairs))

    # 5. Test: the chosen setting, the paper's, the baselines; per class and keypoint; cross-class.
    log("test")
    methods = {
        "dift_chosen": dict(chosen),
        "dift_paper_empty": dict(PAPER, blocks=list(PAPER["blocks"]), prompt="empty"),
        "dift_paper_class": dict(PAPER, blocks=list(PAPER["blocks"]), prompt="class"),
        "dift_chosen_e1": dict(chosen, ensemble=1),
    }
    test, test_records, test_features = {}, {}, {}
    cross = cross_class_pairs(test_views, args.pairs)
    cross_out = {}
    for key, s in tqdm(methods.items(), desc="DIFT (test)"):
        feats = dift(pipe, test_views, s["prompt"], s["timestep"], s["blocks"], s["ensemble"])
        test_records[key] = transfer(feats, test_views, test_pairs)
        test[key] = dict(setting=s, **pck(test_records[key], interval=True))
        if key in ("dift_chosen", "dift_paper_class"):
            test_features[key] = feats
    pixel_per_pair = pixel_matcher(test_views, pixel_best)
    test_records["pixels"] = transfer(None, test_views, test_pairs, per_pair=pixel_per_pair)
    test["pixels"] = dict(setting=dict(baseline="pixels " + out["pixel_chosen"]), **pck(test_records["pixels"], True))
    rgb = transfer(None, test_views, test_pairs, per_pair=pixel_matcher(test_views, ("rgb", 1, False)))
    test["pixels_rgb"] = dict(setting=dict(baseline="pixels rgb 1x1 (the pixel's RGB)"), **pck(rgb, True))
    vae = vae_features(pipe, test_views)
    test_records["vae"] = transfer(vae, test_views, test_pairs)
    test["vae"] = dict(setting=dict(baseline="VAE posterior mean"), **pck(test_records["vae"], True))
    test_records["same_place"] = transfer(None, test_views, test_pairs)
    test["same_place"] = dict(setting=dict(baseline="same pixel"), **pck(test_records["same_place"], True))
    out["test"] = test
    out["test_by_class"] = {k: breakdown(test_records[k], "shape") for k in ("dift_chosen", "pixels", "vae")}
    out["test_by_keypoint"] = {k: breakdown(test_records[k], "name") for k in ("dift_chosen", "pixels", "vae")}

    log("cross-class")
    for key, feats in [
        ("dift_chosen", test_features["dift_chosen"]),
        ("vae", vae),
        ("pixels", None),
        ("same_place", None),
    ]:
        per_pair = pixel_per_pair if key == "pixels" else None
        records = transfer(feats, test_views, cross, per_pair=per_pair)
        centres = {
            f"{a}->{b}": pck([r for r in records if (r["shape"], r["target_shape"], r["name"]) == (a, b, "center")])
            for a, b in itertools.combinations(SHAPES, 2)
        }
        cross_out[key] = dict(
            all=pck(records, interval=True), by_name=breakdown(records, "name"), center_by_class_pair=centres
        )
        cross_out[key]["within_class_center"] = pck([r for r in test_records[key] if r["name"] == "center"])
    out["cross_class"] = cross_out

    out["splits"] = dict(
        validation=dict(
            base=VAL_BASE,
            pairs=len(val_pairs),
            keypoints=sum(len(n) for _, _, n in val_pairs),
            seeds=[VAL_BASE, VAL_BASE + 2 * len(val_pairs) - 1],
        ),
        test=dict(
            base=TEST_BASE,
            pairs=len(test_pairs),
            keypoints=sum(len(n) for _, _, n in test_pairs),
            seeds=[TEST_BASE, TEST_BASE + 2 * len(test_pairs) - 1],
        ),
        cross_class=dict(pairs=len(cross), keypoints=sum(len(n) for _, _, n in cross)),
    )
    moved = [
        np.hypot(*np.subtract(test_views[s].attributes["centre"], test_views[t].attributes["centre"]))
        for s, t, _ in test_pairs
    ]
    out["test_centre_shift_px"] = dict(
        median=float(np.median(moved)), min=float(np.min(moved)), max=float(np.max(moved))
    )
    return out


def run_cost(pipe, args, log, chosen: dict) -> dict:
    """Seconds per image of lab.dift.extract (default batch_size) at ensemble 1 and 8."""
    views, pairs = make_split(VAL_BASE, 8)
    images = [v.image for v in views]
    out = dict(embedded={}, sd15={})
    log("cost: embedded model")
    lab.dift.extract(pipe, images[:2], timestep=chosen["timestep"], blocks=chosen["blocks"], ensemble=1, progress=False)
    times = {1: [], 8: []}
    for _ in range(args.rounds):  # ensembles interleaved, so a burst of load hits both
        for e in times:
            start = time.perf_counter()
            feats = lab.dift.extract(
                pipe, images, timestep=chosen["timestep"], blocks=chosen["blocks"], ensemble=e, progress=False
            )
            times[e].append((time.perf_counter() - start) / len(images))
    for e, seconds in times.items():
        out["embedded"][str(e)] = dict(
            median_s=statistics.median(seconds), min_s=min(seconds), images=len(images), rounds=args.rounds
        )
    rounds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for s, t, names in pairs:
            lab.dift.match_points(feats, [views[s].keypoints[n] for n in names], source_index=s, target_index=t)
        rounds.append((time.perf_counter() - start) / len(pairs))
    out["embedded"]["match_s_per_pair"] = statistics.median(rounds)
    if not args.sd15_ensembles:
        return out

    log("cost: SD-1.5-sized UNet at 512x512")
    start = time.perf_counter()
    big = lab.testing.sd15_sized_pipeline()
    out["sd15"]["build_s"] = time.perf_counter() - start
    upscaled = [np.kron(image, np.ones((8, 8, 1), np.uint8)) for image in images[: args.sd15_images]]
    settings = lab.dift.PRESETS[lab.dift.preset_for(big)]
    out["sd15"]["setting"] = dict(
        timestep=settings["timestep"], blocks=list(settings["blocks"]), preset=lab.dift.preset_for(big)
    )
    lab.dift.extract(big, upscaled[:1], prompt="a photo of a star", ensemble=1, progress=False)  # warm-up
    for e in (int(x) for x in args.sd15_ensembles.split(",")):
        times = []
        for image in tqdm(upscaled, desc=f"SD-1.5-sized, ensemble {e}"):
            start = time.perf_counter()
            feats = lab.dift.extract(big, [image], prompt="a photo of a star", ensemble=e, progress=False)
            times.append(time.perf_counter() - start)
        out["sd15"][str(e)] = dict(seconds=times, mean_s=statistics.mean(times), images=len(times))
    start = time.perf_counter()
    lab.dift.match_points(feats, [(200.0, 200.0), (300.0, 260.0), (250.0, 330.0)], source_index=0, target_index=0)
    out["sd15"]["match_s_3_points"] = time.perf_counter() - start
    out["sd15"]["features"] = repr(feats)
    return out


# -- Output -----------------------------------------------------------------------------------


def plot_sweep(results: dict, path: Path) -> None:
    """Heat maps of validation PCK (block x timestep) per prompt and threshold, and PCK against t for the
    best single blocks and the chosen setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    blocks, timesteps, chosen = results["blocks"], results["timesteps"], results["chosen"]
    cells = {(c["prompt"], c["timestep"], c["blocks"]): c for c in results["sweep"] + results["pair_sweep"]}
    fig, axes = plt.subplots(2, 3, figsize=(17, 8.5), constrained_layout=True, width_ratios=[1, 1, 0.8])
    for row, metric in enumerate(("image", "bbox")):
        for col, prompt in enumerate(PROMPTS):
            ax = axes[row, col]
            grid = np.array([[cells[prompt, t, b][metric] for t in timesteps] for b in blocks])
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for i, j in itertools.product(range(len(blocks)), range(len(timesteps))):
                colour = "white" if grid[i, j] < 0.6 else "black"
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8, color=colour)
            ax.set_xticks(range(len(timesteps)), timesteps)
            ax.set_yticks(range(len(blocks)), [f"{b} ({results['block_grid'][b].split(' at ')[1]})" for b in blocks])
            ax.set_xlabel("timestep t")
            label = '""' if prompt == "empty" else '"a {class}"'
            ax.set_title(f"PCK@0.1 of the {'image (6.4 px)' if metric == 'image' else 'bounding box'}, prompt {label}")
            if 261 in timesteps:  # the paper's SD 2.1 setting
                corner = (timesteps.index(261) - 0.5, blocks.index("up_blocks.1") - 0.5)
                ax.add_patch(Rectangle(corner, 1, 1, fill=False, ec="red", lw=2, ls="--"))
        # PCK against t: the two best single blocks and the chosen pair, both prompts.
        ax = axes[row, 2]
        lines = ["down_blocks.0", "up_blocks.1", "up_blocks.2", "+".join(chosen["blocks"])]
        for k, b in enumerate(dict.fromkeys(lines)):
            for prompt, style in zip(PROMPTS, ("-", "--")):
                ax.plot(
                    range(len(timesteps)),
                    [cells[prompt, t, b][metric] for t in timesteps],
                    style,
                    marker="o",
                    ms=3,
                    color=f"C{k}",
                    label=f"{b}, {'empty' if prompt == 'empty' else 'class'} prompt",
                )
        ax.axvline(timesteps.index(261), color="red", ls=":", lw=1) if 261 in timesteps else None
        ax.set_xticks(range(len(timesteps)), timesteps)
        ax.set_xlabel("timestep t")
        ax.set_ylim(0, 1)
        ax.set_title(f"PCK@0.1 {metric} against t (validation)")
        ax.grid(alpha=0.3)
        if row == 0:
            ax.legend(fontsize=7, loc="lower left")
    fig.colorbar(im, ax=axes[:, :2], shrink=0.6, label="PCK (validation)")
    n = results["splits"]["validation"]
    fig.suptitle(
        f"DIFT on the embedded TinyWorld model. Validation: {n['pairs']} pairs / {n['keypoints']} keypoints per cell, "
        f"ensemble {SWEEP_ENSEMBLE}. Red dashed: the paper's SD 2.1 setting (t=261, up_blocks.1).\n"
        f"Chosen: {'+'.join(chosen['blocks'])}, t={chosen['timestep']}, "
        f"{'empty' if chosen['prompt'] == 'empty' else 'class'} prompt, ensemble {chosen['ensemble']}"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt(r: dict, key: str) -> str:
    ci = r.get(f"{key}_ci")
    return f"{r[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def write_markdown(results: dict, path: Path) -> None:
    meta, lines = results["meta"], []
    add = lines.append
    add("# DIFT on TinyWorld: semantic keypoint PCK\n")
    add(
        f"Written by `benchmarks/dift_pck.py` (protocol in its docstring). Validation and test measured "
        f"{meta['date']} by `{meta['command']}` ({meta['wall_s']:.0f} s for that part): {meta['machine']} (shared "
        f"with another process), torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['threads']} torch "
        f"threads; `uptime` load average at the start: {meta['load_start']}; at the end: {meta['load_end']}.\n"
    )
    if "test" in results:
        sp, chosen = results["splits"], results["chosen"]
        add(
            f"Pairs: two one-object renders of one shape class differing in colour, size (small/large), texture, "
            f"background and position (median centre shift {results['test_centre_shift_px']['median']:.1f} px on test). "
            f"Validation: {sp['validation']['pairs']} pairs, {sp['validation']['keypoints']} keypoints, scene seeds "
            f"{sp['validation']['seeds'][0]:,}–{sp['validation']['seeds'][1]:,}; test: {sp['test']['pairs']} pairs "
            f"({sp['test']['pairs'] // 6} per class), {sp['test']['keypoints']} keypoints, seeds "
            f"{sp['test']['seeds'][0]:,}–{sp['test']['seeds'][1]:,}. Nothing was chosen on test.\n"
        )
        add("## Test split\n")
        add(
            "PCK@0.1 with 95 % bootstrap intervals over pairs; image: 6.4 px; bbox: 0.1 × the target object's "
            "max(bbox h, w) (1.3–3.0 px here).\n"
        )
        add(
            "| method | setting | PCK@0.1 image | PCK@0.1 bbox | median error | misses landing on another keypoint "
            "| pairs | keypoints |"
        )
        add("|---|---|---|---|---|---:|---:|---:|")
        names = dict(
            dift_chosen="**DIFT, chosen on validation**",
            dift_paper_empty="DIFT, the paper's setting",
            dift_paper_class="DIFT, the paper's setting",
            dift_chosen_e1="DIFT, chosen, ensemble 1 (not chosen)",
            pixels="raw pixels (variant chosen on validation)",
            pixels_rgb="raw pixels, the pixel's own RGB (not chosen)",
            vae="VAE latent (posterior mean)",
            same_place="same pixel (no matching)",
        )
        for key, r in results["test"].items():
            s = r["setting"]
            setting = setting_name(s) if "timestep" in s else s["baseline"]
            add(
                f"| {names[key]} | {setting} | {fmt(r, 'image')} | {fmt(r, 'bbox')} | {r['median_px']:.2f} px | {r['misses_on_another_keypoint']} "
                f"| {r['pairs']} | {r['keypoints']} |"
            )
        best = results["test"]["dift_chosen"]
        margin = {k: best["image"] - results["test"][k]["image"] for k in ("pixels", "vae")}
        add(
            f"\nTargets: PCK@0.1 image ≥ 0.85 — {'met' if best['image'] >= 0.85 else 'not met'} ({best['image']:.3f}); "
            f"≥ 0.3 above both baselines — {'met' if min(margin.values()) >= 0.3 else 'not met'} "
            f"({margin['pixels']:+.3f} against pixels, {margin['vae']:+.3f} against the VAE latent).\n"
        )

        add("## Chosen on validation\n")
        add(
            f'`PRESETS["tinyworld"] = dict(timestep={chosen["timestep"]}, blocks={tuple(chosen["blocks"])!r}, '
            f"ensemble={chosen['ensemble']})`, prompt: {'the empty prompt' if chosen['prompt'] == 'empty' else 'the class prompt'} "
            "(`PRESETS` holds no prompt; pass it to `extract`).\n"
        )
        add(
            f"Block(s), timestep and prompt: the highest validation PCK@0.1 image among every single block × timestep × "
            f"prompt and every pair of blocks × timestep × prompt ({len(results['sweep'])} + "
            f"{len(results['pair_sweep'])} settings, ensemble {SWEEP_ENSEMBLE}). Then the ensemble, extracted exactly:\n"
        )
        add("| ensemble | " + " | ".join(results["ensemble_val"]) + " |")
        add("|---|" + "---:|" * len(results["ensemble_val"]))
        for key in ("image", "bbox"):
            add(f"| PCK@0.1 {key} | " + " | ".join(f"{r[key]:.3f}" for r in results["ensemble_val"].values()) + " |")
        px = results["pixel_val"]
        add(
            f"\nRaw-pixel variants on validation (PCK@0.1 image / bbox); chosen: **{results['pixel_chosen']}**. "
            f"VAE latent on validation: {results['vae_val']['image']:.3f} / {results['vae_val']['bbox']:.3f}.\n"
        )
        add("| variant | " + " | ".join(px) + " |")
        add("|---|" + "---:|" * len(px))
        add("| image / bbox | " + " | ".join(f"{r['image']:.2f} / {r['bbox']:.2f}" for r in px.values()) + " |")

        add("\n## Sweep (validation)\n")
        add("![timestep × block heat maps](dift_sweep.png)\n")
        timesteps, blocks = results["timesteps"], results["blocks"]
        cells = {(c["prompt"], c["timestep"], c["blocks"]): c for c in results["sweep"]}
        add("ᾱ_t of this model's schedule (zero terminal SNR) and of SD 2.1's (scaled linear) at each timestep:\n")
        add("| t | " + " | ".join(map(str, timesteps)) + " |")
        add("|---|" + "---:|" * len(timesteps))
        add("| ᾱ_t, this model | " + " | ".join(f"{results['alpha_bar'][str(t)]:.3f}" for t in timesteps) + " |")
        add("| ᾱ_t, SD 2.1 | " + " | ".join(f"{results['alpha_bar_sd21'][str(t)]:.3f}" for t in timesteps) + " |")
        for prompt in PROMPTS:
            label = '""' if prompt == "empty" else '"a {class}"'
            add(f"\nPCK@0.1 image, prompt {label} (rows: blocks, features grid):\n")
            add("| block | " + " | ".join(f"t={t}" for t in timesteps) + " |")
            add("|---|" + "---:|" * len(timesteps))
            for b in blocks:
                add(
                    f"| {b} ({results['block_grid'][b]}) | "
                    + " | ".join(f"{cells[prompt, t, b]['image']:.3f}" for t in timesteps)
                    + " |"
                )
        add(
            "\nEach block's best timestep (PCK@0.1 image; the paper, SD 2.1: semantic matching best at moderate t, "
            "261 with up_ft_index 1, geometric at small t):\n"
        )
        add("| block | " + " | ".join(f"prompt {p}" for p in PROMPTS) + " |")
        add("|---|" + "---|" * len(PROMPTS))
        for b in blocks:
            best = {p: max(timesteps, key=lambda t: cells[p, t, b]["image"]) for p in PROMPTS}
            add(f"| {b} | " + " | ".join(f"t={best[p]}: {cells[p, best[p], b]['image']:.3f}" for p in PROMPTS) + " |")
        top = sorted(results["pair_sweep"], key=lambda c: (-c["image"], -c["bbox"]))[:10]
        add("\nBest pairs of blocks, validation:\n")
        add("| blocks | t | prompt | PCK@0.1 image | bbox |")
        add("|---|---:|---|---:|---:|")
        for c in top:
            add(f"| {c['blocks']} | {c['timestep']} | {c['prompt']} | {c['image']:.3f} | {c['bbox']:.3f} |")
        add(
            "\nThe sweep's shortcut (a block's channels of the all-block features) against each block extracted "
            "alone, validation, t = 261:\n"
        )
        add("| block | sliced image / bbox | alone image / bbox |")
        add("|---|---:|---:|")
        for c in results["slice_check"]:
            add(
                f"| {c['blocks']} | {c['sliced']['image']:.3f} / {c['sliced']['bbox']:.3f} | "
                f"{c['exact']['image']:.3f} / {c['exact']['bbox']:.3f} |"
            )

        add("\n## Cross-class (test images)\n")
        cc = results["cross_class"]
        add(
            f"Same-named keypoints of different classes: {sp['cross_class']['pairs']} image pairs (15 class pairs), "
            f"{sp['cross_class']['keypoints']} keypoints ('center' everywhere; 'bottom_left' / 'bottom_right' between "
            "square and triangle, the only other shared names).\n"
        )
        add("| method | all PCK@0.1 image / bbox | center | center within class (test) | bottom_left | bottom_right |")
        add("|---|---:|---:|---:|---:|---:|")
        for key, r in cc.items():
            by = r["by_name"]
            add(
                f"| {key} | {r['all']['image']:.3f} / {r['all']['bbox']:.3f} | {by['center']['image']:.3f} "
                f"({by['center']['keypoints']}) | {r['within_class_center']['image']:.3f} | "
                f"{by.get('bottom_left', {}).get('image', float('nan')):.3f} | "
                f"{by.get('bottom_right', {}).get('image', float('nan')):.3f} |"
            )
        add(
            "\nDIFT 'center' by class pair (PCK@0.1 image): "
            + ", ".join(f"{k} {v['image']:.2f}" for k, v in cc["dift_chosen"]["center_by_class_pair"].items())
            + "\n"
        )

        add("## Test by class and by keypoint (PCK@0.1 image / bbox)\n")
        add("| class | DIFT chosen | pixels | VAE |")
        add("|---|---:|---:|---:|")
        for shape in SHAPES:
            add(
                f"| {shape} | "
                + " | ".join(
                    f"{results['test_by_class'][k][shape]['image']:.3f} / {results['test_by_class'][k][shape]['bbox']:.3f}"
                    for k in ("dift_chosen", "pixels", "vae")
                )
                + " |"
            )
        add("\n| keypoint | n | DIFT chosen | pixels | VAE |")
        add("|---|---:|---:|---:|---:|")
        for name, r in results["test_by_keypoint"]["dift_chosen"].items():
            add(
                f"| {name} | {r['keypoints']} | "
                + " | ".join(
                    f"{results['test_by_keypoint'][k][name]['image']:.3f} / {results['test_by_keypoint'][k][name]['bbox']:.3f}"
                    for k in ("dift_chosen", "pixels", "vae")
                )
                + " |"
            )

    if "cost" in results:
        c = results["cost"]
        add("\n## Cost\n")
        add(
            f"Measured {c['meta']['date']} by `{c['meta']['command']}` ({c['meta']['wall_s']:.0f} s; `uptime` load "
            f"average before: {c['meta']['load_start']}; after: {c['meta']['load_end']}). Seconds per image for "
            "`lab.dift.extract` (VAE encoding, prompt encoding and the UNet up to the last block needed; "
            "default batch_size 8 UNet rows).\n"
        )
        add("| model | image | setting | ensemble 1 | ensemble 8 | matching |")
        add("|---|---|---|---:|---:|---:|")
        e = c["embedded"]
        add(
            f"| embedded TinyWorld | 64×64 | t={c['embedded_setting']['timestep']}, {'+'.join(c['embedded_setting']['blocks'])} "
            f"| {e['1']['median_s'] * 1000:.1f} ms | {e['8']['median_s'] * 1000:.1f} ms | "
            f"{e['match_s_per_pair'] * 1000:.1f} ms per pair (all keypoints) |"
        )
        s = c.get("sd15", {})
        if s:
            ens = [k for k in s if k.isdigit()]
            cols = {k: f"{s[k]['mean_s']:.1f} s ({s[k]['images']} images)" for k in ens}
            add(
                f"| SD-1.5-sized random UNet | 512×512 | t={s['setting']['timestep']}, {'+'.join(s['setting']['blocks'])} "
                f"| {cols.get('1', '–')} | {cols.get('8', '–')} | {s['match_s_3_points']:.2f} s for 3 points |"
            )
            add(
                f"\nEmbedded: median of {e['1']['rounds']} rounds (ensembles interleaved) over {e['1']['images']} "
                f"images; fastest round: {e['1']['min_s'] * 1000:.1f} / {e['8']['min_s'] * 1000:.1f} ms. SD-1.5-sized: the random UNet of "
                "`lab.testing.sd15_sized_pipeline()` with the tiny test VAE and a one-layer text encoder (so the UNet "
                f"is nearly all of it; a real SD VAE encoder adds its own cost), built in {s['build_s']:.0f} s, one "
                "warm-up extraction first.\n"
            )
    path.write_text("\n".join(lines) + "\n")


def load_average() -> str:
    try:
        return (
            subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[1].strip()
        )
    except (OSError, IndexError):
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--pairs", type=int, default=120, help="test pairs (a multiple of 6 keeps classes balanced)")
    p.add_argument("--val-pairs", type=int, default=48, help="validation pairs")
    p.add_argument("--timesteps", default="0,50,100,200,261,400,600,800")
    p.add_argument(
        "--parts", default="pck,cost", help="pck (validation sweep + test) and/or cost; plot: redraw from the JSON"
    )
    p.add_argument("--sd15-ensembles", default="1,8", help="ensembles timed on the SD-1.5-sized UNet ('' skips it)")
    p.add_argument("--sd15-images", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="timing rounds on the embedded model")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "dift_pck.json"
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    parts = set(args.parts.split(","))
    start, load_start = time.time(), load_average()

    def log(message):
        tqdm.write(f"[{time.time() - start:6.0f} s, load {load_average()}] {message}")

    def meta(part_start: float, load_before: str) -> dict:
        import diffusers

        return dict(
            date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            machine=machine(),
            threads=args.threads,
            torch=torch.__version__,
            diffusers=diffusers.__version__,
            load_start=load_before,
            load_end=load_average(),
            wall_s=time.time() - part_start,
            command=shlex.join(["python", "benchmarks/dift_pck.py", *sys.argv[1:]]),
        )

    pipe = lab.load_pipeline() if parts & {"pck", "cost"} else None
    if pipe is not None:
        pipe.set_progress_bar_config(disable=True)
    if "pck" in parts:
        results = dict(results, **run_pck(pipe, args, log))
        results["meta"] = meta(start, load_start)
        timed = results.get("cost", {}).get("embedded_setting")
        if timed and timed != {k: results["chosen"][k] for k in ("timestep", "blocks")}:
            results.pop("cost")  # it timed another setting
    if "cost" in parts:
        if "chosen" not in results:
            raise SystemExit("run --parts pck first: the cost part times the chosen setting")
        setting = {k: results["chosen"][k] for k in ("timestep", "blocks")}
        part_start, load_before = time.time(), load_average()
        results["cost"] = dict(run_cost(pipe, args, log, results["chosen"]), embedded_setting=setting)
        results["cost"]["meta"] = meta(part_start, load_before)
    json_path.write_text(json.dumps(results, indent=1))
    if "test" in results:
        plot_sweep(results, args.out / "dift_sweep.png")
    write_markdown(results, args.out / "dift_pck.md")
    chosen = results.get("chosen")
    if chosen:
        preset = lab.dift.PRESETS["tinyworld"]
        line = (
            f'"tinyworld": dict(timestep={chosen["timestep"]}, blocks={tuple(chosen["blocks"])!r}, '
            f"ensemble={chosen['ensemble']})"
        )
        same = (preset["timestep"], tuple(preset["blocks"]), preset["ensemble"]) == (
            chosen["timestep"],
            tuple(chosen["blocks"]),
            chosen["ensemble"],
        )
        print(
            f"chosen on validation: {setting_name(chosen)}\nPRESETS {'already holds' if same else 'should hold'}: {line}"
        )
    print(f"wrote {json_path}, dift_pck.md{', dift_sweep.png' if 'test' in results else ''} in {args.out}")


if __name__ == "__main__":
    main()
