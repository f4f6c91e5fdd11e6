"""`sdlab lab` and `sdlab demo`: the curated notebooks, one command away.

    sdlab lab  [--dir DIR] [--port N] [--no-browser] [--token T]
        Copy the curated notebooks into DIR (default ./sdlab-notebooks) as .ipynb files, keeping any copy
        already there (it may hold your edits), and start JupyterLab on them, opening the tour. The
        notebooks run the embedded TinyWorld model unless you change their `model` parameter. Stopping
        `sdlab lab` (Ctrl-C, SIGTERM, SIGHUP) stops JupyterLab too, and waits for it (run_jupyterlab).

    sdlab demo [--out FILE.html] [--profile fast|full]
        Run the tour notebook top to bottom without a browser (nbclient) and write an executed HTML copy
        (nbconvert): for a machine without a browser, and for CI.

The notebooks' source of truth is the jupytext percent-format files in the repository's notebooks/ folder
(`# %%` cells): diffs stay readable and no outputs are committed. They are converted to .ipynb here, when
copied or run. An installed sdlab finds them in <prefix>/share/sdlab/notebooks (pyproject's data-files).

Profiles. Each notebook starts with a code cell tagged "parameters" holding the full settings. A profile
other than "full" (e.g. "fast": few steps, few prompts, for CI) is a set of overrides listed in the
notebook's metadata under sdlab.profiles; running a notebook with it inserts one cell after the parameters
cell that assigns them (tagged "injected-parameters", the same convention as papermill).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_LAB_DIR = "sdlab-notebooks"
DEFAULT_DEMO_OUT = "sdlab-tour.html"
TOUR = "00_tour"
PROFILES = ("fast", "full")
CELL_TIMEOUT_SECONDS = 900  # one cell of the full profile on a slow CPU; a hung kernel still ends
SOURCE_CHECKOUT_NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
INSTALLED_NOTEBOOKS = Path("share") / "sdlab" / "notebooks"  # relative to an installation prefix

__all__ = [
    "notebook_sources",
    "read_notebook",
    "apply_profile",
    "copy_notebooks",
    "lab_command",
    "run_jupyterlab",
    "execute_notebook",
    "lab",
    "demo",
]


# ---------------------------------------------------------------------------------------------------------
# Finding and converting the notebooks
# ---------------------------------------------------------------------------------------------------------


def _require(*modules: str) -> None:
    """Exit with the install command when the `lab` extra is missing (instead of an ImportError deep inside)."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(
            f"sdlab: {', '.join(missing)} not installed; the notebooks need the lab extra: pip install 'sdlab[lab]'"
        )


def _notebook_dirs() -> list[Path]:
    """Where the curated notebooks may be, in order: a source checkout (or editable install), then the
    data folder of a regular installation (the environment's prefix, or the user's for `pip install --user`)."""
    prefixes = [Path(sys.prefix), Path(site.getuserbase())]
    return [SOURCE_CHECKOUT_NOTEBOOKS] + [prefix / INSTALLED_NOTEBOOKS for prefix in prefixes]


def notebook_sources() -> dict[str, Path]:
    """{name: path of its jupytext .py source}, e.g. {"00_tour": .../notebooks/00_tour.py}, in name order."""
    for folder in _notebook_dirs():
        sources = sorted(folder.glob("[0-9][0-9]_*.py"))
        if sources:
            return {path.stem: path for path in sources}
    looked = "\n  ".join(str(folder) for folder in _notebook_dirs())
    raise FileNotFoundError(f"sdlab's notebooks were not found; looked in:\n  {looked}")


def read_notebook(source: str | Path):
    """The notebook (nbformat v4) of a jupytext source: a path, or a name from notebook_sources()."""
    import jupytext

    path = Path(source) if Path(source).suffix == ".py" else notebook_sources()[str(source)]
    notebook = jupytext.read(path)
    # The copy is a plain .ipynb: with the source's jupytext metadata (formats: py:percent) kept, jupytext's
    # server extension would look for a paired .py next to it and refuse to open the notebook.
    notebook.metadata.pop("jupytext", None)
    # Open with the kernel of the environment sdlab is installed in, whatever kernels the user has.
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    return notebook


