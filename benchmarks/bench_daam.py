"""What lab.daam costs: generation time, stored bytes, peak memory, and the latency of reading maps.

    python benchmarks/bench_daam.py                      # tiny + TinyWorld (if trained) + SD-1.5-sized UNet
    python benchmarks/bench_daam.py --models tiny        # seconds, not minutes

Configurations (one text-to-image generation each, classifier-free guidance, batch 1):
    plain       no trace
    daam        lab.daam.trace_generation defaults: running means of the cross-attention maps
                (lab.Mean over steps and heads) and of the low-resolution self-attention maps
    cross_only  the same without self-attention (self_attention_sites=None)
    per_step    per-step, per-head cross-attention maps (per_step=True, open_vocabulary=False,
                trajectory=False): what step / head slicing needs
    widget      per_step=True with its defaults: + queries for open-vocabulary maps + the decoded
                x0_hat trajectory (what the notebook widget turns on)

Reading maps (on the widget run): the first heat_map of a word (computes and caches its per-step,
per-layer, per-head maps), a sliced heat_map afterwards (steps, layer group, head: what a slider
move costs; the target is <= 10 ms for TinyWorld), the first and a sliced open_vocab_map, and a
self_attention_map.

Models:
    tiny       lab.testing.tiny_sd1_pipeline() at 64x64 (8x8 latent)
    tinyworld  the embedded TinyWorld model at 64x64 (16x16 latent); skipped if it is not trained yet
    sd15       a random UNet with SD-1.5's architecture (lab.testing.sd15_sized_unet) at 256x256
               (32x32 latent), with the tiny VAE and a one-layer 768-d text encoder

Timing: one worker process per model builds the pipeline once, warms up, runs every configuration
in turn for several rounds (interleaved, so background load hits all alike) and reports medians.
Memory: a fresh process per configuration reports how far one generation raised the peak RSS
(VmHWM after resetting it through /proc/self/clear_refs; ru_maxrss, which includes set-up, where
that is not allowed). "stored" is the exact size of the tensors the AttributionRun keeps.
Threads: --threads (default 1) torch threads per worker; see bench_hooks.py for why.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import common
from common import measure_peak_rss

PROMPT = "a red circle left of a blue square"
WORD = "circle"
CONFIGS = ("plain", "daam", "cross_only", "per_step", "widget")
RESULTS = Path(__file__).resolve().parent / "results"


def build_pipeline(model: str):

    import lab
    import lab.pipelines

    if model == "tiny":
        return lab.testing.tiny_sd1_pipeline(), 64
    if model == "tinyworld":
        return lab.pipelines.load_pipeline(), 64
    return lab.testing.sd15_sized_pipeline(), 256


def generate(pipe, size: int, steps: int, config: str):
    """One generation in `config`; returns (seconds, the AttributionRun or None)."""
    import torch

    import lab

    kwargs = dict(num_inference_steps=steps, height=size, width=size)
    start = time.perf_counter()
    if config == "plain":
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
        return time.perf_counter() - start, None
    options = {
        "daam": {},
        "cross_only": {"self_attention_sites": None},
        "per_step": {"per_step": True, "open_vocabulary": False, "trajectory": False},
        "widget": {"per_step": True},
    }[config]
    run = lab.daam.trace_generation(pipe, PROMPT, seed=0, **kwargs, **options)
    return time.perf_counter() - start, run


def stored_bytes(run) -> int:
    tensors = [*run.cross_attention.values(), *run.self_attention.values(), *run.queries.values()]
    arrays = [a for a in (run.image_arrays, run.x0_images) if a is not None]
    return sum(t.numel() * t.element_size() for t in tensors) + sum(a.nbytes for a in arrays)


def _milliseconds(fn, repeat: int) -> float:
    times = []
    for index in range(repeat):
        start = time.perf_counter()
        fn(index)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def map_latency(run) -> dict:
    """Milliseconds to read maps from a per-step run: cold (first call for a word) and sliced (cached)."""
    groups = list(run.site_groups)
    steps = run.num_steps

    def sliced(index):
        run.heat_map(
            WORD,
            steps=range(index % steps, steps),
            sites=groups[index % len(groups)],
            heads=index % run.num_heads["all"],
        )

    def sliced_ovam(index):
        run.open_vocab_map("triangle", steps=range(index % steps, steps), sites=groups[index % len(groups)])

    result = {}
    start = time.perf_counter()
    run.heat_map(WORD)
    result["heat_map_first_ms"] = (time.perf_counter() - start) * 1000
    result["heat_map_sliced_ms"] = _milliseconds(sliced, 50)
    result["heat_map_all_ms"] = _milliseconds(lambda _: run.heat_map(WORD), 50)
    start = time.perf_counter()
    run.open_vocab_map("triangle")
    result["open_vocab_first_ms"] = (time.perf_counter() - start) * 1000
    result["open_vocab_sliced_ms"] = _milliseconds(sliced_ovam, 20)
    height, width = run.image_size
    result["self_attention_ms"] = _milliseconds(lambda i: run.self_attention_map(i % width, (3 * i) % height), 20)
    return result


def worker_time(model: str, steps: int, rounds: int) -> dict:
    pipe, size = build_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    generate(pipe, size, steps, "plain")  # warm-up: allocator, thread pools
    seconds = {config: [] for config in CONFIGS}
    stored, widget_run = {}, None
    for round_index in range(rounds):
        order = CONFIGS[round_index % len(CONFIGS) :] + CONFIGS[: round_index % len(CONFIGS)]  # rotate the order
        for config in order:
            elapsed, run = generate(pipe, size, steps, config)
            seconds[config].append(elapsed)
            if run is not None:
                stored[config] = stored_bytes(run)
            if config == "widget":
                widget_run = run
    return {
        "generation": {
            config: {
                "median_s": statistics.median(s),
                "min_s": min(s),
                "runs_s": s,
                "stored_mb": stored.get(config, 0) / 2**20,
            }
            for config, s in seconds.items()
        },
        "reading_maps": map_latency(widget_run),
    }


def worker_memory(model: str, steps: int, config: str) -> dict:
    pipe, size = build_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    memory, _ = measure_peak_rss(lambda: generate(pipe, size, steps, config))
    return {"peak_over_start_mb": memory["peak_over_start_mb"], "source": memory["source"]}


def run_worker(threads: int, *args) -> dict:
    return common.run_worker(__file__, sys.executable, threads, *args)


def markdown(results: dict) -> str:
    lines = ["# lab.daam overhead", "", f"{results['machine']}; prompt {PROMPT!r}, batch 1, guidance on.", ""]
    for model, result in results["models"].items():
        generation, reading = result["generation"], result["reading_maps"]
        plain = generation["plain"]["median_s"]
        lines += [
            f"## {model} ({result['steps']} steps)",
            "",
            "| configuration | median s | vs plain | stored MiB | peak RSS over start MiB |",
            "|---|---:|---:|---:|---:|",
        ]
        for config in CONFIGS:
            row = generation[config]
            peak = result["memory"].get(config, {}).get("peak_over_start_mb")
            lines.append(
                f"| {config} | {row['median_s']:.3f} | {row['median_s'] / plain:.2f}x | {row['stored_mb']:.1f} | "
                f"{'-' if peak is None else f'{peak:.0f}'} |"
            )
        lines += ["", "| reading maps (widget run) | ms |", "|---|---:|"]
        lines += [f"| {name.removesuffix('_ms').replace('_', ' ')} | {value:.2f} |" for name, value in reading.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,tinyworld,sd15")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory workers")
    args = parser.parse_args(argv)

    import lab.pipelines

    results = {
        "machine": f"{platform.machine()} {platform.processor() or 'CPU'}, {args.threads} torch thread(s)",
        "models": {},
    }
    for model in args.models.split(","):
        if model == "tinyworld" and not (lab.pipelines.EMBEDDED_MODEL / "model_index.json").exists():
            print("skipping tinyworld: the embedded model is not trained yet", file=sys.stderr)
            continue
        print(f"{model}: timing", file=sys.stderr)
        result = run_worker(args.threads, "--worker-time", model, args.steps, args.rounds)
        result["steps"] = args.steps
        result["memory"] = {}
        if not args.no_memory:
            for config in CONFIGS:
                print(f"{model}: memory of {config}", file=sys.stderr)
                result["memory"][config] = run_worker(args.threads, "--worker-memory", model, args.steps, config)
        results["models"][model] = result
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_daam.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "bench_daam.md").write_text(markdown(results))
    print(markdown(results))


def worker(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("LAB_BENCH_THREADS", "1")))
    if argv[0] == "--worker-time":
        _, model, steps, rounds = argv
        print(json.dumps(worker_time(model, int(steps), int(rounds))))
    else:
        _, model, steps, config = argv
        print(json.dumps(worker_memory(model, int(steps), config)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("--worker"):
        worker(sys.argv[1:])
    else:
        main()
