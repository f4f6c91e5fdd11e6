"""Concept erasing (ESD-x, ESD-u, UCE) and Concept Sliders on TinyWorld, read back by the judge.

    python benchmarks/erasing.py erase   [--methods uce esd-x esd-u] [--concepts star red]
    python benchmarks/erasing.py scaling                 # UCE erasing 1..6 shapes at once
    python benchmarks/erasing.py sliders                 # size and texture sliders, alone and together
    python benchmarks/erasing.py debias                  # UCE debiasing the size of "a star"

Every part chooses its settings on the validation split and reports the chosen ones on the test split; the
choice rule reads validation numbers only (written down in the results file with every candidate's validation
row). Prompts are TinyWorld captions of scenes drawn from seeds the model never trained on (sample_scene; training
uses seeds below 60,000): validation 46,000,000 + k, test 46,500,000 + k, one image per prompt, its own seed.
The model's defaults: DDIM, 25 steps, guidance 5.

erase: for a concept c ("star" a shape, "red" a colour)
  named      one-object scenes with c, fixed_caption ("a large striped red star"); erased = the judge finds
             no object of shape c / colour c in the image
  other      one-object scenes without c; the judge's accuracy (shape and colour as asked) edited / unedited
  templates  (test) the named scenes captioned with TinyWorld's other templates (world.caption: "one star",
             "a picture of a small red star on the grass", ...), never the words any edit was made from
  pairs      (test) two-object scenes whose first object is c: erased as above, and the other object still
             there (shape and colour)
  Candidates: UCE (λ = 0.5, the paper's) with or without the concept's siblings preserved (the other shapes or
  colours) and erase_scale 1 or 3, and "phrased": the concept erased also in the short captions that name it with
  each colour (a shape) or each shape (a colour), "a red star", with the siblings preserved the same way (UCE edits
  the one row where the concept alone is encoded; a word that has read other words is another row); ESD (η = 1, the paper's) at lr 3e-4 and 1e-3 for --iterations iterations.
  Chosen: the highest validation erased share among those keeping ≥ 90 % of the unedited accuracy (else the
  best kept), ties by accuracy.
scaling: UCE with the star's chosen settings, erasing the first k of world.SHAPES (k = 1..6) and preserving the
  rest: erased share on prompts naming an erased shape, accuracy (relative to unedited) on prompts naming a
  kept one; test split, 8 prompts per shape.
sliders: size (positive "large", negative "small") and texture ("striped" / "plain"), target "" (every
  image), rank 4, alpha 1, η 4 (the reference's settings); candidates: trained on scale +1 only (reference) or
  on ±1 (symmetric), each applied from t = 800 on (the reference's start_noise) or at every step (TinyWorld decides
  an object's size in its noisiest steps). Prompts name shape and colour only ("a red
  star"; for the texture slider every second one "a striped red star"); per prompt and seed, the judge's size (object extent, px) / stripe score (share of the object's
  pixels that are dark ink) at scales −2..2, Spearman against the scale; kept = shape and colour read as at
  scale 0. Chosen by mean validation Spearman among those keeping ≥ 90 %; the test split is read
  for the chosen one only. Independence (test): both sliders
  on a 3 × 3 grid of scales {−2, 0, 2}; each score's Spearman with its own slider's scale and with the other's.
debias: UCE debiasing (lab.uce_debias) of "a star" over the attributes "a small star" / "a large star" (phrases:
  the bare words "small" / "large" sit at position 1, where every prompt's first word sits, and moving them moved
  "a circle" as much as "a star" in a first trial of 4 images), the judge as classifier, "a circle"
  preserved, desired 50/50 and 80/20; the loop generates on its own seeds (--images per round), the result is
  measured on --test test seeds, for "a star" and for "a circle".
Shares come with a 95 % Wilson interval; n is the number of images each rests on. Wall time and the machine's
load average are recorded with every training (2 CPU cores shared with other work unless said otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import lab
from lab.tinyworld.judge import read_image, score_prompt
from lab.tinyworld.world import COLORS, SHAPES, caption, fixed_caption, sample_scene

RESULTS = Path(__file__).parent / "results"
SEEDS = {"validation": 46_000_000, "test": 46_500_000}
STEPS, GUIDANCE, BATCH = 25, 5.0, 16
KEEP_TARGET = 0.9


# ----------------------------------------------------------------------------------------- prompts and judging


def kind_of(concept: str) -> str:
    if concept in SHAPES:
        return "shape"
    if concept in COLORS:
        return "color"
    raise SystemExit(f"{concept!r} is neither a TinyWorld shape {SHAPES} nor a colour {tuple(COLORS)}")


def siblings(concept: str) -> list[str]:
    return [c for c in (SHAPES if kind_of(concept) == "shape" else COLORS) if c != concept]


def phrasings(concept: str) -> list[str]:
    """The concept in short captions: "a red star", "an orange star", ... (a shape) or "a red circle", ... (a colour)."""
    phrases = (
        [f"{colour} {concept}" for colour in COLORS]
        if kind_of(concept) == "shape"
        else [f"{concept} {s}" for s in SHAPES]
    )
    return [("an " if p[0] in "aeiou" else "a ") + p for p in phrases]


def prompts_for(concept: str, split: str, n: int) -> dict[str, list[tuple[str, int]]]:
    """(prompt, seed) lists: named, other, templates and pairs (module docstring)."""
    kind, base = kind_of(concept), SEEDS[split] + 10_000 * (SHAPES + tuple(COLORS)).index(concept)
    named, other, templates, pairs = [], [], [], []
    for k in range(n):
        scene = sample_scene(base + k, n_objects=1, **{kind: concept})
        named.append((fixed_caption(scene), base + k))
        for j in range(50):  # a natural caption that names c (a colour may be left out of one)
            text = caption(scene, rng=base + k + 1000 * j)
            if concept in text.split():
                templates.append((text, base + k))
                break
        seed = base + 3000 + k
        while getattr(sample_scene(seed, n_objects=1).objects[0], kind) == concept:
            seed += 100_000
        other.append((fixed_caption(sample_scene(seed, n_objects=1)), seed))
        seed = base + 6000 + k
        while getattr(sample_scene(seed, n_objects=2, **{kind: concept}).objects[1], kind) == concept:
            seed += 100_000
        pairs.append((fixed_caption(sample_scene(seed, n_objects=2, **{kind: concept})), seed))
    return {"named": named, "other": other, "templates": templates, "pairs": pairs}


def generate(pipe, items: list[tuple[str, int]]) -> list[np.ndarray]:
    images = []
    for i in range(0, len(items), BATCH):
        chunk = items[i : i + BATCH]
        generators = [torch.Generator().manual_seed(seed) for _, seed in chunk]
        out = pipe([p for p, _ in chunk], num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators,
                   output_type="np")  # fmt: skip
        images += list((out.images * 255).round().astype(np.uint8))
    return images


def has_concept(image: np.ndarray, concept: str) -> bool:
    attribute = "shape" if kind_of(concept) == "shape" else "color"
    return any(getattr(d, attribute) == concept for d in read_image(image).objects)


def other_object_kept(prompt: str, image: np.ndarray) -> bool:
    second = score_prompt(prompt, image)["objects"][1:]
    return bool(second) and second[0]["present"]


def wilson(k: int, n: int) -> list[float]:
    if n == 0:
        return [float("nan")] * 2
    p, z = k / n, 1.96
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [round(centre - half / (1 + z * z / n), 4), round(centre + half / (1 + z * z / n), 4)]


def share(flags: list[bool]) -> dict:
    k, n = int(sum(flags)), len(flags)
    return {"share": round(k / n, 4) if n else None, "ci95": wilson(k, n), "n": n}


def erase_scores(pipe, sets: dict, concept: str, baseline: dict | None = None) -> dict:
    """The judge's readings for one edited (or unedited) pipeline; relative accuracy when baseline is given."""
    scores = {}
    images = generate(pipe, sets["named"])
    scores["erased"] = share([not has_concept(im, concept) for im in images])
    images = generate(pipe, sets["other"])
    scores["accuracy"] = share([score_prompt(p, im)["all_present"] for (p, _), im in zip(sets["other"], images)])
    if "templates" in sets:
        images = generate(pipe, sets["templates"])
        scores["templates_erased"] = share([not has_concept(im, concept) for im in images])
        images = generate(pipe, sets["pairs"])
        scores["pairs_erased"] = share([not has_concept(im, concept) for im in images])
        scores["pairs_other_kept"] = share([other_object_kept(p, im) for (p, _), im in zip(sets["pairs"], images)])
    if baseline is not None:
        base = baseline["accuracy"]["share"]
        scores["accuracy_relative"] = round(scores["accuracy"]["share"] / base, 4) if base else None
    return scores


