"""Speed of the embedded TinyWorld model: one 64x64 image, 20 DDIM steps, classifier-free guidance.

    python benchmarks/bench_tinyworld.py [--threads 2] [--repeats 7]

Target (issue 3): < 1 s per image on 2 CPU cores. Writes benchmarks/results/tinyworld_speed.md.
"""

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import lab


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(
            "a small striped red circle left of a blue square",
            num_inference_steps=20,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
        )

    run()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    text = (
        f"# TinyWorld model speed\n\nOne 64x64 image, 20 DDIM steps, guidance 5 (batched CFG), float32, "
        f"{args.threads} threads, {cpu_name()}, torch {torch.__version__}.\n\n"
        f"| median | min | max | repeats |\n|---|---|---|---|\n"
        f"| {median:.3f} s | {min(times):.3f} s | {max(times):.3f} s | {args.repeats} |\n"
    )
    out = Path(__file__).parent / "results" / "tinyworld_speed.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
