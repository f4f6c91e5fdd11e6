"""What lab's hooks cost: wall time and peak memory of one generation, with and without them.

    python benchmarks/bench_hooks.py                  # tiny + SD-1.5-sized UNet, writes benchmarks/results/
    python benchmarks/bench_hooks.py --models tiny    # seconds, not minutes

Configurations (each is one text-to-image generation with classifier-free guidance, batch 2):
    plain        no trace
    idle         inside `with lab.trace(pipe):` with nothing registered (only the step-tracking pre-hook)
    cross_mean   all cross-attention probabilities, lab.Mean(over=("steps", "heads")), cfg="both"
    self_ds4     all self-attention probabilities, mean over steps and heads, downsample=4, cfg="both"
    amd_exact    the same cross-attention capture with attention-map-diffusers 1.0.0 (mode="exact",
                 timesteps="all", heads="mean"), maps computed at the end
    amd_fast     attention-map-diffusers' default mode="fast" (keeps SDPA, stores q/k, recomputes maps)

Models:
    tiny   lab.testing.tiny_sd1_pipeline() at 64x64 (8x8 latent)
    sd15   a random UNet with SD-1.5's architecture (lab.testing.sd15_sized_unet) at 256x256 (32x32 latent),
           with the tiny VAE and a one-layer 768-d text encoder (the UNet dominates; output_type="latent").

Threads: workers run torch with --threads (default 1). On a small shared box, two OpenMP threads
competing with other processes for two cores made the tiny pipeline 200x slower (spinning
barriers); one thread per worker gives stable numbers. Use more on an idle machine.

Timing: one worker process per model builds the pipeline once, warms up, then runs every
configuration in turn for several rounds (interleaved, so background load hits all alike) and
reports the median. Memory: a fresh process per configuration; after building the pipeline it
resets the kernel's peak-RSS mark (/proc/self/clear_refs) and reports how far one generation
raised it (falls back to getrusage's ru_maxrss, which includes start-up, if that is not allowed).

attention-map-diffusers declares torchvision as a dependency (which would pull another torch), so
install it alone in a separate venv and point --amd-python at it; its import does not need
torchvision (only its PNG export does), so no stub is needed:
    python -m venv --system-site-packages /tmp/venv-amd
    /tmp/venv-amd/bin/pip install --no-deps attention-map-diffusers==1.0.0
Without it the amd_* configurations are skipped. All workers run under that interpreter when given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
from common import measure_peak_rss

HERE = Path(__file__).resolve().parent
MODES = ["plain", "idle", "cross_mean", "self_ds4", "amd_exact", "amd_fast"]
PROMPT = "a photograph of an astronaut riding a horse"


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def build_pipeline(model: str):
    import lab

    if model == "tiny":
        return lab.testing.tiny_sd1_pipeline(), 64
    return lab.testing.sd15_sized_pipeline(), 256


def generate(pipe, size: int, steps: int, mode: str) -> dict:
    """One generation in `mode`; returns seconds and bytes captured."""
    import torch

    import lab

    kwargs = dict(
        num_inference_steps=steps,
        height=size,
        width=size,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    captured = 0
    start, start_cpu = time.perf_counter(), time.process_time()
    if mode == "plain":
        pipe(PROMPT, **kwargs)
    elif mode in ("idle", "cross_mean", "self_ds4"):
        with lab.trace(pipe) as tr:
            capture = None
            if mode == "cross_mean":
                capture = tr.capture("cross", "probs", reduce=lab.Mean(over=("steps", "heads")), cfg="both")
            if mode == "self_ds4":
                capture = tr.capture(
                    "self", "probs", reduce=lab.Mean(over=("steps", "heads"), downsample=4), cfg="both"
                )
            pipe(PROMPT, **kwargs)
        if capture is not None:
            captured = capture.nbytes()
    elif mode in ("amd_exact", "amd_fast"):
        from attention_map_diffusers import AttentionCapture

        with AttentionCapture(
            pipe, relations="image->text", layers="all", timesteps="all", heads="mean", mode=mode.removeprefix("amd_")
        ) as amd:
            pipe(PROMPT, **kwargs)
        maps = amd.compute()
        captured = sum(_nbytes(record) for record in maps)
    else:
        raise ValueError(mode)
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - start_cpu,
        "captured_bytes": captured,
    }


def _nbytes(record) -> int:
    data = getattr(record, "data", None)
    return data.numel() * data.element_size() if data is not None else 0


class AttentionTimer:
    """Wall time spent inside every Attention module (processor and any hooks on the module included).

    Registered before any trace, so it brackets lab's and attention-map-diffusers' work at the
    attention sites. On a loaded machine whole-generation times swing by 10-20%; the time inside
    attention is small, so its swings are small in absolute terms, and (attention time with hooks -
    without) / generation time is a steady estimate of what hooking attention costs.
    """

    def __init__(self, unet):
        from diffusers.models.attention_processor import Attention

        self.seconds = 0.0
        self._starts = {}
        for module in unet.modules():
            if isinstance(module, Attention):
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(self._leave)

    def _enter(self, module, args):
        self._starts[id(module)] = time.perf_counter()

    def _leave(self, module, args, output):
        self.seconds += time.perf_counter() - self._starts.pop(id(module))


def worker_time(model: str, steps: int, rounds: int, modes: list[str]) -> dict:
    pipe, size = build_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    timer = AttentionTimer(pipe.unet)
    generate(pipe, size, steps, "plain")  # warm-up: allocator, thread pools
    runs = {mode: [] for mode in modes}
    for round_index in range(rounds):
        order = modes[round_index % len(modes) :] + modes[: round_index % len(modes)]  # rotate the order
        for mode in order:
            timer.seconds = 0.0
            run = generate(pipe, size, steps, mode)
            runs[mode].append({**run, "attention_seconds": timer.seconds})
    return {
        mode: {
            "median_s": statistics.median(r["seconds"] for r in results),
            "min_s": min(r["seconds"] for r in results),
            "median_cpu_s": statistics.median(r["cpu_seconds"] for r in results),
            "median_attention_s": statistics.median(r["attention_seconds"] for r in results),
            "runs_s": [r["seconds"] for r in results],
        }
        for mode, results in runs.items()
    }


def worker_sites(model: str, passes: int) -> dict:
    """Cost at the hooked sites alone, as the minimum over many short passes (robust to load).

    One plain UNet call (batch 2, as with guidance) records every Attention module's inputs.
    Then, for each configuration, the sites it hooks are called directly with those inputs,
    `passes` times, inside a trace whose context was set by one real UNet call (hooks fired
    outside a UNet call use the last call's step context). The minimum pass time, compared with
    the same sites without hooks and with the minimum time of a whole plain UNet call, gives the
    overhead per UNet call without the machine's background load in it.
    """
    import torch

    import lab

    pipe, size = build_pipeline(model)
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, size // 8, size // 8, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    inputs, handles = {}, []
    for site in lab.sites(unet):
        if site.is_attention:
            record = lambda module, args, kwargs, name=site.name: inputs.__setitem__(name, (args, kwargs))  # noqa: E731
            handles.append(site.module.register_forward_pre_hook(record, with_kwargs=True))

    def unet_call() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            unet(latents, 500, encoder_hidden_states=text)
        return time.perf_counter() - start

    unet_call()
    for handle in handles:
        handle.remove()
    plain_call = min(unet_call() for _ in range(2 if model == "sd15" else 20))

    def min_pass(kind: str) -> float:
        modules = [(s.module, inputs[s.name]) for s in lab.sites(unet) if s.kind == kind]
        best = float("inf")
        with torch.no_grad():
            for _ in range(passes):
                start = time.perf_counter()
                for module, (args, kwargs) in modules:
                    module(*args, **kwargs)
                best = min(best, time.perf_counter() - start)
        return best

    result = {"unet_call_min_s": plain_call, "passes": passes}
    # An idle trace adds one pre-hook per UNet call; its cost does not depend on the model, so it
    # is timed on the tiny UNet (min over many fast calls) and compared with this model's call.
    tiny = lab.testing.tiny_sd1_pipeline().unet
    tiny_latents, tiny_text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)

    def tiny_min() -> float:
        best = float("inf")
        with torch.no_grad():
            for _ in range(passes * 5):
                start = time.perf_counter()
                tiny(tiny_latents, 500, encoder_hidden_states=tiny_text)
                best = min(best, time.perf_counter() - start)
        return best

    tiny_plain = tiny_min()
    with lab.trace(tiny):
        tiny_idle = tiny_min()
    tiny_plain = min(tiny_plain, tiny_min())
    enter_exit = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        with lab.trace(unet):  # once per `with` block: indexes sites, checks for leftovers
            pass
        enter_exit = min(enter_exit, time.perf_counter() - start)
    result["idle"] = {
        "tiny_call_plain_s": tiny_plain,
        "tiny_call_idle_s": tiny_idle,
        "overhead_per_call": max(tiny_idle - tiny_plain, 0.0) / plain_call,
        "enter_exit_s": enter_exit,
    }
    for kind, mode, reduce in [
        ("cross", "cross_mean", lab.Mean(over=("steps", "heads"))),
        ("self", "self_ds4", lab.Mean(over=("steps", "heads"), downsample=4)),
    ]:
        plain = min_pass(kind)
        with lab.trace(unet, guidance="batched") as tr:
            tr.capture(kind, "probs", reduce=reduce, cfg="both")
            with torch.no_grad():
                unet(latents, 500, encoder_hidden_states=text)  # sets the step context
            hooked = min_pass(kind)
        plain = min(plain, min_pass(kind))  # once more after, in case the load changed meanwhile
        result[mode] = {
            "sites_plain_s": plain,
            "sites_hooked_s": hooked,
            "overhead_per_call": (hooked - plain) / plain_call,
        }
    return result


def worker_memory(model: str, steps: int, mode: str) -> dict:
    pipe, size = build_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    memory, result = measure_peak_rss(lambda: generate(pipe, size, steps, mode))
    return {**memory, **result}


# ---------------------------------------------------------------------------------------------
# Orchestrator
# ---------------------------------------------------------------------------------------------


def run_worker(python: str, threads: int, *args) -> dict:
    return common.run_worker(__file__, python, threads, *args)


def amd_available(python: str) -> bool:
    return subprocess.run([python, "-c", "import attention_map_diffusers"], capture_output=True).returncode == 0


def machine_description(threads: int) -> dict:
    import diffusers
    import torch

    model_name = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model_name = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, AttributeError):
        pass
    return {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "torch_threads": threads,
        "load_average_at_start": os.getloadavg(),
    }


def _size(nbytes: int) -> str:
    return (
        f"{nbytes / 2**20:.1f} MiB"
        if nbytes >= 2**20
        else f"{nbytes / 1024:.1f} KiB"
        if nbytes >= 1024
        else f"{nbytes} B"
    )


def _time_and_memory_table(result: dict) -> list[str]:
    measured = result.get("time_measured")
    when = (
        f" Timed {measured['date']}, load average at start {measured['load_average_at_start']:.1f}." if measured else ""
    )
    lines = [
        f"Time: median of {result['rounds']} interleaved rounds of one {result['steps']}-step generation, CFG batch 2.{when} "
        f"Memory: fresh process per configuration, peak RSS rise during one generation.",
        "",
        "Attention-attributed overhead = (median time inside Attention modules − plain's) / plain's "
        "median generation time (see AttentionTimer).",
        "",
        "Per-round × plain: median over rounds of (this configuration's time / plain's time in the same round); "
        "each round runs every configuration back to back, so slow drifts of the machine cancel.",
        "",
        "| configuration | median wall | × plain | per-round × plain | min wall × plain | median CPU × plain | time in attention | attention-attributed overhead | peak RSS rise | × plain's rise | captured |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain = result["time"]["plain"]
    plain_t = plain["median_s"]
    plain_m = result["memory"]["plain"]["peak_over_start_mb"]
    for mode, timing in result["time"].items():
        memory = result["memory"].get(mode, {})
        rise = memory.get("peak_over_start_mb")
        lines.append(
            f"| {mode} | {timing['median_s']:.3f} s | {timing['median_s'] / plain_t:.3f} | "
            f"{statistics.median(t / p for t, p in zip(timing['runs_s'], plain['runs_s'])):.3f} | "
            f"{timing['min_s'] / plain['min_s']:.3f} | {timing['median_cpu_s'] / plain['median_cpu_s']:.3f} | "
            f"{timing['median_attention_s'] * 1000:.0f} ms | "
            f"{(timing['median_attention_s'] - plain['median_attention_s']) / plain_t * 100:+.1f} % | "
            + (
                f"{rise:.0f} MB | {rise / plain_m:.2f} | {_size(memory['captured_bytes'])} |"
                if rise is not None
                else "– | – | – |"
            )
        )
    return lines + [""]


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# lab hook benchmark ({report['date']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}), load average at the full run's "
        f"start {m['load_average_at_start'][0]:.1f}; Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}.",
        "",
    ]
    for model, result in report["models"].items():
        lines += [f"## {model}: {result['description']}", ""]
        if "time" in result and "memory" in result:
            lines += _time_and_memory_table(result)
        sites = result.get("sites")
        if sites:
            lines += [
                f"Cost at the hooked sites alone (minimum of {sites['passes']} passes over the sites, "
                f"robust to background load), per UNet call of {sites['unet_call_min_s'] * 1000:.0f} ms (min):",
                "",
                "| configuration | sites without hooks | with hooks | overhead per UNet call |",
                "|---|---|---|---|",
                f"| idle (pre-hook, timed on the tiny UNet) | {sites['idle']['tiny_call_plain_s'] * 1000:.2f} ms | "
                f"{sites['idle']['tiny_call_idle_s'] * 1000:.2f} ms | {sites['idle']['overhead_per_call'] * 100:.3f} % |",
            ]
            after = [
                f"Entering and leaving a trace on this UNet (once per `with` block): "
                f"{sites['idle']['enter_exit_s'] * 1000:.1f} ms.",
                "",
            ]
            for mode in ("cross_mean", "self_ds4"):
                cost = sites[mode]
                lines.append(
                    f"| {mode} | {cost['sites_plain_s'] * 1000:.1f} ms | {cost['sites_hooked_s'] * 1000:.1f} ms | "
                    f"{cost['overhead_per_call'] * 100:.2f} % |"
                )
            lines += [""] + after
    if report.get("steps_scaling"):
        s = report["steps_scaling"]
        lines += [
            f"## Memory against steps ({s['model']})",
            "",
            "| configuration | " + " | ".join(f"{n} steps: peak rise / captured" for n in s["steps"]) + " |",
            "|---|" + "---|" * len(s["steps"]),
        ]
        for mode, per_steps in s["results"].items():
            cells = [f"{r['peak_over_start_mb']:.1f} MB / {_size(r['captured_bytes'])}" for r in per_steps]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,sd15")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (see the module docstring)")
    parser.add_argument(
        "--amd-python",
        default="/tmp/venv-amd/bin/python",
        help="interpreter that can import attention_map_diffusers (workers run under it)",
    )
    parser.add_argument("--tiny-steps", type=int, default=10)
    parser.add_argument("--tiny-rounds", type=int, default=9)
    parser.add_argument("--sd15-steps", type=int, default=2)
    parser.add_argument("--sd15-rounds", type=int, default=4)
    parser.add_argument("--scaling-steps", default="10,50", help="steps for the memory-against-steps runs (tiny)")
    parser.add_argument("--site-passes", type=int, default=12, help="passes for the cost-at-sites measurement")
    parser.add_argument(
        "--parts",
        default="time,memory,scaling,sites",
        help="what to measure; a subset updates an existing results file in place",
    )
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))

    python = args.amd_python if Path(args.amd_python).exists() and amd_available(args.amd_python) else sys.executable
    modes = (
        MODES if python != sys.executable or amd_available(python) else [m for m in MODES if not m.startswith("amd")]
    )
    machine = machine_description(args.threads)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{machine['cpu']} {machine['cores']}c".lower()).strip("-")
    out = Path(args.out)
    json_path = out / f"hooks_{slug}.json"
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "python": python, "models": {}}
    if parts != {"time", "memory", "scaling", "sites"} and json_path.exists():
        report = json.loads(json_path.read_text())  # update the parts asked for, keep the rest
    descriptions = {
        "tiny": "lab.testing.tiny_sd1_pipeline, 64x64 image (8x8 latent)",
        "sd15": "SD-1.5-sized random UNet (860M), 256x256 image (32x32 latent)",
    }
    for model in args.models.split(","):
        steps, rounds = (args.tiny_steps, args.tiny_rounds) if model == "tiny" else (args.sd15_steps, args.sd15_rounds)
        entry = report["models"].setdefault(
            model, {"description": descriptions[model], "steps": steps, "rounds": rounds}
        )
        if "time" in parts:
            print(f"[{model}] timing {len(modes)} configurations x {rounds} rounds ...", flush=True)
            measured = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_average_at_start": os.getloadavg()[0]}
            entry.update(
                steps=steps,
                rounds=rounds,
                time_measured=measured,
                time=run_worker(python, args.threads, "_time", model, steps, rounds, ",".join(modes)),
            )
        if "memory" in parts:
            entry["memory"] = {}
            for mode in modes:
                print(f"[{model}] memory: {mode}", flush=True)
                entry["memory"][mode] = run_worker(python, args.threads, "_memory", model, steps, mode)
        if "sites" in parts:
            print(f"[{model}] cost at the hooked sites ...", flush=True)
            entry["sites"] = run_worker(python, args.threads, "_sites", model, args.site_passes)
    scaling_steps = [int(n) for n in args.scaling_steps.split(",") if n]
    if scaling_steps and "scaling" in parts:
        scaling_modes = ["plain", "cross_mean", "self_ds4"] + [m for m in modes if m.startswith("amd")]
        results = {}
        for mode in scaling_modes:
            print(f"[tiny] memory against steps: {mode}", flush=True)
            results[mode] = [run_worker(python, args.threads, "_memory", "tiny", n, mode) for n in scaling_steps]
        report["steps_scaling"] = {"model": "tiny", "steps": scaling_steps, "results": results}

    out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    (out / f"hooks_{slug}.md").write_text(to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        import torch

        torch.set_num_threads(int(os.environ.get("LAB_BENCH_THREADS", "1")))
    if len(sys.argv) > 1 and sys.argv[1] == "_sites":
        _, _, model, passes = sys.argv
        print(json.dumps(worker_sites(model, int(passes))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_time":
        _, _, model, steps, rounds, modes = sys.argv
        print(json.dumps(worker_time(model, int(steps), int(rounds), modes.split(","))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_memory":
        _, _, model, steps, mode = sys.argv
        print(json.dumps(worker_memory(model, int(steps), mode)))
    else:
        main()
