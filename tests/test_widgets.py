"""widgets.AttributionExplorer, kernel side: what it sends the browser, and that it follows the controls.

The browser side (drawing, timing in a real page) is tests/test_browser.py. Here the widget wraps real
lab.daam runs of the tiny random SD-1 pipeline (lab.testing), so no trained model is needed.
"""

import io
import re
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lab
import lab.pipelines
import widgets
from widgets.attribution import COLORMAPS, STATIC

PROMPT = "a red circle left of a blue square"
STEPS = 3


def traced(pipe, prompt=PROMPT, **kwargs):
    kwargs.setdefault("per_step", True)
    return lab.daam.trace_generation(pipe, prompt, seed=0, num_inference_steps=STEPS, **kwargs)


@pytest.fixture(scope="module")
def run(sd1):
    return traced(sd1)


@pytest.fixture
def explorer(sd1, run):
    return widgets.AttributionExplorer(sd1, run=run, word="circle")


def shown_heat(explorer) -> np.ndarray:
    """The heat map as the browser receives it: one byte per pixel."""
    width, height = explorer.image_size
    return np.frombuffer(explorer.heat, dtype=np.uint8).reshape(height, width)


def as_bytes(heat_map) -> np.ndarray:
    """What the browser should get for a HeatMap: its normalised values as bytes."""
    return np.clip(heat_map.normalized() * 255 + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# What the browser gets
# ---------------------------------------------------------------------------------------------------------


def test_explorer_sends_the_run(explorer, run):
    assert explorer.run is run
    assert explorer.words == run.words() and explorer.word == "circle"
    assert explorer.image_prompt == PROMPT
    picture = Image.open(io.BytesIO(explorer.image_png))
    assert list(picture.size) == explorer.image_size == [64, 64]
    assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(run.images[0].convert("RGB")))
    assert len(explorer.trajectory_pngs) == run.num_steps == explorer.num_steps == STEPS
    assert (explorer.step_start, explorer.step_stop) == (0, STEPS)
    assert explorer.site_group_names == list(run.site_groups) and explorer.site_group == "all"
    assert explorer.num_heads == run.num_heads["all"]
    assert set(explorer.colormap_tables) == set(COLORMAPS)
    assert all(len(table) == 256 * 3 for table in explorer.colormap_tables.values())
    assert explorer.can_generate and explorer.can_slice and not explorer.busy and explorer.message == ""
    # Generating again starts from the run's own settings.
    assert (explorer.prompt, explorer.seed, explorer.num_inference_steps) == (PROMPT, 0, STEPS)


def test_heat_bytes_are_the_runs_normalised_map(explorer, run):
    assert np.array_equal(shown_heat(explorer), as_bytes(run.heat_map("circle")))
    assert explorer.heat_label == "“circle” · all 3 steps · all layers · all heads"


def test_default_word_is_the_first_content_word(sd1, run):
    assert widgets.AttributionExplorer(sd1, run=run).word == "red"


# ---------------------------------------------------------------------------------------------------------
# Following the controls
# ---------------------------------------------------------------------------------------------------------


def test_step_range_head_and_layers_slice_the_run(explorer, run):
    explorer.step_start, explorer.step_stop = 1, 2
    assert np.array_equal(shown_heat(explorer), as_bytes(run.heat_map("circle", steps=range(1, 2))))
    explorer.head = 1
    assert np.array_equal(shown_heat(explorer), as_bytes(run.heat_map("circle", steps=range(1, 2), heads=1)))
    group = explorer.site_group_names[1]
    explorer.site_group = group
    expected = run.heat_map("circle", steps=range(1, 2), heads=1, sites=group)
    assert np.array_equal(shown_heat(explorer), as_bytes(expected))
    assert explorer.heat_label == f"“circle” · steps 1–1 · {group} layers · head 1"
    assert explorer.heat_map().sites == expected.sites


def test_a_repeated_word_by_occurrence(explorer, run):
    explorer.word, explorer.occurrence = "a", 1
    assert np.array_equal(shown_heat(explorer), as_bytes(run.heat_map("a", occurrence=1)))
    assert "#2" in explorer.heat_label


def test_a_word_outside_the_prompt_gives_an_open_vocabulary_map(explorer, run):
    explorer.word = "triangle"
    assert np.array_equal(shown_heat(explorer), as_bytes(run.open_vocab_map("triangle")))
    assert "open vocabulary" in explorer.heat_label and explorer.message == ""


def test_python_side_matches_the_display(explorer):
    explorer.threshold = 0.6
    heat_map = explorer.heat_map()
    assert isinstance(heat_map, lab.daam.HeatMap)
    assert np.array_equal(explorer.mask(), heat_map.mask(threshold=0.6))
    # The browser thresholds the 8-bit values with HeatMap.mask's comparison: the same mask up to quantisation.
    browser_mask = shown_heat(explorer) / 255.0 > 0.6
    assert (browser_mask != explorer.mask()).mean() < 0.01


