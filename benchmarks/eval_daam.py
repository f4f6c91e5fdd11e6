"""DAAM on TinyWorld: do the word heat maps segment what the judge finds in the generated image?

    python benchmarks/eval_daam.py                    # the embedded model, held-out prompts, 2 seeds (minutes on a CPU)
    python benchmarks/eval_daam.py --model /tmp/twsmoke/pipeline --limit 2 --seeds 1 --out /tmp/daam_smoke
                                                      # plumbing check (an untrained model: numbers mean nothing)

Protocol
    Prompts: lab.tinyworld.evaluate.prompt_split() (held-out scenes; sets "single", "pairs",
    "attributes"), each generated with every seed (one torch.Generator per image, seed = 0, 1, ...),
    20 DDIM steps, guidance 5, traced with lab.daam.trace_generation(per_step=True).
    Ground truth comes from the judge (lab.tinyworld.judge.read_image) on the generated image: the
    prompt's objects are matched to the detections as the judge's score_prompt does, and a word is
    scored against the matched detection's mask only where the judge agrees the model drew that
    attribute (otherwise the word is counted as skipped: there is no right answer for where "red"
    is when the model drew a blue circle).
        shape      the object noun ("circle")          -> its object's mask
        colour     "red"                               -> the mask of the object that word colours
        texture    "striped", "dotted"                 -> that object's mask
        size       "small", "large"                    -> that object's mask
        relation   "left", "right", "above", "below"   -> the union of both objects' masks (a relation
                   word is about the pair; reported on its own row, not mixed into object words)
    Repeated words ("a red circle left of a red square") are scored per occurrence (lab.token_indices).
    Score: IoU between the min-max normalised heat map thresholded at tau (DAAM's mask; tau = 0.4 in the paper)
    and the truth mask, averaged over (image, word) pairs of each class = mIoU. "Best tau" is the
    threshold of a 0.05..0.95 sweep that maximises the class's mIoU on these same images: an oracle,
    optimistic by construction, reported to separate map quality from threshold choice.
    Baselines, scored identically: a centred Gaussian blob (sigma = a quarter of the image side),
    and a uniform map (its mask is the whole image at every tau, so its IoU is the object's area share).
    Also: open-vocabulary maps (OVAM) of object nouns with the word alone as attribution prompt;
    OVAM with token optimisation (the paper's protocol: one token per shape class, optimised toward
    the judge's mask on one training image generated from a prompt outside the held-out split,
    then applied unchanged to every held-out image); and object-noun mIoU by step range (thirds of
    the schedule) x cross-attention resolution group.

Writes benchmarks/results/daam_tinyworld.json and .md (or --out PREFIX.json / .md).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import lab
import lab.pipelines
from lab.tinyworld import judge
from lab.tinyworld.evaluate import prompt_split
from lab.tinyworld.world import COLORS, SHAPES, WorldObject

THRESHOLDS = [round(0.05 * k, 2) for k in range(1, 20)]  # 0.05 .. 0.95, contains the paper's 0.4
PAPER_TAU = lab.daam.PAPER_THRESHOLD
WORD_CLASSES = ("shape", "colour", "texture", "size", "relation")
TRUTH_DEFINITIONS = {
    "shape": "mask of the detected object of that shape",
    "colour": "mask of the detected object of that colour",
    "texture": "mask of the detected object with that texture",
    "size": "mask of the detected object of that size",
    "relation": "union of both objects' masks",
}
RELATION_WORD = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "daam_tinyworld"


# ----------------------------------------------------------------------------------------------
# Ground truth: which words of a prompt to score, against which mask
# ----------------------------------------------------------------------------------------------


def words_to_score(prompt: str, image) -> tuple[list[dict], dict[str, int]]:
    """[{class, word, occurrence, truth}] for the words whose object the judge found as asked; skipped counts."""
    spec = judge.parse_prompt(prompt)
    reading = judge.read_image(image)
    expected = [
        WorldObject(
            shape=o["shape"],
            color=o["color"] or "",
            size=0.0,
            texture=o["texture"] or "",
            cx=float("nan"),
            cy=float("nan"),
        )
        for o in spec.objects
    ]
    found = judge.match(expected, reading.objects)
    words, skipped = [], defaultdict(int)
    seen = defaultdict(int)  # occurrences of each word so far, in prompt order
    attributes = (
        ("shape", "shape", "shape"),
        ("colour", "color", "color"),
        ("texture", "texture", "texture"),
        ("size", "size_label", "size_label"),
    )
    for asked, detection in zip(spec.objects, found):
        for word_class, prompt_key, detection_key in attributes:
            word = asked[prompt_key]
            if word is None or word == "plain":
                continue
            label = word  # held-out prompts name sizes "small" / "large", the judge's labels
            occurrence = seen[word]
            seen[word] += 1
            if detection is None or getattr(detection, detection_key) != label:
                skipped[word_class] += 1
                continue
            words.append({"class": word_class, "word": word, "occurrence": occurrence, "truth": detection.mask})
    if spec.relation is not None:
        pair_found = all(d is not None and d.shape == o["shape"] for o, d in zip(spec.objects, found))
        if pair_found:
            union = found[0].mask | found[1].mask
            words.append(
                {"class": "relation", "word": RELATION_WORD[spec.relation], "occurrence": None, "truth": union}
            )
        else:
            skipped["relation"] += 1
    return words, dict(skipped)


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------


def iou_per_threshold(normalized: np.ndarray, truth: np.ndarray) -> list[float]:
    """IoU of (normalized > tau) with the truth mask, for every tau of THRESHOLDS."""
    scores = []
    for tau in THRESHOLDS:
        predicted = normalized > tau
        union = np.logical_or(predicted, truth).sum()
        scores.append(float(np.logical_and(predicted, truth).sum() / union) if union else 0.0)
    return scores


def gaussian_blob(size: tuple[int, int]) -> np.ndarray:
    height, width = size
    y, x = np.mgrid[0:height, 0:width]
    sigma = min(height, width) / 4
    blob = np.exp(-(((x + 0.5 - width / 2) ** 2 + (y + 0.5 - height / 2) ** 2) / (2 * sigma**2)))
    return ((blob - blob.min()) / (blob.max() - blob.min())).astype(np.float32)


def thirds(num_steps: int) -> dict[str, range]:
    cut1, cut2 = round(num_steps / 3), round(2 * num_steps / 3)
    return {
        "early": range(0, cut1),
        "middle": range(cut1, cut2),
        "late": range(cut2, num_steps),
        "all": range(num_steps),
    }


def summarize(rows: list[list[float]]) -> dict:
    """mIoU at the paper's tau and at the best tau of the sweep, for a list of per-threshold IoU rows."""
    if not rows:
        return {"n": 0}
    mean = np.mean(rows, axis=0)
    best = int(np.argmax(mean))
    return {
        "n": len(rows),
        "miou_paper_tau": float(mean[THRESHOLDS.index(PAPER_TAU)]),
        "best_tau": THRESHOLDS[best],
        "miou_best_tau": float(mean[best]),
    }


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------