def apply_profile(notebook, profile: str):
    """Insert the profile's parameter overrides after the "parameters" cell (in place; returns the notebook)."""
    import nbformat

    if profile == "full":
        return notebook  # the parameters cell holds the full profile
    profiles = notebook.metadata.get("sdlab", {}).get("profiles", {})
    if profile not in profiles:
        known = ", ".join(["full", *profiles])
        raise ValueError(f"this notebook defines no {profile!r} profile (it has: {known})")
    position = next((i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])), None)
    if position is None:
        raise ValueError("this notebook has no cell tagged 'parameters' to override")
    lines = [f"# Injected by sdlab: the {profile!r} profile's parameters (from the notebook's metadata)."]
    lines += [f"{name} = {value!r}" for name, value in profiles[profile].items()]
    injected = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(position + 1, injected)
    return notebook


def copy_notebooks(directory: str | Path, profile: str = "full") -> dict[str, str]:
    """Write each curated notebook as DIR/<name>.ipynb unless that file exists. {file name: "copied" | "kept"}.

    profile: "full" (what users get) or e.g. "fast" (the overrides are written into the copies; for tests).
    """
    import nbformat

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    outcome = {}
    for name, source in notebook_sources().items():
        target = directory / f"{name}.ipynb"
        if target.exists():
            outcome[target.name] = "kept"  # it may hold the user's edits and outputs: never overwrite
            continue
        nbformat.write(apply_profile(read_notebook(source), profile), target)
        outcome[target.name] = "copied"
    return outcome


# ---------------------------------------------------------------------------------------------------------
# sdlab lab
# ---------------------------------------------------------------------------------------------------------


