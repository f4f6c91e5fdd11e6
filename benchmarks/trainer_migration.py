"""The TinyWorld trainer before and after it moved onto accelerate / diffusers' EMAModel / a LambdaLR:
the UNet stage's losses, old trainer against new, next to the run-to-run noise of a change of seed.

    OMP_NUM_THREADS=1 python benchmarks/trainer_migration.py all      # prepare, four runs one at a time, report
    python benchmarks/trainer_migration.py run --trainer old --seed 0  # one run (what `all` runs, each in its own process)
    python benchmarks/trainer_migration.py speed                       # old and new s/step, interleaved
    python benchmarks/trainer_migration.py report                      # results from the runs present

Set-up, shared by every run: 3,000 training scenes with mirror twins (`make_data`), encoded by the shipped
model's VAE at its latent scale (`init_from_pipeline`, then `encode_latents`), and the shipped model's text
encoder, frozen. Each run is `train_unet` from a fresh UNet for 300 steps of batch 16 with the CLI's
defaults otherwise (AdamW 6e-4, warm-up 200 then cosine over the 300 steps, v-prediction on a zero-terminal-
SNR schedule, Min-SNR-5 floored at 1, grounding weight 0.1, object weight 2, 10 % caption dropout), on one
thread. "old" is `train_unet` of lab/tinyworld/train.py at commit OLD_REV (loaded from git), "new" the
working tree's. Seeds 0 and 1 each; then old and new are timed interleaved (`speed`). Writes
datasets/tinyworld/results/trainer_migration.{json,md,png}; working files go to runs/trainer_migration/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "trainer_migration"
RESULTS = ROOT / "datasets" / "tinyworld" / "results"
OLD_REV = "bfc1dabbe307eb2e8fb6094e1b6c26f4e1d972db"  # the last commit of the hand-written EMA / LR / checkpoints
N_SCENES, STEPS, BATCH = 3000, 300, 16
RUNS = [("old", 0), ("new", 0), ("old", 1), ("new", 1)]
WINDOW = (200, 300)  # the steps whose mean loss is compared
SMOOTH = 20


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def prepare() -> Path:
    """The shared data: scenes, masks, latents from the shipped VAE, the shipped text encoder's weights."""
    from safetensors.torch import load_file, save_file

    from lab.tinyworld import train

    data = WORK / "data"
    if (data / "latents.safetensors").exists() and (data / "text_encoder_pretrained.safetensors").exists():
        return data
    data.mkdir(parents=True, exist_ok=True)
    images, _, _ = train.make_data(data, N_SCENES, workers=1, mirror_pairs=True)
    train.init_from_pipeline(data, ROOT / "lab" / "models" / "tinyworld-sd")
    train.encode_latents(data, train.load_trained_vae(data), images, "cpu")
    save_file(load_file(str(data / "text_encoder_init.safetensors")), str(data / "text_encoder_pretrained.safetensors"))
    return data


def load_trainer(which: str):
    """The trainer module: the working tree's, or lab/tinyworld/train.py at OLD_REV as a sibling module."""
    if which == "new":
        from lab.tinyworld import train

        return train
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{OLD_REV}:lab/tinyworld/train.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = WORK / f"train_{OLD_REV[:7]}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("lab.tinyworld._train_old", path)  # its relative imports resolve
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(which: str, seed: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from lab.tinyworld import model as tw_model
    from lab.tinyworld.world import Scene

    torch.set_num_threads(1)
    data = prepare()
    trainer = load_trainer(which)
    cached = load_file(str(data / "latents.safetensors"))
    scenes = [Scene.from_dict(d) for d in json.loads((data / "data_scenes.json").read_text())]
    masks = np.load(data / "data_masks.npy")
    out = WORK / f"{which}_seed{seed}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    load_before, started = _loadavg(), time.time()
    trainer.train_unet(
        out,
        cached["latents"],
        float(cached["scaling_factor"]),
        scenes,
        STEPS,
        BATCH,
        6e-4,
        seed,
        "cpu",
        layout_weight=1.0,
        scheduler=tw_model.make_scheduler("v_prediction", zero_terminal_snr=True),
        masks=masks,
        grounding_weight=0.1,
        frozen_text_encoder=data / "text_encoder_pretrained.safetensors",
        object_weight=2.0,
    )
    seconds = time.time() - started
    state = json.loads((out / "unet_final" / "state.json").read_text())
    record = {
        "trainer": which,
        "trainer_source": f"git show {OLD_REV}:lab/tinyworld/train.py" if which == "old" else "working tree",
        "seed": seed,
        "losses": state["losses"],
        "grounding_losses": state["grounding_losses"],
        "seconds": seconds,
        "seconds_per_step": seconds / len(state["losses"]),
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python benchmarks/trainer_migration.py run "
        f"--trainer {which} --seed {seed}",
    }
    (WORK / f"{which}_seed{seed}.json").write_text(json.dumps(record))
    print(f"{which} seed {seed}: {seconds:.0f} s, mean loss {np.mean(state['losses'][slice(*WINDOW)]):.4f}")
    return record


def speed(rounds: int = 3, steps: int = 40) -> dict:
    """Seconds per step of old and new, interleaved in one process (order alternating each round), so the
    machine's load falls on both alike; each measurement trains a fresh UNet `steps` steps (set-up included)."""
    import tempfile

    import torch
    from safetensors.torch import load_file

    from lab.tinyworld import model as tw_model
    from lab.tinyworld.world import Scene

    torch.set_num_threads(1)
    data = prepare()
    trainers = {which: load_trainer(which) for which in ("old", "new")}
    cached = load_file(str(data / "latents.safetensors"))
    scenes = [Scene.from_dict(d) for d in json.loads((data / "data_scenes.json").read_text())]
    masks = np.load(data / "data_masks.npy")
    times, loads = {"old": [], "new": []}, []
    for round_ in range(rounds):
        for which in ("old", "new") if round_ % 2 == 0 else ("new", "old"):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.time()
                trainers[which].train_unet(
                    Path(tmp),
                    cached["latents"],
                    float(cached["scaling_factor"]),
                    scenes,
                    steps,
                    BATCH,
                    6e-4,
                    0,
                    "cpu",
                    layout_weight=1.0,
                    scheduler=tw_model.make_scheduler("v_prediction", zero_terminal_snr=True),
                    masks=masks,
                    grounding_weight=0.1,
                    frozen_text_encoder=data / "text_encoder_pretrained.safetensors",
                    object_weight=2.0,
                )
                times[which].append((time.time() - started) / steps)
            loads.append(_loadavg())
    record = {"rounds": rounds, "steps": steps, "seconds_per_step": times, "loadavg_after_each": loads}
    record["command"] = (
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python benchmarks/trainer_migration.py speed"
    )
    (WORK / "speed.json").write_text(json.dumps(record))
    print({which: [round(x, 3) for x in v] for which, v in times.items()})
    return record


def _smooth(values) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values)
    return np.arange(SMOOTH - 1, len(values)), np.convolve(values, np.ones(SMOOTH) / SMOOTH, mode="valid")


