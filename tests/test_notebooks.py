"""The curated notebooks and the launcher: found, converted, copied without overwriting, run top to bottom.

Every notebook is executed on CPU in a fresh kernel (nbclient) with its "fast" profile, as CI and
`sdlab demo --profile fast` run it; `sdlab demo` writes the executed tour as HTML.
"""

import ast
import sys

import nbformat
import pytest

import lab.cli
import lab.pipelines
from lab import launcher

NOTEBOOKS = [
    "00_tour",
    "01_attribution",
    "02_inversion_and_editing",
    "03_guidance",
    "04_erasing_and_sliders",
    "05_correspondence",
]
needs_model = pytest.mark.skipif(
    not (lab.pipelines.EMBEDDED_MODEL / "model_index.json").exists(),
    reason="the embedded TinyWorld model is not in lab/models/tinyworld-sd",
)


def parameter_names(notebook) -> set[str]:
    cell = next(cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
    return {
        target.id
        for node in ast.parse(cell.source).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


# ---------------------------------------------------------------------------------------------------------
# Finding and converting
# ---------------------------------------------------------------------------------------------------------


def test_the_curated_notebooks_are_found():
    assert list(launcher.notebook_sources()) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_conversion_gives_a_plain_notebook_with_parameters_and_a_fast_profile(name):
    notebook = launcher.read_notebook(name)
    nbformat.validate(notebook)
    assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith("# ")
    assert notebook.metadata.kernelspec["name"] == "python3"
    # A copy carrying the source's jupytext pairing would not open in JupyterLab (jupytext looks for the .py).
    assert "jupytext" not in notebook.metadata
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    # The fast profile may only override real parameters (a typo would silently run the full profile).
    fast = notebook.metadata["sdlab"]["profiles"]["fast"]
    assert fast and set(fast) <= parameter_names(notebook)


def test_a_profile_is_injected_after_the_parameters_cell():
    notebook = launcher.apply_profile(launcher.read_notebook("00_tour"), "fast")
    position = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = notebook.cells[position + 1]
    assert injected.metadata["tags"] == ["injected-parameters"]
    namespace = {}
    exec(injected.source, namespace)
    assert namespace["num_inference_steps"] == notebook.metadata["sdlab"]["profiles"]["fast"]["num_inference_steps"]
    full = launcher.apply_profile(launcher.read_notebook("00_tour"), "full")
    assert [cell.source for cell in full.cells] == [cell.source for cell in launcher.read_notebook("00_tour").cells]
    with pytest.raises(ValueError, match="no 'huge' profile"):
        launcher.apply_profile(launcher.read_notebook("00_tour"), "huge")


def test_an_installed_package_finds_the_notebooks_in_its_data_folder(tmp_path, monkeypatch):
    """Outside a checkout the notebooks come from <prefix>/share/sdlab/notebooks (pyproject data-files)."""
    installed = tmp_path / "share" / "sdlab" / "notebooks"
    installed.mkdir(parents=True)
    (installed / "00_tour.py").write_text("# %% [markdown]\n# # Tour\n")
    monkeypatch.setattr(launcher, "SOURCE_CHECKOUT_NOTEBOOKS", tmp_path / "no-checkout")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert launcher.notebook_sources() == {"00_tour": installed / "00_tour.py"}
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(launcher.site, "getuserbase", lambda: str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="notebooks were not found"):
        launcher.notebook_sources()


# ---------------------------------------------------------------------------------------------------------
# sdlab lab
# ---------------------------------------------------------------------------------------------------------


def test_copies_never_overwrite_the_users_edits(tmp_path):
    assert launcher.copy_notebooks(tmp_path) == {f"{name}.ipynb": "copied" for name in NOTEBOOKS}
    tour = tmp_path / "00_tour.ipynb"
    edited = nbformat.read(tour, as_version=4)
    edited.cells[0].source = "# My notes"
    nbformat.write(edited, tour)
    (tmp_path / "01_attribution.ipynb").unlink()
    kept = {f"{name}.ipynb": "kept" for name in NOTEBOOKS}
    assert launcher.copy_notebooks(tmp_path) == {**kept, "01_attribution.ipynb": "copied"}
    assert nbformat.read(tour, as_version=4).cells[0].source == "# My notes"


def test_sdlab_lab_copies_then_starts_jupyterlab_there(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(launcher, "run_jupyterlab", lambda command: started.append(command) or 0)
    folder = tmp_path / "work"
    lab.cli.main(["lab", "--dir", str(folder), "--port", "9999", "--no-browser", "--token", "secret", "--allow-root"])
    command = started[0]
    assert command[:3] == [sys.executable, "-m", "jupyterlab"]
    assert f"--ServerApp.root_dir={folder.resolve()}" in command
    assert "--LabApp.default_url=/lab/tree/00_tour.ipynb" in command
    assert {"--ServerApp.port=9999", "--no-browser", "--IdentityProvider.token=secret", "--allow-root"} <= set(command)
    assert "00_tour.ipynb: copied" in capsys.readouterr().out
    lab.cli.main(["lab", "--dir", str(folder)])
    assert "00_tour.ipynb: kept your copy" in capsys.readouterr().out
    assert "--no-browser" not in started[1] and not any(arg.startswith("--ServerApp.port") for arg in started[1])


# ---------------------------------------------------------------------------------------------------------
# Running them
# ---------------------------------------------------------------------------------------------------------


@needs_model
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path):
    notebook = launcher.apply_profile(launcher.read_notebook(name), "fast")
    launcher.execute_notebook(notebook, tmp_path)  # raises CellExecutionError at the first failing cell
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    explorers = [
        output
        for output in outputs
        if "text/html" in output.get("data", {}) and "sdlab-explorer-static" in output.data["text/html"]
    ]
    assert explorers and "application/vnd.jupyter.widget-view+json" in explorers[-1].data


@needs_model
@pytest.mark.timeout(900)
def test_sdlab_demo_writes_the_executed_tour(tmp_path, capsys):
    out = tmp_path / "tour.html"
    assert lab.cli.main(["demo", "--out", str(out), "--profile", "fast"]) == 0
    page = out.read_text()
    assert "A tour of sdlab" in page and "sdlab-explorer-static" in page and "data:image/png;base64" in page
    assert "Traceback" not in page
    # No widget state is embedded, so the page loads no widget renderer from a CDN: the explorer is a picture.
    assert "html-manager" not in page and "application/vnd.jupyter.widget-state+json" not in page
    assert f"wrote {out}" in capsys.readouterr().out