def machine() -> dict:
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }


def write(name: str, data: dict, markdown: list[str]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))


def fmt(s: dict | None) -> str:
    if not s or s.get("share") is None:
        return "–"
    lo, hi = s["ci95"]
    return f"{100 * s['share']:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}] (n={s['n']})"


# ----------------------------------------------------------------------------------------------- erase


def candidates(method: str, concept: str, iterations: int) -> list[dict]:
    if method == "uce":
        return [
            {"preserve": preserve, "erase_scale": scale, "lam": 0.5}
            for preserve in (None, "siblings")
            for scale in (1.0, 3.0)
        ] + [{"preserve": "siblings", "erase_scale": 1.0, "lam": 0.5, "phrased": True}]
    return [{"lr": lr, "iterations": iterations, "eta": 1.0} for lr in (3e-4, 1e-3)]


def make_edit(pipe, method: str, concept: str, settings: dict):
    started, load = time.perf_counter(), os.getloadavg()[0]
    if method == "uce":
        erase = [concept] + (phrasings(concept) if settings.get("phrased") else [])
        preserve = None
        if settings["preserve"] == "siblings":
            preserve = siblings(concept) + [p for c in siblings(concept) for p in phrasings(c)] * bool(
                settings.get("phrased")
            )
        edit = lab.uce.erase(pipe, erase, preserve=preserve, lam=settings["lam"], erase_scale=settings["erase_scale"])
    else:
        edit = lab.esd.erase(pipe, concept, method=method.removeprefix("esd-"), lr=settings["lr"],
                             iterations=settings["iterations"], eta=settings["eta"])  # fmt: skip
    seconds = time.perf_counter() - started
    return edit, {"seconds": round(seconds, 3), "load_average_at_start": round(load, 2)}