def report() -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = {
        (r["trainer"], r["seed"]): r for r in (json.loads((WORK / f"{t}_seed{s}.json").read_text()) for t, s in RUNS)
    }
    window = slice(*WINDOW)
    mean = {key: float(np.mean(r["losses"][window])) for key, r in records.items()}
    old_vs_new = {seed: mean[("old", seed)] - mean[("new", seed)] for seed in (0, 1)}
    seed_to_seed = {which: mean[(which, 0)] - mean[(which, 1)] for which in ("old", "new")}
    same_seed = {}
    for seed in (0, 1):
        old, new = np.array(records[("old", seed)]["losses"]), np.array(records[("new", seed)]["losses"])
        differ = np.nonzero(old != new)[0]
        same_seed[seed] = {
            "identical_steps_from_start": int(differ[0]) if len(differ) else len(old),
            "max_relative_difference_first_10_steps": float(np.max(np.abs(old[:10] - new[:10]) / np.abs(old[:10]))),
            "max_relative_difference_all_steps": float(np.max(np.abs(old - new) / np.abs(old))),
            "mean_abs_difference_steps_200_300": float(np.mean(np.abs(old[window] - new[window]))),
        }
    summary = {
        "config": {
            "scenes": N_SCENES,
            "steps": STEPS,
            "batch": BATCH,
            "old_trainer": f"lab/tinyworld/train.py at {OLD_REV}",
            "window": list(WINDOW),
            "smoothing": SMOOTH,
        },
        "mean_loss_steps_200_300": {f"{t} seed {s}": v for (t, s), v in mean.items()},
        "old_minus_new_same_seed": {f"seed {s}": v for s, v in old_vs_new.items()},
        "seed0_minus_seed1_same_trainer": seed_to_seed,
        "same_seed_loss_curves": {f"seed {s}": v for s, v in same_seed.items()},
        "runs": {
            f"{t} seed {s}": {k: v for k, v in r.items() if k not in ("losses", "grounding_losses")}
            for (t, s), r in records.items()
        },  # fmt: skip
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "losses": {f"{t} seed {s}": r["losses"] for (t, s), r in records.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trainer_migration.json").write_text(json.dumps(summary, indent=1))

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {("old", 0): ("C0", "-"), ("new", 0): ("C1", "--"), ("old", 1): ("C2", "-"), ("new", 1): ("C3", "--")}
    for (which, seed), r in records.items():
        x, y = _smooth(r["losses"])
        color, line = styles[(which, seed)]
        ax.plot(x, y, color=color, ls=line, label=f"{which} trainer, seed {seed}")
    ax.axvspan(*WINDOW, color="0.9", zorder=0)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"UNet loss ({SMOOTH}-step mean)")
    ax.set_title("TinyWorld UNet stage, old vs new trainer (300 steps of batch 16, 1 thread)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "trainer_migration.png", dpi=110)
    plt.close(fig)

    lines = [
        "# TinyWorld trainer: before and after accelerate / EMAModel / LambdaLR",
        "",
        f"`benchmarks/trainer_migration.py`: the UNet stage from a fresh UNet, {STEPS} steps of batch {BATCH}, on "
        f"{N_SCENES:,} scenes with mirror twins encoded by the shipped VAE, the shipped text encoder frozen, the "
        "CLI's defaults otherwise (AdamW 6e-4, 200-step warm-up then cosine, v-prediction, zero terminal SNR, "
        "Min-SNR-5 floored at 1, grounding 0.1, object weight 2, 10 % caption dropout, EMA 0.999). "
        f"Old: `lab/tinyworld/train.py` at `{OLD_REV[:7]}`; new: the accelerate trainer. "
        "Loss curves: `trainer_migration.png`; every number and loss: `trainer_migration.json`.",
        "",
        f"| run | mean loss, steps {WINDOW[0]}–{WINDOW[1]} | wall time | s/step | load average before → after "
        "(1, 5, 15 min) | torch threads |",
        "|---|---|---|---|---|---|",
    ]
    for (which, seed), r in records.items():
        before, after = (", ".join(f"{x:.2f}" for x in r[k]) for k in ("loadavg_before", "loadavg_after"))
        lines.append(
            f"| {which}, seed {seed} | {mean[(which, seed)]:.5f} | {r['seconds']:.0f} s | {r['seconds_per_step']:.2f} "
            f"| {before} → {after} | {r['torch_threads']} (OMP_NUM_THREADS={r['OMP_NUM_THREADS']}) |"
        )
    lines += [
        "",
        "| difference in that mean | seed 0 | seed 1 |",
        "|---|---|---|",
        f"| old − new, same seed | {old_vs_new[0]:+.2e} | {old_vs_new[1]:+.2e} |",
        "",
        "| difference in that mean | old trainer | new trainer |",
        "|---|---|---|",
        f"| seed 0 − seed 1, same trainer | {seed_to_seed['old']:+.2e} | {seed_to_seed['new']:+.2e} |",
        "",
        "Same seed, step by step (the batches, noise and timesteps are a function of seed and step, so a "
        "same-seed pair differs only by the trainer). They are not bit-identical: the Min-SNR weight now reads "
        "diffusers' `compute_snr` ((√ᾱ/√(1−ᾱ))², float32) instead of ᾱ/(1−ᾱ), which differs in the last bits "
        "(and the LR factor multiplies in another order); the difference stays at float32 rounding:",
        "",
        "| seed | steps with bit-identical loss from the start | largest relative difference, steps 0–9 "
        f"| largest relative difference, all {STEPS} steps | mean absolute difference, steps "
        f"{WINDOW[0]}–{WINDOW[1]} |",
        "|---|---|---|---|---|",
    ]
    for seed, d in same_seed.items():
        lines.append(
            f"| {seed} | {d['identical_steps_from_start']} | {d['max_relative_difference_first_10_steps']:.1e} "
            f"| {d['max_relative_difference_all_steps']:.1e} | {d['mean_abs_difference_steps_200_300']:.1e} |"
        )
    if (WORK / "speed.json").exists():
        sp = json.loads((WORK / "speed.json").read_text())
        summary["speed_interleaved"] = sp
        (RESULTS / "trainer_migration.json").write_text(json.dumps(summary, indent=1))
        per = {w: ", ".join(f"{x:.3f}" for x in v) for w, v in sp["seconds_per_step"].items()}
        lo, hi = min(min(x) for x in sp["loadavg_after_each"]), max(max(x) for x in sp["loadavg_after_each"])
        lines += [
            "",
            "The wall times above ran one after the other while the machine's load rose, so they compare badly. "
            f"Interleaved in one process ({sp['rounds']} rounds of a fresh {sp['steps']}-step run each, order "
            f"alternating, set-up included, load averages {lo:.1f}–{hi:.1f}), seconds per step: old {per['old']}; "
            f"new {per['new']}.",
        ]
    lines += [
        "",
        f"Machine: {os.cpu_count()} CPUs, shared with other jobs (load averages above, from /proc/loadavg), "
        f"{platform.platform()}, Python {platform.python_version()}. The runs ran one at a time, each in its own "
        "process:",
        "",
        "```bash",
        "OMP_NUM_THREADS=1 nohup python benchmarks/trainer_migration.py all > runs/trainer_migration/all.log 2>&1 &",
        *(r["command"] for r in records.values()),
        *([json.loads((WORK / "speed.json").read_text())["command"]] if (WORK / "speed.json").exists() else []),
        "python benchmarks/trainer_migration.py report",
        "```",
    ]
    (RESULTS / "trainer_migration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("all", "run", "speed", "report"))
    p.add_argument("--trainer", choices=("old", "new"))
    p.add_argument("--seed", type=int)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.what == "run":
        run(args.trainer, args.seed)
    elif args.what == "speed":
        speed()
    elif args.what == "report":
        report()
    else:
        prepare()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        for which, seed in RUNS:
            command = [sys.executable, __file__, "run", "--trainer", which, "--seed", str(seed)]
            subprocess.run(command, check=True, env=env, cwd=ROOT)
        subprocess.run([sys.executable, __file__, "speed"], check=True, env=env, cwd=ROOT)
        report()


if __name__ == "__main__":
    main()