TOKEN_TRAINING_SEED = 1_000  # training images for token optimisation: seeds outside the evaluation's 0, 1, ...


def optimise_shape_tokens(pipe, steps: int, guidance: float, epochs: int = 100) -> dict[str, lab.daam.OptimizedToken]:
    """One OVAM token per shape class, each fitted to the judge's mask of that shape on one generated
    image ("a <colour> <shape>", the first of a few seeds where the judge finds the shape)."""
    tokens = {}
    colours = list(COLORS)
    for k, shape in enumerate(SHAPES):
        for attempt in range(6):
            prompt = f"a {colours[(k + attempt) % len(colours)]} {shape}"
            run = lab.daam.trace_generation(
                pipe,
                prompt,
                seed=TOKEN_TRAINING_SEED + attempt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                per_step=True,
                open_vocabulary=True,
                trajectory=False,
                self_attention_sites=None,
            )
            words, _ = words_to_score(prompt, run.image_arrays[0])
            truth = [item["truth"] for item in words if item["class"] == "shape"]
            if truth:
                tokens[shape] = run.optimize_token(shape, truth[0], epochs=epochs, progress=False)
                break
    return tokens


def evaluate(
    pipe,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance: float,
    batch: int,
    optimised_tokens: dict | None = None,
) -> dict:
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    rows = defaultdict(list)  # method/class -> per-threshold IoU rows
    table = defaultdict(list)  # (step range, group) -> per-threshold IoU rows, object nouns only
    skipped = defaultdict(int)
    instances = []
    blob = None
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        run = lab.daam.trace_generation(
            pipe,
            [prompt for prompt, _ in chunk],
            generator=[torch.Generator().manual_seed(seed) for _, seed in chunk],
            seed=None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            per_step=True,
            open_vocabulary=True,
            trajectory=False,
            self_attention_sites=None,
        )
        blob = gaussian_blob(run.image_size) if blob is None else blob
        uniform = np.ones(run.image_size, np.float32)
        groups = ["all"] + [name for name in run.site_groups if "x" in name]  # "all", then resolutions
        for image, (prompt, seed) in enumerate(chunk):
            words, skipped_here = words_to_score(prompt, run.image_arrays[image])
            for word_class, count in skipped_here.items():
                skipped[word_class] += count
            for item in words:
                word_class, word, occurrence, truth = item["class"], item["word"], item["occurrence"], item["truth"]
                scores = iou_per_threshold(run.heat_map(word, image=image, occurrence=occurrence).normalized(), truth)
                rows[("daam", word_class)].append(scores)
                rows[("gaussian", word_class)].append(iou_per_threshold(blob, truth))
                rows[("uniform", word_class)].append(iou_per_threshold(uniform, truth))
                instances.append(
                    {
                        "prompt": prompt,
                        "seed": seed,
                        "class": word_class,
                        "word": word,
                        "occurrence": occurrence,
                        "iou_paper_tau": scores[THRESHOLDS.index(PAPER_TAU)],
                    }
                )
                if word_class != "shape":
                    continue
                ovam = run.open_vocab_map(word, image=image).normalized()  # attribution prompt: the word alone
                rows[("ovam", "shape")].append(iou_per_threshold(ovam, truth))
                if optimised_tokens and word in optimised_tokens:
                    fitted = run.open_vocab_map(optimised_tokens[word], image=image).normalized()
                    rows[("ovam_optimised", "shape")].append(iou_per_threshold(fitted, truth))
                    rows[("daam_where_token", "shape")].append(scores)
                for range_name, step_range in thirds(run.num_steps).items():
                    for group in groups:
                        heat_map = run.heat_map(word, image=image, occurrence=occurrence, steps=step_range, sites=group)
                        table[(range_name, group)].append(iou_per_threshold(heat_map.normalized(), truth))
        print(f"  {min(start + batch, len(jobs))}/{len(jobs)} images", flush=True)

    by_class = {}
    for word_class in WORD_CLASSES:
        by_class[word_class] = {
            "truth": TRUTH_DEFINITIONS[word_class],
            "skipped": skipped.get(word_class, 0),
            "daam": summarize(rows[("daam", word_class)]),
            "gaussian": summarize(rows[("gaussian", word_class)]),
            "uniform": summarize(rows[("uniform", word_class)]),
        }
    object_words = [row for word_class in ("shape", "colour", "texture", "size") for row in rows[("daam", word_class)]]
    return {
        "by_class": by_class,
        "object_words_all_classes": summarize(object_words),
        "ovam_shape_word_alone": summarize(rows[("ovam", "shape")]),
        "ovam_optimised_tokens": summarize(rows[("ovam_optimised", "shape")]),
        "daam_same_images_as_optimised": summarize(rows[("daam_where_token", "shape")]),
        "optimised_token_classes": sorted(optimised_tokens or {}),
        "steps_by_resolution": {
            f"{range_name} | {group}": summarize(scores) for (range_name, group), scores in table.items()
        },
        "instances": instances,
    }


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        "# DAAM on TinyWorld",
        "",
        f"Model `{s['model']}`, {s['images']} images ({s['prompts']} held-out prompts x seeds {s['seeds']}), "
        f"{s['steps']} steps, guidance {s['guidance']}; {s['seconds']:.0f} s on {s['machine']}. Generated by "
        "`benchmarks/eval_daam.py` (protocol in its docstring).",
        "",
        f"mIoU of the thresholded word map with the judge's mask of what the word names. tau = {PAPER_TAU} is the "
        "paper's threshold; best tau is chosen on these same images (an oracle, optimistic).",
        "",
        "| word class | truth | scored | skipped | DAAM tau=0.4 | DAAM best (tau) | Gaussian tau=0.4 | Gaussian best (tau) | uniform |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for word_class, row in results["by_class"].items():
        daam, gaussian, uniform = row["daam"], row["gaussian"], row["uniform"]
        if not daam["n"]:
            lines.append(f"| {word_class} | {row['truth']} | 0 | {row['skipped']} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {word_class} | {row['truth']} | {daam['n']} | {row['skipped']} | {fmt(daam['miou_paper_tau'])} | "
            f"{fmt(daam['miou_best_tau'])} ({daam['best_tau']}) | {fmt(gaussian['miou_paper_tau'])} | "
            f"{fmt(gaussian['miou_best_tau'])} ({gaussian['best_tau']}) | {fmt(uniform['miou_paper_tau'])} |"
        )
    ovam = results["ovam_shape_word_alone"]
    if ovam["n"]:
        lines += [
            "",
            f"Open-vocabulary maps (OVAM) of object nouns, attribution prompt = the word alone: "
            f"mIoU {fmt(ovam['miou_paper_tau'])} at tau=0.4, {fmt(ovam['miou_best_tau'])} at tau={ovam['best_tau']} "
            f"(n = {ovam['n']}; same truth as the shape row).",
        ]
    fitted, daam_same = results.get("ovam_optimised_tokens", {"n": 0}), results.get("daam_same_images_as_optimised", {})
    if fitted["n"]:
        lines += [
            "",
            f"OVAM with token optimisation (one token per shape class, fitted on one training image each, "
            f"classes {', '.join(results['optimised_token_classes'])}): mIoU {fmt(fitted['miou_paper_tau'])} "
            f"at tau=0.4, {fmt(fitted['miou_best_tau'])} at tau={fitted['best_tau']} (n = {fitted['n']}); "
            f"DAAM on the same words: {fmt(daam_same['miou_paper_tau'])} at tau=0.4.",
        ]
    table = results["steps_by_resolution"]
    if table:
        groups = list(dict.fromkeys(key.split(" | ")[1] for key in table))
        lines += [
            "",
            "Object nouns (shape words), DAAM mIoU at tau=0.4 by step range (thirds of the schedule, "
            "early = noisiest) and cross-attention resolution group:",
            "",
            "| steps | " + " | ".join(groups) + " |",
            "|---|" + "---:|" * len(groups),
        ]
        for range_name in ("early", "middle", "late", "all"):
            cells = [fmt(table.get(f"{range_name} | {group}", {}).get("miou_paper_tau")) for group in groups]
            lines.append(f"| {range_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=None, help="pipeline folder or hub id (default: the embedded TinyWorld model)"
    )
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt (0, 1, ...)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sets", default="single,pairs,attributes", help="prompt sets of prompt_split()")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each set (smoke tests)")
    parser.add_argument("--no-token-optimisation", action="store_true", help="skip the OVAM token optimisation row")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output prefix: writes PREFIX.json and PREFIX.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    pipe = lab.pipelines.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    split = prompt_split()
    prompts = [prompt for name in args.sets.split(",") for prompt in split[name][: args.limit]]
    seeds = list(range(args.seeds))
    print(f"DAAM on TinyWorld: {len(prompts)} prompts x {len(seeds)} seeds", flush=True)
    started = time.perf_counter()
    tokens = {} if args.no_token_optimisation else optimise_shape_tokens(pipe, args.steps, args.guidance)
    results = evaluate(pipe, prompts, seeds, args.steps, args.guidance, args.batch, tokens)
    results["settings"] = {
        "model": args.model or "embedded TinyWorld (lab/models/tinyworld-sd)",
        "sets": args.sets,
        "prompts": len(prompts),
        "seeds": seeds,
        "images": len(prompts) * len(seeds),
        "steps": args.steps,
        "guidance": args.guidance,
        "thresholds": THRESHOLDS,
        "seconds": time.perf_counter() - started,
        "machine": f"{platform.machine()} CPU, {args.threads} torch thread(s)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
