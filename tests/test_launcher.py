"""`sdlab lab` stops the JupyterLab it started: SIGTERM, SIGINT and SIGHUP are passed on to it, and the
launcher waits for it and exits with its status. Real processes, with a stand-in for JupyterLab.

Also here, as the other small test of an `sdlab` command-line option: `sdlab tinyworld eval --first-seed`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "lab" / "launcher.py"

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")

# Stands in for JupyterLab: records its pid and arguments once its handlers are in place, then waits; on a
# stop signal it records which one and exits with status 7 (unless told to leave the signals at their defaults).
STAND_IN = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path

    record = Path(os.environ["SDLAB_TEST_RECORD"])

    def stop(signum, frame):
        record.with_suffix(".signal").write_text(signal.Signals(signum).name)
        sys.exit(7)

    if not os.environ.get("SDLAB_TEST_DEFAULT_SIGNALS"):
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, stop)
    partial = record.with_suffix(".partial")
    partial.write_text(f"{os.getpid()}\\n" + " ".join(sys.argv[1:]))
    partial.replace(record)  # appears whole
    while True:
        time.sleep(0.05)
""")

# run_jupyterlab alone, from launcher.py loaded by path: no torch to import, so the process starts in well under
# a second. launcher.py imports nothing but the standard library at its top.
RUN_STAND_IN = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("sdlab_launcher", sys.argv[1])
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    sys.exit(launcher.run_jupyterlab([sys.executable, sys.argv[2], "--stand-in"]))
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _start(argv: list[str], tmp_path: Path, env: dict[str, str] | None = None, ready_within: float = 30.0):
    """Start the launcher; return (its Popen, the stand-in's pid, the stand-in's arguments, the record file)."""
    record = tmp_path / "stand-in.txt"
    log = open(tmp_path / "launcher.log", "wb")
    process = subprocess.Popen(
        argv,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "SDLAB_TEST_RECORD": str(record), **(env or {})},
    )
    deadline = time.monotonic() + ready_within
    while not record.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail("the stand-in for JupyterLab did not start:\n" + (tmp_path / "launcher.log").read_text())
        time.sleep(0.05)
    pid, arguments = record.read_text().split("\n", 1)
    return process, int(pid), arguments, record


def _stop_and_check(process, child: int, signum: int) -> int:
    """Send `signum` to the launcher; it must end within seconds and leave no stand-in behind. Its status."""
    try:
        os.kill(process.pid, signum)
        code = process.wait(timeout=15)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "JupyterLab's stand-in outlived the launcher"
        return code
    finally:  # whatever failed, leave nothing running (only the two processes this test started)
        if process.poll() is None:
            process.kill()
            process.wait()
        if _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_stop_signal_reaches_jupyterlab_and_the_launcher_exits_with_its_status(name, tmp_path):
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text(STAND_IN)
    process, child, _, record = _start([sys.executable, "-c", RUN_STAND_IN, str(LAUNCHER), str(stand_in)], tmp_path)
    assert _stop_and_check(process, child, getattr(signal, name)) == 7
    assert record.with_suffix(".signal").read_text() == name


def test_a_jupyterlab_ended_by_the_signal_gives_status_128_plus_its_number(tmp_path):
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text(STAND_IN)
    process, child, _, _ = _start(
        [sys.executable, "-c", RUN_STAND_IN, str(LAUNCHER), str(stand_in)],
        tmp_path,
        env={"SDLAB_TEST_DEFAULT_SIGNALS": "1"},
    )
    assert _stop_and_check(process, child, signal.SIGTERM) == 128 + signal.SIGTERM


def test_jupyterlab_exiting_on_its_own_gives_its_status(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sdlab_launcher_for_test", LAUNCHER)
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    handlers = {signum: signal.getsignal(signum) for signum in launcher.FORWARDED_SIGNALS}
    assert launcher.run_jupyterlab([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
    assert {signum: signal.getsignal(signum) for signum in launcher.FORWARDED_SIGNALS} == handlers  # put back


@pytest.mark.slow  # imports torch and diffusers (lab) and copies the notebooks: seconds, more on a busy box
@pytest.mark.timeout(300)
def test_sigterm_to_sdlab_lab_stops_the_jupyterlab_it_started(tmp_path):
    # The whole command, `sdlab lab`, with a stand-in `jupyterlab` package first on the path: the launcher
    # runs `python -m jupyterlab ...`, which then finds the stand-in.
    package = tmp_path / "fake" / "jupyterlab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(STAND_IN)
    path = os.pathsep.join(filter(None, [str(tmp_path / "fake"), str(ROOT), os.environ.get("PYTHONPATH")]))
    sdlab = "import sys; from lab.cli import main; sys.exit(main())"  # what the `sdlab` console script runs
    process, child, arguments, record = _start(
        [sys.executable, "-c", sdlab, "lab", "--dir", "work", "--no-browser"],
        tmp_path,
        env={"PYTHONPATH": path},
        ready_within=240,
    )
    assert f"--ServerApp.root_dir={(tmp_path / 'work').resolve()}" in arguments.split()
    assert _stop_and_check(process, child, signal.SIGTERM) == 7
    assert record.with_suffix(".signal").read_text() == "SIGTERM"
    assert (tmp_path / "work" / "00_tour.ipynb").exists()


# ---------------------------------------------------------------------------------------------------------
# sdlab tinyworld eval --first-seed
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, seeds",
    [([], (0, 1, 2, 3)), (["--first-seed", "4"], (4, 5, 6, 7)), (["--seeds", "2", "--first-seed", "10"], (10, 11))],
)
def test_eval_seeds_start_at_first_seed_and_default_to_0_to_3(argv, seeds, monkeypatch, tmp_path):
    import lab.pipelines
    from lab.tinyworld import evaluate

    class Pipe:
        def set_progress_bar_config(self, **kwargs):
            pass

    used = []
    monkeypatch.setattr(lab.pipelines, "load_pipeline", lambda name=None: Pipe())
    monkeypatch.setattr(evaluate, "evaluate_model", lambda pipe, seeds, **kw: used.append(seeds) or {})
    monkeypatch.setattr(evaluate, "relation_swap_test", lambda pipe, prompts, seeds, **kw: used.append(seeds) or {})
    monkeypatch.setattr(evaluate, "first_step_layout", lambda pipe, prompts, seeds, **kw: used.append(seeds) or {})
    evaluate.main(["--model", *argv, "--out", str(tmp_path / "out.json")])
    assert used == [seeds] * 3