def test_every_answer_is_echoed(explorer):
    """The browser keeps one request in flight and waits for answered_request to send the next."""
    explorer.request = 7
    assert explorer.answered_request == 7
    explorer.step_start, explorer.request = 1, 8  # a change and its number, as one browser message brings them
    assert explorer.answered_request == 8


def test_redraw_in_the_kernel_is_fast(explorer):
    """Only a sanity bound: the browser test measures the real redraw (slider to pixels)."""
    durations = []
    for step in [1, 2, 0, 1, 2, 0, 1, 2, 0, 1]:
        started = time.perf_counter()
        explorer.step_start = step
        durations.append((time.perf_counter() - started) * 1000)
    assert statistics.median(durations) < 250


# ---------------------------------------------------------------------------------------------------------
# Generating, errors, runs of other kinds
# ---------------------------------------------------------------------------------------------------------


def test_generate_from_the_browser(explorer):
    seen = {"busy": [], "progress": []}
    explorer.observe(lambda change: seen["busy"].append(change["new"]), "busy")
    explorer.observe(lambda change: seen["progress"].append(change["new"]), "progress")
    old_run = explorer.run
    explorer.prompt, explorer.seed = "a green star above a yellow heart", 3
    explorer._on_browser_message(explorer, {"event": "generate"}, [])  # what the Generate button sends
    assert explorer.run is not old_run and explorer.run.prompts == ["a green star above a yellow heart"]
    assert explorer.run.settings["seed"] == 3
    assert seen["busy"] == [True, False]
    assert seen["progress"][:STEPS] == pytest.approx([(i + 1) / STEPS for i in range(STEPS)])
    assert "star" in explorer.words and explorer.word == "green"  # "circle" left with the old prompt
    assert explorer.message == ""


def test_failures_are_shown_not_raised(explorer):
    explorer.step_start, explorer.step_stop = 2, 2
    assert "step range is empty" in explorer.message
    explorer.step_start, explorer.step_stop = 0, STEPS
    assert explorer.message == ""
    explorer.pipe = None  # a failing generation: the message says why, and the widget is usable again
    explorer._on_browser_message(explorer, {"event": "generate"}, [])
    assert explorer.message.startswith("generation failed") and not explorer.busy


def test_explorer_of_a_run_only_cannot_generate(run):
    explorer = widgets.AttributionExplorer(run=run)
    assert not explorer.can_generate
    with pytest.raises(RuntimeError, match="pass pipe="):
        explorer.generate()


def test_running_means_run_shows_the_map_without_slices(sd1):
    run = traced(sd1, per_step=False)
    explorer = widgets.AttributionExplorer(run=run, word="circle")
    assert not explorer.can_slice and explorer.trajectory_pngs == []
    assert np.array_equal(shown_heat(explorer), as_bytes(run.heat_map("circle")))


def test_several_images(sd1):
    run = traced(sd1, ["a red circle", "a blue square"])
    explorer = widgets.AttributionExplorer(run=run, word="circle")
    assert explorer.num_images == 2
    explorer.image_index = 1
    assert explorer.image_prompt == "a blue square" and explorer.words == run.words(1)
    assert explorer.word == "blue"  # "circle" is not in the second prompt
    assert np.array_equal(shown_heat(explorer), as_bytes(run.heat_map("blue", image=1)))


@pytest.mark.skipif(not (lab.pipelines.EMBEDDED_MODEL / "model_index.json").exists(),
                    reason="the embedded TinyWorld model is not in lab/models/tinyworld-sd")
def test_no_arguments_loads_the_embedded_model_and_generates():
    explorer = widgets.AttributionExplorer(num_inference_steps=2)
    assert explorer.image_size == [64, 64] and explorer.run.num_steps == 2 and explorer.can_generate


# ---------------------------------------------------------------------------------------------------------
# Static copies and the shipped front end
# ---------------------------------------------------------------------------------------------------------


def test_snapshot_and_static_html(explorer):
    picture = explorer.snapshot()
    assert picture.size == (320, 320)
    assert len(np.unique(np.asarray(picture)[:5, :5].reshape(-1, 3), axis=0)) == 1  # nearest: 5x5 px = one pixel
    data, _ = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in data
    assert data["text/html"].startswith('<figure class="sdlab-explorer-static"')
    assert "data:image/png;base64," in data["text/html"]


def test_front_end_is_shipped_and_fetches_nothing():
    script = (STATIC / "attribution.js").read_text()
    assert (STATIC / "attribution.css").is_file()
    assert re.search(r"^\s*import\s", script, re.MULTILINE) is None, "the front end must not import modules"
    network = re.search(r"https?://|fetch\(|XMLHttpRequest|WebSocket", script)
    assert network is None, "the front end must not use the network"
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert re.search(r'^widgets = \[.*"static/\*".*\]', pyproject, re.MULTILINE), "widgets/static must be package data"