def lab_command(
    directory: str | Path,
    *,
    port: int | None = None,
    open_browser: bool = True,
    token: str | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The JupyterLab command line `sdlab lab` runs (the same Python, so the kernel sees sdlab)."""
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--ServerApp.root_dir={Path(directory).resolve()}",
        f"--LabApp.default_url=/lab/tree/{TOUR}.ipynb",
    ]
    if port is not None:
        command.append(f"--ServerApp.port={port}")
    if not open_browser:
        command.append("--no-browser")
    if token is not None:
        command.append(f"--IdentityProvider.token={token}")
    extra = list(extra or [])
    if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in extra:
        extra.append("--allow-root")  # containers and CI machines often run as root; Jupyter refuses without it
    return command + extra


# Signals that stop `sdlab lab` and are passed on to JupyterLab: a service manager's or `kill`'s SIGTERM,
# a closed terminal's SIGHUP, and SIGINT (Ctrl-C, or `kill -INT`).
FORWARDED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


def run_jupyterlab(command: list[str]) -> int:
    """Run `command` (JupyterLab) in the foreground until it exits; its exit status (128 + N if signal N ended it).

    SIGTERM, SIGHUP and SIGINT sent to this process are passed on to JupyterLab, and this process keeps
    waiting until JupyterLab has shut down, so stopping `sdlab lab` stops the server it started instead of
    leaving it running. At a terminal, Ctrl-C reaches JupyterLab directly too; the forwarded copy is its
    second Ctrl-C, which makes it stop at once instead of asking for confirmation.
    """
    import threading

    child: subprocess.Popen | None = None
    pending: list[int] = []

    def forward(signum, frame):
        if child is None:
            pending.append(signum)  # arrived while the child was being started: passed on right after
        else:
            child.send_signal(signum)  # does nothing once the child has exited

    previous = {}
    if threading.current_thread() is threading.main_thread():  # Python handles signals in the main thread only
        for signum in FORWARDED_SIGNALS:
            previous[signum] = signal.signal(signum, forward)
    try:
        child = subprocess.Popen(command)
        for signum in pending:
            child.send_signal(signum)
        code = child.wait()  # signal handlers run during the wait, which then resumes
    finally:
        if child is not None and child.poll() is None:  # this process is being torn down: do not orphan it
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - code if code < 0 else code


def lab(argv: list[str] | None = None) -> int:
    """`sdlab lab`: copy the notebooks (keeping existing copies), then run JupyterLab until it stops."""
    parser = argparse.ArgumentParser(
        prog="sdlab lab",
        description="Open JupyterLab on sdlab's notebooks (copied into a working folder; your edited copies are kept).",
    )
    parser.add_argument("--dir", default=DEFAULT_LAB_DIR, help=f"working folder (default: ./{DEFAULT_LAB_DIR})")
    parser.add_argument("--port", type=int, help="the server's port (default: 8888, or the next free one)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser (open the printed URL)")
    parser.add_argument("--token", help="login token (default: a random one, printed in the URL)")
    args, extra = parser.parse_known_args(argv)  # anything else goes to JupyterLab, e.g. --ip=0.0.0.0
    _require("jupyterlab", "jupytext", "ipykernel", "anywidget")

    outcome = copy_notebooks(args.dir)
    folder = Path(args.dir).resolve()
    print(f"sdlab: notebooks in {folder}")
    for name, what in outcome.items():
        print(
            f"  {name}: " + ("copied" if what == "copied" else "kept your copy (delete it to get the current version)")
        )
    command = lab_command(folder, port=args.port, open_browser=not args.no_browser, token=args.token, extra=extra)
    print("sdlab: starting JupyterLab (Ctrl-C to stop)", flush=True)
    return run_jupyterlab(command)


# ---------------------------------------------------------------------------------------------------------
# sdlab demo
# ---------------------------------------------------------------------------------------------------------


def execute_notebook(notebook, workdir: str | Path, *, cell_timeout: int = CELL_TIMEOUT_SECONDS):
    """Run every cell in a fresh kernel with `workdir` as its working folder (in place; returns the notebook).

    Raises nbclient's CellExecutionError at the first failing cell; the notebook then holds the outputs
    up to and including the error.
    """
    from nbclient import NotebookClient

    # No widget state is stored: an exported page would otherwise load the widget renderer from a CDN. The
    # explorer's output also carries a static picture (text/html), which is what the page shows.
    client = NotebookClient(
        notebook,
        timeout=cell_timeout,
        kernel_name="python3",
        store_widget_state=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    return notebook


def write_html(notebook, out: str | Path) -> Path:
    """The executed notebook as one self-contained HTML page (images inline)."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(notebook)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body, encoding="utf-8")
    return out


def demo(argv: list[str] | None = None) -> int:
    """`sdlab demo`: run the tour headless, write the HTML page; exit status 1 if a cell failed."""
    parser = argparse.ArgumentParser(
        prog="sdlab demo", description="Run the tour notebook headless and write an executed HTML copy."
    )
    parser.add_argument("--out", default=DEFAULT_DEMO_OUT, help=f"HTML file to write (default: ./{DEFAULT_DEMO_OUT})")
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default="full",
        help="full: the tour as users see it; fast: few steps and prompts (CI)",
    )
    args = parser.parse_args(argv)
    _require("jupytext", "nbclient", "nbconvert", "ipykernel", "anywidget")

    from nbclient.exceptions import CellExecutionError

    notebook = apply_profile(read_notebook(TOUR), args.profile)
    started = time.perf_counter()
    print(f"sdlab: running {TOUR} ({args.profile} profile)…", flush=True)
    failed = None
    with tempfile.TemporaryDirectory(prefix="sdlab-demo-") as workdir:
        try:
            execute_notebook(notebook, workdir)
        except CellExecutionError as error:
            failed = error
    out = write_html(notebook, args.out)
    elapsed = time.perf_counter() - started
    if failed is not None:
        print(f"sdlab: the tour failed after {elapsed:.0f} s; the page shows where: {out}\n{failed}", file=sys.stderr)
        return 1
    print(f"sdlab: ran in {elapsed:.0f} s; wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0