def choose(rows: list[dict]) -> dict:
    keeping = [r for r in rows if (r["validation"]["accuracy_relative"] or 0) >= KEEP_TARGET] or rows
    return max(keeping, key=lambda r: (r["validation"]["erased"]["share"], r["validation"]["accuracy_relative"]))


def run_erase(args) -> None:
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    for concept in args.concepts:  # one results file per concept, so concepts can run in parallel processes
        out_file = RESULTS / f"erasing_{concept}{'_' + args.tag if args.tag else ''}.json"
        data = json.loads(out_file.read_text()) if out_file.exists() and args.resume else {"runs": {}}
        data.update({"machine": machine(), "steps": STEPS, "guidance": GUIDANCE, "keep_target": KEEP_TARGET})
        sets = {s: prompts_for(concept, s, args.n[s]) for s in ("validation", "test")}
        sets["validation"] = {k: sets["validation"][k] for k in ("named", "other")}
        base = {s: erase_scores(pipe, sets[s], concept) for s in sets}
        data["runs"]["unedited"] = base
        for method in args.methods:
            rows = data["runs"].get(method, {}).get("candidates", [])
            done = [r["settings"] for r in rows]
            main_file = RESULTS / f"erasing_{concept}.json"
            if args.tag and main_file.exists():  # a parallel run: only what the main run does not have
                done += [
                    r["settings"]
                    for r in json.loads(main_file.read_text())["runs"].get(method, {}).get("candidates", [])
                ]
            todo = [c for c in candidates(method, concept, args.iterations) if c not in done]
            if not todo:
                continue
            for settings in todo:
                edit, timing = make_edit(pipe, method, concept, settings)
                with edit:
                    row = {"settings": settings, "timing": timing}
                    for s in ("validation", "test"):
                        row[s] = erase_scores(pipe, sets[s], concept, base[s])
                rows.append(row)
                print(concept, method, settings, timing, row["validation"]["erased"], flush=True)
                data["runs"][method] = {"candidates": rows}
                out_file.write_text(json.dumps(data, indent=1) + "\n")  # a checkpoint: --resume skips what is done
            data["runs"][method]["chosen"] = choose(rows)["settings"]
        out_file.write_text(json.dumps(data, indent=1) + "\n")
    report()


def merged(concept: str) -> dict:
    """erasing_<concept>.json with the candidates of every erasing_<concept>_<tag>.json (runs made in parallel
    processes) added, and each method's choice made again over all of them."""
    data = json.loads((RESULTS / f"erasing_{concept}.json").read_text())
    for extra in sorted(RESULTS.glob(f"erasing_{concept}_*.json")):
        for method, run in json.loads(extra.read_text())["runs"].items():
            if method != "unedited":
                mine = data["runs"].setdefault(method, {"candidates": []})["candidates"]
                mine += [r for r in run["candidates"] if r["settings"] not in [m["settings"] for m in mine]]
    for method, run in data["runs"].items():
        if method != "unedited":
            run["chosen"] = choose(run["candidates"])["settings"]
    return data


