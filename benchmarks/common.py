"""What the benchmarks share: peak resident memory of one piece of work (Linux /proc; getrusage
elsewhere), and running a measurement in a fresh worker process."""

import gc
import json
import os
import resource
import subprocess
from pathlib import Path


def _status_kb(field: str) -> int | None:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def measure_peak_rss(work) -> tuple[dict, object]:
    """Run `work()`; return ({rss_before_mb, peak_mb, peak_over_start_mb, source}, work's result).

    The kernel's peak-RSS mark (VmHWM) is reset to the current RSS first (/proc/self/clear_refs), so the
    peak is that of `work` alone; where that is not allowed, ru_maxrss (which includes set-up) is used."""
    gc.collect()
    rss_before_kb = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        source = "VmHWM after clear_refs"
    except OSError:
        source = "ru_maxrss (includes set-up)"
    result = work()
    peak_kb = _status_kb("VmHWM") if source.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "rss_before_mb": rss_before_kb / 1024,
        "peak_mb": peak_kb / 1024,
        "peak_over_start_mb": (peak_kb - rss_before_kb) / 1024,
        "source": source,
    }, result


def run_worker(script: str, python: str, threads: int, *args) -> dict:
    """Run `python script *args` with `threads` torch/OpenMP threads; return the JSON on its last stdout line."""
    command = [python, str(Path(script).resolve()), *map(str, args)]
    env = dict(os.environ, LAB_BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