def report() -> None:
    """erasing.md (and erasing_chosen.json) from every erasing_<concept>[_<tag>].json there is."""
    concepts = sorted({f.stem.split("_")[1] for f in RESULTS.glob("erasing_*.json")} & set(SHAPES + tuple(COLORS)))
    data = {c: merged(c) for c in concepts}
    chosen = {c: {m: r["chosen"] for m, r in d["runs"].items() if m != "unedited"} for c, d in data.items()}
    (RESULTS / "erasing_chosen.json").write_text(json.dumps(chosen, indent=1) + "\n")
    lines = erase_markdown(data)
    (RESULTS / "erasing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def erase_markdown(data: dict) -> list[str]:
    first = next(iter(data.values()))
    lines = [
        "# Concept erasing on TinyWorld (test split; settings chosen on validation)",
        "",
        f"Written by benchmarks/erasing.py erase, {first['machine']['date']}, {first['machine']['threads']} torch "
        f"thread(s) per process, DDIM {first['steps']} steps, guidance {first['guidance']}. Erased: the judge finds no object with "
        "the concept among images of prompts that name it (target ≥ 95 %). Kept: the judge's accuracy on prompts "
        "that do not name it, relative to the unedited model (target ≥ 90 %). Templates: other caption forms; "
        "pairs: two-object prompts (erased, and the other object still there). Wall time: the edit's own "
        "(training included), load average at its start in brackets.",
        "",
        "| concept | method | settings | erased | kept (relative) | templates erased | pairs erased | "
        "pairs: other kept | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for concept, d in data.items():
        runs = d["runs"]
        base = runs["unedited"]["test"]
        lines.append(
            f"| {concept} | unedited | – | {fmt(base['erased'])} | {fmt(base['accuracy'])} (1.00) | "
            f"{fmt(base['templates_erased'])} | {fmt(base['pairs_erased'])} | {fmt(base['pairs_other_kept'])} | – |"
        )
        for method, run in runs.items():
            if method == "unedited" or "chosen" not in run:
                continue
            row = next(r for r in run["candidates"] if r["settings"] == run["chosen"])
            t = row["test"]
            settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items())
            lines.append(
                f"| {concept} | {method} | {settings} | {fmt(t['erased'])} | {fmt(t['accuracy'])} "
                f"({t['accuracy_relative']:.2f}) | {fmt(t['templates_erased'])} | {fmt(t['pairs_erased'])} | "
                f"{fmt(t['pairs_other_kept'])} | {row['timing']['seconds']:.2f} s ({row['timing']['load_average_at_start']}) |"
            )
    lines += ["", "Validation (every candidate; the choice reads only these):", "",
              "| concept | method | settings | erased | kept (relative) |", "|---|---|---|---|---|"]  # fmt: skip
    for concept, d in data.items():
        for method, run in d["runs"].items():
            if method == "unedited":
                continue
            for r in run["candidates"]:
                v = r["validation"]
                mark = " (chosen)" if r["settings"] == run.get("chosen") else ""
                settings = ", ".join(f"{k}={v_}" for k, v_ in r["settings"].items())
                lines.append(f"| {concept} | {method} | {settings}{mark} | {fmt(v['erased'])} | "
                             f"{fmt(v['accuracy'])} ({v['accuracy_relative']:.2f}) |")  # fmt: skip
    return lines


# ---------------------------------------------------------------------------------------------- scaling


def run_scaling(args) -> None:
    chosen = merged("star")["runs"]["uce"]["chosen"]
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    per_shape = {s: prompts_for(s, "test", args.per_shape)["named"] for s in SHAPES}
    images = {s: generate(pipe, per_shape[s]) for s in SHAPES}
    base = {s: [score_prompt(p, im)["all_present"] for (p, _), im in zip(per_shape[s], images[s])] for s in SHAPES}
    rows = []
    for k in range(1, len(SHAPES) + 1):
        erased, kept = list(SHAPES[:k]), list(SHAPES[k:])
        preserve = kept if chosen["preserve"] == "siblings" and kept else None
        with lab.uce.erase(pipe, erased, preserve=preserve, lam=chosen["lam"], erase_scale=chosen["erase_scale"]) as e:
            gone = [not has_concept(im, s) for s in erased for im in generate(pipe, per_shape[s])]
            right = [score_prompt(p, im)["all_present"] for s in kept
                     for (p, _), im in zip(per_shape[s], generate(pipe, per_shape[s]))]  # fmt: skip
            seconds = e.seconds
        base_right = [b for s in kept for b in base[s]]
        relative = (sum(right) / len(right)) / (sum(base_right) / len(base_right)) if kept else None
        rows.append({"k": k, "erased": erased, "erased_share": share(gone), "kept_accuracy": share(right),
                     "kept_relative": None if relative is None else round(relative, 4), "seconds": round(seconds, 3)})  # fmt: skip
        print(rows[-1], flush=True)
    data = {"machine": machine(), "settings": chosen, "per_shape": args.per_shape, "rows": rows}
    lines = [
        "# UCE: erasing 1 to 6 shapes at once (test split)",
        "",
        f"Settings: the star's chosen UCE settings ({chosen}), the shapes not erased preserved when those settings "
        f"preserve siblings. {args.per_shape} prompts per shape, one image each. Written by benchmarks/erasing.py "
        f"scaling, {data['machine']['date']}.",
        "",
        "| shapes erased | erased | kept accuracy | kept relative to unedited | edit time |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        rel = "–" if r["kept_relative"] is None else f"{r['kept_relative']:.2f}"
        lines.append(f"| {r['k']} ({', '.join(r['erased'])}) | {fmt(r['erased_share'])} | "
                     f"{fmt(r['kept_accuracy'])} | {rel} | {r['seconds']:.3f} s |")  # fmt: skip
    write("erasing_scaling", data, lines)
    plot_scaling(rows)


def plot_scaling(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ks = [r["k"] for r in rows]
    ax.plot(ks, [r["erased_share"]["share"] for r in rows], "o-", label="erased")
    ax.plot(ks, [r["kept_relative"] if r["kept_relative"] is not None else np.nan for r in rows], "s-",
            label="kept (relative)")  # fmt: skip
    ax.set(xlabel="shapes erased at once", ylabel="share", ylim=(0, 1.1), title="UCE on TinyWorld")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "erasing_scaling.png", dpi=120)


# ---------------------------------------------------------------------------------------------- debias


def size_of(shape: str, named: bool = False):
    """The judge as UCE's attribute classifier: the size label of the largest `shape` found, else None;
    named: the label as the attribute prompt "a small star" instead of "small"."""

    def classify(image) -> str | None:
        found = [d for d in read_image(np.asarray(image)).objects if d.shape == shape]
        label = max(found, key=lambda d: d.mask.sum()).size_label if found else None
        return f"a {label} {shape}" if named and label else label

    return classify


def size_shares(pipe, prompt: str, shape: str, seeds: range) -> dict:
    labels = [size_of(shape)(im) for im in generate(pipe, [(prompt, s) for s in seeds])]
    return {label: round(labels.count(label) / len(labels), 4) for label in ("small", "large", None)} | {
        "n": len(labels)
    }


def run_debias(args) -> None:
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    loop_seed, test = SEEDS["validation"] + 300_000, range(SEEDS["test"] + 300_000, SEEDS["test"] + 300_000 + args.test)
    rows = []
    base = {p: size_shares(pipe, f"a {p}", p, test) for p in ("star", "circle")}
    for desired in ([0.5, 0.5], [0.8, 0.2]):
        started, load = time.perf_counter(), os.getloadavg()[0]
        attributes = ["a small star", "a large star"]  # phrases: their last token is "star" having read the size
        edit = lab.uce_debias.debias(pipe, ["a star"], attributes, size_of("star", named=True), desired=desired,
                                     preserve=["a circle"], images=args.images, seed=loop_seed,
                                     num_inference_steps=STEPS, guidance_scale=GUIDANCE)  # fmt: skip
        with edit:
            seconds = time.perf_counter() - started
            after = {p: size_shares(pipe, f"a {p}", p, test) for p in ("star", "circle")}
        rows.append({"desired_small_large": desired, "rounds": len(edit.history), "converged": edit.converged,
                     "alphas": edit.alphas.tolist(), "loop_history": [h.tolist() for h in edit.history],
                     "test_after": after, "seconds": round(seconds, 1), "load_average_at_start": round(load, 2)})  # fmt: skip
        print(rows[-1], flush=True)
    data = {
        "machine": machine(),
        "images_per_round": args.images,
        "test_images": len(test),
        "unedited": base,
        "rows": rows,
    }
    lines = [
        '# UCE debiasing on TinyWorld: the size of "a star"',
        "",
        f"lab.uce_debias with the judge as classifier (size label of the star found; none found counts in the "
        f'denominator), attributes small / large, "a circle" preserved; {args.images} images per round on loop '
        f"seeds, then the edit measured on {len(test)} test seeds it never saw. Written by benchmarks/erasing.py "
        f"debias, {data['machine']['date']}.",
        "",
        '| desired small / large | rounds (converged) | "a star" small / large / no star (test) | '
        '"a circle" small / large / none (test) | time (load) |',
        "|---|---|---|---|---|",
        f"| unedited | – | {base['star']['small']:.2f} / {base['star']['large']:.2f} / {base['star'][None]:.2f} | "
        f"{base['circle']['small']:.2f} / {base['circle']['large']:.2f} / {base['circle'][None]:.2f} | – |",
    ]
    for r in rows:
        st, ci = r["test_after"]["star"], r["test_after"]["circle"]
        lines.append(f"| {r['desired_small_large']} | {r['rounds']} ({r['converged']}) | {st['small']:.2f} / "
                     f"{st['large']:.2f} / {st[None]:.2f} | {ci['small']:.2f} / {ci['large']:.2f} / {ci[None]:.2f} | "
                     f"{r['seconds']:.0f} s ({r['load_average_at_start']}) |")  # fmt: skip
    write("erasing_debias", data, lines)


# ---------------------------------------------------------------------------------------------- sliders

SLIDERS = {"size": ("large", "small"), "texture": ("striped", "plain")}
SCALES = (-2.0, -1.0, 0.0, 1.0, 2.0)


def slider_prompts(split: str, n: int, striped_half: bool = False) -> list[tuple[str, int]]:
    """ "a red star" prompts; striped_half: every second one "a striped red star", so a texture slider's series
    can move both ways (a plain object cannot get plainer: its stripe score is 0 at every negative scale)."""
    base = SEEDS[split] + 200_000
    items = []
    for k in range(n):
        o = sample_scene(base + k, n_objects=1, texture="plain").objects[0]
        texture = "striped " if striped_half and k % 2 else ""
        items.append((f"a {texture}{o.color} {o.shape}", base + k))
    return items


def object_reading(prompt: str, image: np.ndarray) -> dict | None:
    """The detection of the prompt's object (its shape), with size and stripe score; None when not found."""
    want = prompt.split()[-1]
    objects = read_image(image).objects
    found = [d for d in objects if d.shape == want] or objects
    if not found:
        return None
    d = max(found, key=lambda d: d.mask.sum())
    luma = image[..., :3].astype(float) @ np.array([0.299, 0.587, 0.114])
    ink = float((luma[d.mask] < 60).mean()) if d.mask.any() else 0.0
    return {"shape": d.shape, "color": d.color, "size": float(d.size), "stripes": ink}


def slider_series(pipe, items, sliders, scales_grid, start_noise=800) -> list[list[dict | None]]:
    """Per (prompt, seed): the readings at each scale combination of scales_grid."""
    out = [[] for _ in items]
    for scales in scales_grid:
        with lab.sliders.apply(pipe, sliders, list(scales), start_noise=start_noise):
            images = generate(pipe, items)
        for i, ((p, _), im) in enumerate(zip(items, images)):
            out[i].append(object_reading(p, im))
    return out


def series_scores(series, scales, key: str, zero_index: int) -> dict:
    rhos, kept = [], []
    for readings in series:
        zero = readings[zero_index]
        if zero is None:
            continue
        values = [r[key] if r is not None else np.nan for r in readings]
        if not np.isnan(values).any() and np.ptp(values) > 0:
            rhos.append(float(spearmanr(scales, values).statistic))
        elif not np.isnan(values).any():
            rhos.append(0.0)
        kept += [r is not None and r["shape"] == zero["shape"] and r["color"] == zero["color"]
                 for j, r in enumerate(readings) if j != zero_index]  # fmt: skip
    medians = [
        float(np.nanmedian([r[j][key] if r[j] is not None else np.nan for r in series])) for j in range(len(scales))
    ]
    return {"spearman_mean": round(float(np.mean(rhos)), 4) if rhos else None, "spearman_n": len(rhos),
            "share_spearman_ge_0.9": round(float(np.mean([r >= 0.9 for r in rhos])), 4) if rhos else None,
            "kept": share(kept), "median_per_scale": [round(m, 4) for m in medians]}  # fmt: skip


def trained_slider(pipe, folder: Path, name: str, eta: float, symmetric: bool, iterations: int) -> tuple[Path, dict]:
    """The slider's folder, trained now unless a finished one with these settings is there (a rerun reuses it)."""
    positive, negative = SLIDERS[name]
    path = folder / f"{name}_eta{eta:g}_{'sym' if symmetric else 'plus'}_it{iterations}"
    if (path / "slider.json").exists():
        done = json.loads((path / "slider.json").read_text())
        if (done["settings"]["iterations"], done["settings"]["symmetric"]) == (iterations, symmetric):
            return path, done.get("timing", {})
    started, load = time.perf_counter(), os.getloadavg()[0]
    slider = lab.sliders.train(pipe, target="", positive=positive, negative=negative, eta=eta, symmetric=symmetric,
                               iterations=iterations)  # fmt: skip
    timing = {"seconds": round(time.perf_counter() - started, 1), "load_average_at_start": round(load, 2)}
    slider.save(path)
    info = json.loads((path / "slider.json").read_text()) | {"timing": timing}
    (path / "slider.json").write_text(json.dumps(info))
    return path, timing


def run_sliders(args) -> None:
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    folder = Path(args.slider_dir)
    out_file = RESULTS / "erasing_sliders.json"
    data = json.loads(out_file.read_text()) if out_file.exists() and args.resume else {"sliders": {}}
    data.update({"machine": machine(), "scales": SCALES, "iterations": args.iterations})
    prompts = {n: {s: slider_prompts(s, args.n[s], n == "texture") for s in ("validation", "test")} for n in SLIDERS}
    key = {"size": "size", "texture": "stripes"}
    for name in SLIDERS:
        rows = data["sliders"].get(name, {}).get("candidates", [])
        for r in rows:
            r["settings"].setdefault("start_noise", 800)  # rows written before start_noise was a candidate
        for trained in args.sliders_trained:
            if not trained.startswith(name + ":"):
                continue
            symmetric = trained.endswith(":sym")
            for start_noise in (800, None):
                settings = {
                    "eta": 4.0,
                    "symmetric": symmetric,
                    "iterations": args.iterations,
                    "start_noise": start_noise,
                }
                if settings in [r["settings"] for r in rows]:
                    continue
                path, timing = trained_slider(pipe, folder, name, 4.0, symmetric, args.iterations)
                row = {"settings": settings, "timing": timing, "folder": str(path)}
                series = slider_series(pipe, prompts[name]["validation"], [path], [(s,) for s in SCALES], start_noise)
                row["validation"] = series_scores(series, SCALES, key[name], SCALES.index(0.0))
                rows.append(row)
                print(name, settings, row["validation"], flush=True)
                data["sliders"][name] = {"candidates": rows}
                out_file.write_text(json.dumps(data, indent=1) + "\n")
        keeping = [r for r in rows if r["validation"]["kept"]["share"] >= KEEP_TARGET] or rows
        best = max(keeping, key=lambda r: r["validation"]["spearman_mean"] or -1)
        data["sliders"][name]["chosen"] = best["settings"]
        if "test" not in best:  # the test split is read for the chosen candidate only
            series = slider_series(pipe, prompts[name]["test"], [best["folder"]], [(s,) for s in SCALES],
                                   best["settings"]["start_noise"])  # fmt: skip
            best["test"] = series_scores(series, SCALES, key[name], SCALES.index(0.0))
        out_file.write_text(json.dumps(data, indent=1) + "\n")
    chosen = {n: next(r for r in data["sliders"][n]["candidates"] if r["settings"] == data["sliders"][n]["chosen"])
              for n in SLIDERS}  # fmt: skip
    for n, row in chosen.items():  # the training's time, from whichever row of the same slider recorded it
        same = [r["timing"] for r in data["sliders"][n]["candidates"] if r.get("folder") == row.get("folder")]
        row["timing"] = next((t for t in same if t), row["timing"])
    grid = [(a, b) for a in (-2.0, 0.0, 2.0) for b in (-2.0, 0.0, 2.0)]
    both = [chosen["size"]["folder"], chosen["texture"]["folder"]]
    starts = {chosen[n]["settings"]["start_noise"] for n in SLIDERS}
    start_noise = 800 if 800 in starts else None  # one switch for both: the reference's when either uses it
    series = slider_series(pipe, prompts["texture"]["test"], both, grid, start_noise)
    data["independence_start_noise"] = start_noise
    independence = {}
    for score, own, other in (("size", 0, 1), ("stripes", 1, 0)):
        rho_own, rho_other = [], []
        for readings in series:
            if any(r is None for r in readings):
                continue
            values = [r[score] for r in readings]
            for which, acc in ((own, rho_own), (other, rho_other)):
                scales = [g[which] for g in grid]
                acc.append(float(spearmanr(scales, values).statistic) if np.ptp(values) > 0 else 0.0)
        independence[score] = {"spearman_with_own_slider": round(float(np.mean(rho_own)), 4),
                               "spearman_with_other_slider": round(float(np.mean(rho_other)), 4), "n": len(rho_own)}  # fmt: skip
    data["independence"] = independence
    write("erasing_sliders", data, sliders_markdown(data, chosen))
    plot_sliders(chosen)


def sliders_markdown(data: dict, chosen: dict) -> list[str]:
    lines = [
        "# Concept Sliders on TinyWorld (test split; settings chosen on validation)",
        "",
        f"Written by benchmarks/erasing.py sliders, {data['machine']['date']}; iterations per slider in the settings "
        "(the reference trains 1000), rank 4, alpha 1, η 4. Spearman: per prompt and seed, the "
        "judge's score against the scale −2..2 (target mean ≥ 0.9); kept: shape and colour read as at scale 0 "
        "(target ≥ 90 %).",
        "",
        "| slider | settings | Spearman (mean, n series) | series with ρ ≥ 0.9 | kept | median score per scale | "
        "train time (load) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in chosen.items():
        t = row["test"]
        s = ", ".join(f"{k}={v}" for k, v in row["settings"].items())
        lines.append(f"| {name} | {s} | {t['spearman_mean']} ({t['spearman_n']}) | {t['share_spearman_ge_0.9']} | "
                     f"{fmt(t['kept'])} | {t['median_per_scale']} | {row['timing'].get('seconds', float('nan')):.0f} s "
                     f"({row['timing'].get('load_average_at_start', '–')}) |")  # fmt: skip
    lines += ["", "Both sliders at once, scales {−2, 0, 2}² (test): mean Spearman of each score with each slider's scale.",
              "", "| score | with its own slider | with the other slider | n |", "|---|---|---|---|"]  # fmt: skip
    for score, r in data["independence"].items():
        lines.append(f"| {score} | {r['spearman_with_own_slider']} | {r['spearman_with_other_slider']} | {r['n']} |")
    lines += ["", "Validation (every candidate):", "", "| slider | settings | Spearman | kept |", "|---|---|---|---|"]
    for name, run in data["sliders"].items():
        for r in run["candidates"]:
            mark = " (chosen)" if r["settings"] == run.get("chosen") else ""
            s = ", ".join(f"{k}={v}" for k, v in r["settings"].items())
            lines.append(
                f"| {name} | {s}{mark} | {r['validation']['spearman_mean']} | {fmt(r['validation']['kept'])} |"
            )
    return lines


def plot_sliders(chosen: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, (name, row) in zip(axes, chosen.items()):
        ax.plot(SCALES, row["test"]["median_per_scale"], "o-")
        ax.set(xlabel="slider scale", ylabel="object extent (px)" if name == "size" else "stripe score",
               title=f"{name} slider (test, median)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(RESULTS / "erasing_sliders.png", dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=("erase", "scaling", "sliders", "debias", "report"))
    p.add_argument("--methods", nargs="+", default=["uce", "esd-x", "esd-u"])
    p.add_argument("--concepts", nargs="+", default=["star", "red"])
    p.add_argument("--iterations", type=int, default=None, help="ESD: 400, sliders: 300")
    p.add_argument("--validation", type=int, default=24, help="prompts in the validation split")
    p.add_argument("--test", type=int, default=48, help="prompts in the test split")
    p.add_argument("--per-shape", type=int, default=8)
    p.add_argument("--images", type=int, default=10, help="debias: images per concept and round (the reference's)")
    p.add_argument("--slider-dir", default="runs/sliders")
    p.add_argument(
        "--sliders-trained",
        nargs="+",
        default=["size:plus", "size:sym", "texture:plus", "texture:sym"],
        help="which sliders to train: name:plus (scale +1, the reference) or name:sym (+1 and -1)",
    )
    p.add_argument("--resume", action="store_true", help="keep the candidates already in the results file")
    p.add_argument("--tag", default="", help="erase: write erasing_<concept>_<tag>.json (a parallel run; merged)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    args.n = {"validation": args.validation, "test": args.test}
    torch.set_num_threads(args.threads)
    if args.part == "erase":
        args.iterations = args.iterations or 400
        run_erase(args)
    elif args.part == "scaling":
        run_scaling(args)
    elif args.part == "debias":
        run_debias(args)
    elif args.part == "sliders":
        args.iterations = args.iterations or 300
        run_sliders(args)
    else:
        report()


if __name__ == "__main__":
    main()
