"""widgets.AttributionExplorer and widgets.CorrespondenceExplorer, kernel side: what they send the browser,
and that they follow the controls; and widgets.base, what every sdlab widget shares (on a minimal widget
of its own, at the end).

The browser side (drawing, timing in a real page) is tests/test_browser.py. Here the widget wraps real
lab.daam runs of the tiny random SD-1 pipeline (lab.testing), so no trained model is needed.
"""

import base64
import io
import json
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import traitlets
from PIL import Image

import lab
import lab.pipelines
import widgets
from widgets.attribution import COLORMAPS, STATIC
from widgets.base import LabWidget, Unanswerable, colormap_table, colormap_tables, css, esm, heat_bytes, png_bytes
from widgets.correspondence import tinyworld_images

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


@pytest.mark.skipif(
    not (lab.pipelines.EMBEDDED_MODEL / "model_index.json").exists(),
    reason="the embedded TinyWorld model is not in lab/models/tinyworld-sd",
)
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
    for name in ["base.js", "attribution.js"]:
        script = (STATIC / name).read_text()
        assert re.search(r"^\s*import\s", script, re.MULTILINE) is None, f"{name} must not import modules"
        network = re.search(r"https?://|fetch\(|XMLHttpRequest|WebSocket", script)
        assert network is None, f"{name} must not use the network"
    assert (STATIC / "attribution.css").is_file() and (STATIC / "base.css").is_file()
    # One module: base.js's helpers, then the explorer's code that uses them.
    module = widgets.AttributionExplorer._esm
    assert module.index("function requester(") < module.index("function render(")
    assert module.rstrip().endswith("export default { render };")
    assert widgets.AttributionExplorer._css.index(".sdlab-widget {") < widgets.AttributionExplorer._css.index(
        ".sx-chips"
    )
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert re.search(r'^widgets = \[.*"static/\*".*\]', pyproject, re.MULTILINE), "widgets/static must be package data"


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed (used only to parse and run the front end)")
def test_composed_front_end_parses(tmp_path):
    """A helper redefined by a widget would be a SyntaxError in the browser: node parses the module as one."""
    module = tmp_path / "attribution.mjs"
    module.write_text(widgets.AttributionExplorer._esm)
    subprocess.run([NODE, "--check", str(module)], check=True, capture_output=True, timeout=60)


# ---------------------------------------------------------------------------------------------------------
# widgets.CorrespondenceExplorer: DIFT matches of a clicked point (tiny random SD-1; TinyWorld renders)
# ---------------------------------------------------------------------------------------------------------

CX_SETTINGS = dict(timestep=261, blocks="up_blocks.1", ensemble=2)


@pytest.fixture(scope="module")
def renders():
    return tinyworld_images("star")


@pytest.fixture
def correspondence(sd1, renders):
    return widgets.CorrespondenceExplorer(sd1, renders, prompt="a star", **CX_SETTINGS)


def shown_matches(explorer) -> list[tuple[int, int]]:
    return [(x, y) for x, y, _ in explorer.matched]


def expected_heats(explorer) -> list[np.ndarray]:
    """What the browser should get: lab.dift.similarity of the point, min-max normalised, as bytes."""
    cosine = lab.dift.similarity(explorer.features, tuple(explorer.point), target_index=[1, 2, 3]).numpy()
    low, high = cosine.min(axis=(1, 2), keepdims=True), cosine.max(axis=(1, 2), keepdims=True)
    return [np.clip((c - lo) / (hi - lo) * 255 + 0.5, 0, 255).astype(np.uint8) for c, lo, hi in zip(cosine, low, high)]


def test_correspondence_sends_images_keypoints_and_matches(correspondence, renders):
    explorer = correspondence
    assert len(explorer.image_pngs) == 4 and explorer.num_targets == 3
    assert explorer.image_size == explorer.sent_size == [64, 64]
    for png, rendered in zip(explorer.image_pngs, renders):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), rendered.image)
    # TinyWorld renders: their keypoints are shown, and the point starts on the source's top tip.
    assert [set(points) for points in explorer.keypoints] == [set(r.keypoints[0]) for r in renders]
    assert explorer.point == pytest.approx(list(renders[0].keypoints[0]["tip_top"]))
    assert explorer.query_keypoint == "tip_top"
    assert explorer.feature_settings == {
        "prompt": "a star",
        "timestep": 261,
        "blocks": ["up_blocks.1"],
        "ensemble": 2,
        "seed": 0,
    }
    assert "t = 261 · up_blocks.1 · ensemble 2 · prompt “a star” · PCK@0.1" in explorer.feature_summary
    where, scores = lab.dift.match_points(explorer.features, [explorer.point], target_index=[1, 2, 3])
    assert shown_matches(explorer) == [tuple(w) for w in where[:, 0].tolist()]
    assert [score for _, _, score in explorer.matched] == pytest.approx(scores[:, 0].tolist())
    for heat, expected in zip(explorer.heats, expected_heats(explorer)):
        assert np.abs(np.frombuffer(heat, np.uint8).reshape(64, 64).astype(int) - expected).max() <= 1
    assert all("px from the true tip_top" in note for note in explorer.match_notes)
    assert explorer.can_recompute and not explorer.busy and explorer.message == ""


def test_correspondence_features_are_lab_dift_per_image(correspondence, sd1, renders):
    """Each image's features: lab.dift.extract on that image alone, same seed."""
    for index in (0, 2):
        alone = lab.dift.extract(sd1, [renders[index].image], prompt="a star", progress=False, **CX_SETTINGS)
        assert torch.allclose(correspondence.features.features[index], alone.features[0], atol=1e-6)


def test_correspondence_a_click_moves_the_matches(correspondence):
    explorer = correspondence
    before_matches, before_heats = explorer.matched, explorer.heats
    # One browser message: the point and the request number, set together (as ipywidgets does).
    with explorer.hold_trait_notifications():
        explorer.point, explorer.request = [5.5, 60.25], 1
    assert explorer.answered_request == 1
    where, _ = lab.dift.match_points(explorer.features, [(5.5, 60.25)], target_index=[1, 2, 3])
    assert shown_matches(explorer) == [tuple(w) for w in where[:, 0].tolist()]
    assert explorer.heats != before_heats and explorer.matched != before_matches
    assert explorer.query_keypoint == "" and "px from the true" not in " ".join(explorer.match_notes)
    # A keypoint, by name: the notes say how far each match fell from its true position.
    explorer.pick("tip_lower_left")
    assert explorer.query_keypoint == "tip_lower_left"
    assert all(re.search(r"\d+\.\d px from the true tip_lower_left [✓✗]", note) for note in explorer.match_notes)
    with pytest.raises(KeyError, match="no keypoint 'tail'"):
        explorer.pick("tail")


def test_correspondence_answers_a_click_in_milliseconds(correspondence):
    """Only a sanity bound: the browser test measures the click-to-redraw time."""
    durations = []
    for x in [3, 20, 40, 60] * 3:
        started = time.perf_counter()
        correspondence.point = [x, 30]
        durations.append((time.perf_counter() - started) * 1000)
    assert statistics.median(durations) < 100


def test_correspondence_a_bad_point_is_a_message_not_an_error(correspondence):
    explorer = correspondence
    matched = explorer.matched
    with explorer.hold_trait_notifications():
        explorer.point, explorer.request = [64, 10], 5
    assert "outside the 64x64 source image" in explorer.message and explorer.answered_request == 5
    assert explorer.matched == matched  # the last good matches stay on display
    explorer.point = [float("nan"), 3]
    assert "outside" in explorer.message
    explorer.point = [10, 10]
    assert explorer.message == "" and explorer.matched != matched


def test_correspondence_recompute_from_the_browser_shows_progress(correspondence, sd1, renders):
    explorer = correspondence
    seen = recorder(explorer, "busy", "progress", "progress_text")
    old = explorer.features
    heats = explorer.heats
    # What "Recompute" sends: the controls' values, then the event.
    explorer.blocks, explorer.timestep, explorer.ensemble = ["up_blocks.0"], 601, 1
    assert explorer.features is old  # nothing recomputed until asked
    explorer._on_browser_message(explorer, {"event": "recompute"}, [])
    assert explorer.features is not old
    assert seen["busy"] == [True, False]
    assert seen["progress"] == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.0])
    assert seen["progress_text"][1:-1] == [f"image {i} / 4" for i in range(1, 5)]
    assert explorer.feature_settings["blocks"] == ["up_blocks.0"] and explorer.feature_settings["timestep"] == 601
    assert explorer.features.features.shape[1] == 64  # up_blocks.0 of the tiny UNet: 64 channels
    assert "t = 601 · up_blocks.0 · ensemble 1" in explorer.feature_summary
    assert explorer.heats != heats  # the point's maps, from the new features
    where, _ = lab.dift.match_points(explorer.features, [explorer.point], target_index=[1, 2, 3])
    assert shown_matches(explorer) == [tuple(w) for w in where[:, 0].tolist()]
    alone = lab.dift.extract(
        sd1, [renders[1].image], prompt="a star", timestep=601, blocks="up_blocks.0", ensemble=1, progress=False
    )
    assert torch.allclose(explorer.features.features[1], alone.features[0], atol=1e-6)
    # From Python, with keyword arguments.
    explorer.recompute(timestep=101, blocks="up_blocks.1")
    assert (explorer.timestep, explorer.blocks, explorer.feature_settings["timestep"]) == (101, ["up_blocks.1"], 101)
    # Several blocks (each L2-normalised, concatenated): shown as one choice, "a+b".
    explorer.recompute(blocks=["up_blocks.0", "up_blocks.1"])
    assert explorer.features.features.shape[1] == 64 + 32 and "up_blocks.0+up_blocks.1" in explorer.feature_summary


def test_correspondence_failed_recompute_is_shown_and_keeps_the_features(correspondence):
    explorer = correspondence
    features, matched = explorer.features, explorer.matched
    explorer.timestep = 5000
    explorer._on_browser_message(explorer, {"event": "recompute"}, [])
    assert explorer.message.startswith("feature extraction failed") and "timestep" in explorer.message
    assert not explorer.busy and explorer.features is features and explorer.matched == matched
    explorer.timestep, explorer.blocks = 261, ["no_such_block"]
    explorer._on_browser_message(explorer, {"event": "recompute"}, [])
    assert "not blocks of this UNet" in explorer.message and explorer.features is features


def test_correspondence_user_images_without_keypoints(sd1, renders):
    rng = np.random.default_rng(0)
    target = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))  # another size: resized
    explorer = widgets.CorrespondenceExplorer(sd1, [renders[0].image, target, np.asarray(renders[2].image)], ensemble=1)
    assert explorer.image_size == [64, 64] and explorer.num_targets == 2
    assert explorer.keypoints == [{}, {}, {}] and explorer.point == [32.0, 32.0]
    assert explorer.prompt == "" and explorer.query_keypoint == "" and "PCK" not in explorer.feature_summary
    assert explorer.image_labels == ["source", "target 1", "target 2"]
    assert len(explorer.matched) == len(explorer.heats) == 2
    # Keypoints given by hand, in each image's own pixels (the resized target's are scaled with it).
    explorer = widgets.CorrespondenceExplorer(
        sd1, [renders[0].image, target], keypoints=[{"eye": (10, 20)}, {"eye": (24, 16)}], ensemble=1
    )
    assert explorer.keypoints[1] == {"eye": [32.0, 32.0]} and explorer.point == [10.0, 20.0]
    assert explorer.query_keypoint == "eye" and "px from the true eye" in explorer.match_notes[0]
    with pytest.raises(ValueError, match="a source image and at least one target"):
        widgets.CorrespondenceExplorer(sd1, [renders[0].image])


def test_correspondence_of_features_only(sd1, renders):
    features = lab.dift.extract(sd1, [r.image for r in renders[:3]], timestep=101, ensemble=1, progress=False)
    explorer = widgets.CorrespondenceExplorer(features=features, point=(30, 30))
    assert explorer.features is features and not explorer.can_recompute
    assert explorer.feature_settings["timestep"] == 101 and explorer.num_targets == 2
    where, _ = lab.dift.match_points(features, [(30, 30)], target_index=[1, 2])
    assert shown_matches(explorer) == [tuple(w) for w in where[:, 0].tolist()]
    explorer._on_browser_message(explorer, {"event": "recompute"}, [])
    assert "pass pipe= to recompute" in explorer.message


def test_correspondence_snapshot_and_static_html(correspondence):
    picture = correspondence.snapshot(100)
    assert picture.size == (4 * 100 + 3 * 6, 100)
    data, _ = correspondence._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in data
    figure = data["text/html"]
    assert figure.startswith('<figure class="sdlab-explorer-static sdlab-correspondence-static"')
    assert "DIFT correspondence" in figure and "the source&#x27;s tip_top" in figure
    png = base64.b64decode(re.search(r"base64,([^\"]+)", figure).group(1))
    assert Image.open(io.BytesIO(png)).size == (4 * 160 + 3 * 6, 160)


def test_correspondence_front_end_is_shipped_and_fetches_nothing(tmp_path):
    script = (STATIC / "correspondence.js").read_text()
    assert re.search(r"^\s*import\s", script, re.MULTILINE) is None
    assert re.search(r"https?://|fetch\(|XMLHttpRequest|WebSocket", script) is None
    module = widgets.CorrespondenceExplorer._esm
    assert module.index("function requester(") < module.index("function render(")
    assert module.rstrip().endswith("export default { render };")
    assert widgets.CorrespondenceExplorer._css.index(".sdlab-widget {") < widgets.CorrespondenceExplorer._css.index(
        ".sdlab-correspondence .sx-cx-stage"
    )
    if NODE is not None:  # a helper redefined by the widget would be a SyntaxError in the browser
        path = tmp_path / "correspondence.mjs"
        path.write_text(module)
        subprocess.run([NODE, "--check", str(path)], check=True, capture_output=True, timeout=60)


@pytest.mark.skipif(
    not (lab.pipelines.EMBEDDED_MODEL / "model_index.json").exists(),
    reason="the embedded TinyWorld model is not in lab/models/tinyworld-sd",
)
def test_correspondence_defaults_to_the_embedded_model_and_four_stars():
    explorer = widgets.CorrespondenceExplorer(ensemble=2)
    assert explorer.image_labels[0] == "source: a large red star on plain" and explorer.num_targets == 3
    assert explorer.prompt == "a star"
    assert explorer.feature_settings["blocks"] == list(lab.dift.PRESETS["tinyworld"]["blocks"])
    correct, total = explorer.pck()
    assert total == 18 and correct / total >= 0.5  # the embedded model finds most of the stars' keypoints
    assert f"PCK@0.1 {correct}/{total}" in explorer.feature_summary


# ---------------------------------------------------------------------------------------------------------
# widgets.base: what every widget shares, on a minimal widget
# ---------------------------------------------------------------------------------------------------------


class Doubler(LabWidget):
    """result = 2 * value + offset, answered like a heat map; job() is a long kernel job."""

    _esm = "export default { render({ el }) { el.textContent = 'doubler'; } };"
    requested_traits = ("value", "offset")
    value = traitlets.Int(0).tag(sync=True)
    offset = traitlets.Int(0).tag(sync=True)
    result = traitlets.Int(0).tag(sync=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.computed = []  # the (value, offset) of every answer computed
        self.on_event("double", lambda content: self.job(content["times"]), failure="job failed")

    def answer_request(self):
        if self.value < 0:
            raise Unanswerable("negative values are not doubled")
        if self.value == 13:
            raise ValueError("unlucky")
        self.computed.append((self.value, self.offset))
        self.result = 2 * self.value + self.offset

    def job(self, times, fail_at=None):
        with self.working("counting…", failure="job failed") as progress:
            for i in progress.track(range(times)):
                if i == fail_at:
                    raise RuntimeError("broke")
        return times

    def static_picture(self):
        return Image.new("RGB", (4, 2), (255, 0, 0)) if self.result else None

    def static_caption(self):
        return f"2 × {self.value} + {self.offset} = {self.result} <b>"


def recorder(widget, *names):
    seen = {name: [] for name in names}
    for name in names:
        widget.observe(lambda change: seen[change["name"]].append(change["new"]), name)
    return seen


def test_base_job_shows_progress_and_clears_busy():
    doubler = Doubler()
    seen = recorder(doubler, "busy", "progress", "progress_text")
    assert doubler.job(4) == 4
    assert seen["busy"] == [True, False]
    assert seen["progress"] == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.0])
    assert seen["progress_text"] == ["counting…", "step 1 / 4", "step 2 / 4", "step 3 / 4", "step 4 / 4", ""]
    assert doubler.message == ""


def test_base_job_failure_clears_busy_and_says_why():
    doubler = Doubler()
    with pytest.raises(RuntimeError, match="broke"):  # from Python, the error is raised as well as shown
        doubler.job(4, fail_at=1)
    assert not doubler.busy and doubler.progress == 0.0 and doubler.progress_text == ""
    assert (doubler.message, doubler.message_level) == ("job failed: RuntimeError: broke", "error")
    doubler.job(2)
    assert doubler.message == ""  # the next job starts with a clean slate


def test_base_progress_is_a_step_callback():
    doubler = Doubler()
    with doubler.working() as progress:
        progress(3, 12)  # lab.daam.trace_generation(callback=progress) calls fn(steps_done, total_steps)
        assert (doubler.busy, doubler.progress, doubler.progress_text) == (True, 0.25, "step 3 / 12")
        progress.update(3)
        assert doubler.progress == 0.5
        progress(7, None, text="decoding")
        assert doubler.progress_text == "decoding"
    unknown = Doubler()
    with unknown.working() as progress:
        list(progress.track(iter("abc")))  # no length: the bar stays empty, the text counts
        assert (unknown.progress, unknown.progress_text) == (0.0, "step 3")


def test_base_browser_events():
    doubler = Doubler()
    seen = recorder(doubler, "busy")
    doubler._on_browser_message(doubler, {"event": "double", "times": 2}, [])
    assert seen["busy"] == [True, False]
    doubler._on_browser_message(doubler, {"event": "unknown"}, [])  # ignored
    doubler.busy = True  # a job is running: a second click does not queue a second one
    doubler._on_browser_message(doubler, {"event": "double", "times": 2}, [])
    assert seen["busy"] == [True, False, True]
    doubler.busy = False
    doubler._on_browser_message(doubler, {"event": "double"}, [])  # a failing handler: shown, not raised
    assert doubler.message == "job failed: KeyError: 'times'" and not doubler.busy


def test_base_throttle_answers_the_latest_values_once_then_echoes():
    doubler = Doubler()
    at_echo = []
    doubler.observe(lambda change: at_echo.append((change["new"], doubler.result)), "answered_request")
    # One browser message: several controls and the request number, set together (as ipywidgets does).
    with doubler.hold_trait_notifications():
        doubler.value, doubler.offset, doubler.request = 3, 1, 1
    assert doubler.computed == [(3, 1)] and doubler.result == 7
    assert at_echo == [(1, 7)]  # echoed after the answer was set: the browser may send its next request
    # The request number first, then the values: still answered once, from the final values.
    with doubler.hold_trait_notifications():
        doubler.request = 2
        doubler.value, doubler.offset = 5, 0
    assert doubler.computed == [(3, 1), (5, 0)] and at_echo[-1] == (2, 10)
    # Asked again for what is on display: nothing recomputed, the request still answered.
    doubler.request = 3
    assert doubler.computed == [(3, 1), (5, 0)] and doubler.answered_request == 3
    # From Python, without a request number: answered as well.
    doubler.value = 6
    assert doubler.result == 12 and doubler.answered_request == 3


def test_base_unanswerable_and_failing_requests_are_shown_not_raised():
    doubler = Doubler(value=1)
    doubler.value = -1
    assert (doubler.message, doubler.result) == ("negative values are not doubled", 0)
    doubler.value = 13
    assert doubler.message == "ValueError: unlucky"
    doubler.value = 2
    assert (doubler.message, doubler.result) == ("", 4)


def test_base_quietly_moves_controls_without_answers():
    doubler = Doubler()
    with doubler.quietly():
        doubler.value, doubler.offset = 4, 1
    assert doubler.computed == []
    doubler.refresh()
    assert doubler.computed == [(4, 1)] and doubler.result == 9
    doubler.refresh()
    assert doubler.computed == [(4, 1)]  # on display already
    doubler.refresh(force=True)
    assert doubler.computed == [(4, 1), (4, 1)]


def test_base_png_bytes_caps_the_size():
    big = Image.new("RGBA", (1000, 500), (10, 20, 30, 40))
    picture = Image.open(io.BytesIO(png_bytes(big)))
    assert picture.size == (512, 256) and picture.mode == "RGB"
    assert Image.open(io.BytesIO(png_bytes(big, max_size=100))).size == (100, 50)
    small = Image.new("RGB", (64, 48), (1, 2, 3))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(small)))), np.asarray(small))


def test_base_colormap_tables_and_heat_bytes():
    assert set(colormap_tables()) == set(COLORMAPS) and colormap_tables(["gray"]) == {"gray": colormap_table("gray")}
    gray = np.frombuffer(colormap_table("gray"), dtype=np.uint8).reshape(256, 3)
    assert np.array_equal(gray, np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1))
    jet = np.frombuffer(colormap_table("jet"), dtype=np.uint8).reshape(256, 3)
    expected = np.round(matplotlib.colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255)
    assert np.abs(jet.astype(int) - expected).max() <= 1
    heat = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    assert heat_bytes(heat, (2, 2)) == bytes([0, 128, 255, 64])
    assert len(heat_bytes(heat, (8, 4))) == 32  # resized to the picture it goes with (width, height)


def test_base_static_copy_for_exported_notebooks():
    doubler = Doubler()
    data = doubler._repr_mimebundle_()
    data = data[0] if isinstance(data, tuple) else data
    assert "text/html" not in data  # no picture yet (static_picture() is None): the live widget only
    doubler.value = 2
    data, _ = doubler._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in data
    figure = data["text/html"]
    assert figure.startswith('<figure class="sdlab-widget-static"') and "width:4px" in figure
    assert "2 × 2 + 0 = 4 &lt;b&gt;" in figure and "run the notebook in JupyterLab" in figure
    png = base64.b64decode(re.search(r"base64,([^\"]+)", figure).group(1))
    assert Image.open(io.BytesIO(png)).size == (4, 2)


def test_base_module_composition():
    module = esm("attribution.js")
    base_js = (STATIC / "base.js").read_text()
    assert module.index(base_js) < module.index((STATIC / "attribution.js").read_text())
    assert css("attribution.css").startswith("/* ---- widgets/static/base.css */")


@pytest.mark.skipif(NODE is None, reason="node is not installed (used only to run base.js's helpers)")
def test_base_js_throttle_and_pixels(tmp_path):
    """base.js in node: the requester keeps one request in flight (latest wins), and the colormap and mask
    arithmetic is the one AttributionExplorer.snapshot() uses in Python."""
    script = tmp_path / "check.mjs"
    script.write_text(
        (STATIC / "base.js").read_text()
        + """
globalThis.ImageData = class { constructor(w, h) { this.width = w; this.height = h; this.data = new Uint8ClampedArray(w * h * 4); } };
const state = { request: 0, answered_request: 0, head: -1, word: "" };
const listeners = {};
const sent = [];
const model = {
  get: (key) => state[key],
  set: (key, value) => { state[key] = value; },
  save_changes: () => sent.push({ head: state.head, word: state.word, request: state.request }),
  on: (events, fn) => { for (const e of events.split(" ")) (listeners[e] ??= []).push(fn); },
  off: (events, fn) => { for (const e of events.split(" ")) listeners[e] = listeners[e].filter((f) => f !== fn); },
};
const answer = () => { state.answered_request = state.request; for (const fn of listeners["change:answered_request"] ?? []) fn(); };
const view = connect(model);
const heatMaps = requester(view);
heatMaps.ask({ head: 1 });                // sent at once
heatMaps.ask({ head: 2 });                // one is in flight: waits
heatMaps.ask({ head: 3, word: "cat" });   // merged: the latest position wins
const whileInFlight = sent.length;
const started = heatMaps.takeStart();
answer();                                 // request 1 answered: the queued one goes
answer();                                 // request 2 answered: nothing left
view.dispose();
const table = new Uint8Array(768).map((_, i) => (i % 3 === 0 ? i / 3 : i % 3 === 1 ? 255 - (i - 1) / 3 : 7));
const heat = new Uint8Array([0, 200]);
const base = new Uint8ClampedArray([100, 60, 20, 255, 0, 40, 80, 255]);
console.log(JSON.stringify({
  whileInFlight, sent, timed: typeof started === "number", left: Object.keys(listeners).map((e) => listeners[e].length),
  overlay: Array.from(applyColormap(heat, 2, table, { base, opacity: 0.35 }).data),
  colors: Array.from(applyColormap(heat, 1, table).data),
  mask: Array.from(maskImage(heat, 2, 0.5).data),
  dimmed: Array.from(maskImage(heat, 2, 0.5, { base }).data),
}));
"""
    )
    result = json.loads(
        subprocess.run([NODE, str(script)], check=True, capture_output=True, text=True, timeout=60).stdout
    )
    assert result["whileInFlight"] == 1 and result["timed"] and result["left"] == [0]
    assert result["sent"] == [{"head": 1, "word": "", "request": 1}, {"head": 3, "word": "cat", "request": 2}]
    # The snapshot's arithmetic (AttributionExplorer.snapshot) on the same pixels.
    table = np.array([[i, 255 - i, 7] for i in range(256)], dtype=np.float32)
    base_rgb = np.array([[100, 60, 20], [0, 40, 80]], dtype=np.float32)
    heat = np.array([0, 200])
    overlay = np.clip(0.65 * base_rgb + 0.35 * table[heat] + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(np.array(result["overlay"]).reshape(2, 4)[:, :3], overlay)
    assert result["colors"] == [0, 255, 7, 255, 200, 55, 7, 255]
    assert result["mask"] == [0, 0, 0, 255, 255, 255, 255, 255]
    dimmed = np.clip(np.where((heat / 255.0 > 0.5)[:, None], base_rgb, base_rgb * 0.25) + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(np.array(result["dimmed"]).reshape(2, 4)[:, :3], dimmed)


# ---------------------------------------------------------------------------------------------------------
# widgets.GuidanceExplorer: plain against guided, and what each method reads (the embedded model, 3 steps)
# ---------------------------------------------------------------------------------------------------------

GX_STEPS = 3
needs_tinyworld = pytest.mark.skipif(
    not (lab.pipelines.EMBEDDED_MODEL / "model_index.json").exists(),
    reason="the embedded TinyWorld model is not in lab/models/tinyworld-sd",
)


@pytest.fixture(scope="module")
def tinyworld():
    if not (lab.pipelines.EMBEDDED_MODEL / "model_index.json").exists():
        pytest.skip("the embedded TinyWorld model is not in lab/models/tinyworld-sd")
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def guidance(tinyworld):
    return widgets.GuidanceExplorer(tinyworld, num_inference_steps=GX_STEPS)


def unet_calls(pipe):
    """A counter of the UNet's forward calls (a plain torch hook, removed by the returned function)."""
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle.remove


def seeded(**kwargs):
    return dict(num_inference_steps=GX_STEPS, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), **kwargs)


def test_guidance_opens_on_attend_and_excite(guidance, tinyworld):
    explorer = guidance
    assert explorer.method == "attend_excite" and explorer.scale == 20.0 and explorer.message == ""
    assert explorer.result.settings["subjects"] == ("circle", "square")  # the prompt's TinyWorld shapes
    assert explorer.sent_size == [64, 64] and len(explorer.difference) == 64 * 64
    assert Image.open(io.BytesIO(explorer.guided_png)).size == (64, 64)
    assert explorer.pipeline_runs == 2 and explorer.cached == [20.0]  # plain, then guided
    assert explorer.overlay_steps == list(range(GX_STEPS)) and len(explorer.overlay_notes) == GX_STEPS
    assert explorer.overlay_timesteps == [int(t) for t in tinyworld.scheduler.timesteps]
    assert set(explorer.method_info) == {"attend_excite", "sag", "pag", "freeu"}
    assert lab.active_hooks(tinyworld) == []
    # The plain image is the pipeline's own, the guided one lab.attend_and_excite's: the captures change nothing.
    plain = tinyworld(PROMPT, **seeded(output_type="np")).images[0]
    guided = lab.attend_and_excite(tinyworld, PROMPT, ["circle", "square"], **seeded(output_type="np")).images[0]
    assert np.array_equal(np.asarray(explorer.result.plain), np.round(plain * 255).astype(np.uint8))
    assert np.array_equal(np.asarray(explorer.result.guided), np.round(guided * 255).astype(np.uint8))


def test_guidance_caches_per_scale(guidance, tinyworld):
    explorer = guidance
    first_png, runs = explorer.guided_png, explorer.pipeline_runs
    calls, remove = unet_calls(tinyworld)
    try:
        # A new scale, as the browser asks for it (the control and its request number in one message).
        with explorer.hold_trait_notifications():
            explorer.scales, explorer.request = {**explorer.scales, "attend_excite": 10.0}, 1
        assert explorer.answered_request == 1 and not explorer.from_cache
        assert explorer.pipeline_runs == runs + 1 and calls  # the plain image was cached: one generation
        assert explorer.guided_png != first_png and explorer.cached == [10.0, 20.0]
        # Back to a computed scale: answered from the cache, no pipeline call, the same picture.
        calls.clear()
        with explorer.hold_trait_notifications():
            explorer.scales, explorer.request = {**explorer.scales, "attend_excite": 20.0}, 2
        assert explorer.answered_request == 2 and explorer.from_cache
        assert calls == [] and explorer.pipeline_runs == runs + 1
        assert explorer.guided_png == first_png
        assert explorer.cached_scales() == [10.0, 20.0] and explorer.cached_scales("sag") == []
    finally:
        remove()


def test_guidance_each_method_keeps_its_scale(guidance):
    explorer = guidance
    explorer.show("pag", 5.0)
    assert (explorer.method, explorer.scale) == ("pag", 5.0)
    explorer.show("sag")
    assert explorer.scale == 0.75  # SAG's own default
    runs = explorer.pipeline_runs
    explorer.show("pag")
    assert explorer.scale == 5.0 and explorer.from_cache and explorer.pipeline_runs == runs
    assert explorer.scales["attend_excite"] == 20.0


def test_guidance_attend_and_excite_overlay(guidance, tinyworld):
    explorer = guidance
    data = explorer.result.data
    assert data["subjects"] == [("circle", 3), ("square", 8)]
    assert data["maps"].shape == data["plain_maps"].shape == (GX_STEPS, 2, 16, 16)
    assert data["max_attention"].shape == data["plain_max_attention"].shape == (GX_STEPS, 2)
    assert torch.equal(data["max_attention"], data["maps"].flatten(2).amax(2))
    assert data["updated"] == [True] * GX_STEPS and data["refinements"][0] > 0  # paper: threshold at step 0
    panels = explorer.overlay_panels
    assert [p["label"].split(":")[0] for p in panels] == ["“circle”", "“square”"]
    assert all(len(p["frames"]) == GX_STEPS and len(p["frames"][0]) == 16 * 16 for p in panels)
    assert len(explorer.overlay_series) == 4 and explorer.overlay_shaded == list(range(GX_STEPS))
    # The plain curve is what A&E itself reads on the plain trajectory: its maps with a vanishing step and
    # no refinement (which leave the latent as it is).
    reading = lab.attend_and_excite(
        tinyworld,
        PROMPT,
        ["circle", "square"],
        scale_factor=1e-12,
        thresholds={},
        max_iter_to_alter=GX_STEPS,
        **seeded(),
    )
    assert torch.allclose(data["plain_max_attention"], reading.max_attention[:, 0], atol=1e-4)
    assert torch.allclose(data["plain_maps"], reading.maps[:, 0], atol=1e-4)
    # The adapted schedule updates at the first steps only; scale 0 is the plain trajectory.
    explorer.ae_schedule = "adapted"
    adapted = lab.attend_excite.schedule_for(GX_STEPS)["max_iter_to_alter"]
    assert explorer.result.settings["max_iter_to_alter"] == adapted < GX_STEPS
    assert explorer.result.data["updated"] == [step < adapted for step in range(GX_STEPS)]
    explorer.show(scale=0.0)
    assert explorer.result.details is None and explorer.overlay_shaded == []
    assert torch.allclose(explorer.result.data["max_attention"], data["plain_max_attention"], atol=1e-5)


def test_guidance_sag_overlay(guidance, tinyworld):
    result = guidance.show("sag")
    masks = result.data["masks"]
    assert masks.shape == (GX_STEPS, 4, 4) and masks.dtype == torch.bool  # the mid block's 4x4 grid
    assert torch.equal(masks, torch.stack([mask[0] for mask in result.details.masks]))
    assert result.data["masked_share"].shape == (GX_STEPS,)
    (panel,) = guidance.overlay_panels
    assert panel["mode"] == "mask" and (panel["width"], panel["height"]) == (4, 4)
    assert [np.frombuffer(frame, np.uint8).reshape(4, 4).tolist() for frame in panel["frames"]] == [
        (mask.numpy() * 255).astype(np.uint8).tolist() for mask in masks
    ]
    with lab.sag(tinyworld, scale=0.75):
        alone = tinyworld(PROMPT, **seeded()).images[0]
    assert np.array_equal(np.asarray(result.guided), np.asarray(alone))


def test_guidance_pag_overlay(guidance, tinyworld):
    guidance.pag_layers = "up"
    result = guidance.show("pag", 3.0)
    data = result.data
    assert data["difference"].shape == (GX_STEPS, 16, 16) and data["scales"].tolist() == [3.0] * GX_STEPS
    assert data["layers"] == [s.name for s in lab.sites(tinyworld) if s.kind == "self" and s.name.startswith("up")]
    assert all(name in guidance.overlay_text for name in data["layers"])
    assert torch.allclose(data["mean_difference"], data["difference"].flatten(1).mean(1))
    with lab.pag(tinyworld, scale=3.0, layers="up"):
        alone = tinyworld(PROMPT, **seeded()).images[0]
    assert np.array_equal(np.asarray(result.guided), np.asarray(alone))


def test_guidance_freeu_overlay(guidance, tinyworld):
    from widgets.guidance import freeu_values

    result = guidance.show("freeu", 1.0)
    preset = lab.FREEU_PRESETS["sd15"]  # lab.freeu.preset_for(TinyWorld)
    assert result.data["values"] == pytest.approx(preset) and freeu_values(preset, 0.0) == dict.fromkeys(preset, 1.0)
    sites = result.data["sites"]
    assert list(sites) == [f"up_blocks.{b}.resnets.{r}" for b in (0, 1) for r in (0, 1)]
    for name, site in sites.items():
        side = 4 if name.startswith("up_blocks.0") else 8
        for key in ("backbone_before", "backbone_after", "skip_before", "skip_removed"):
            assert site[key].shape == (GX_STEPS, side, side)
        assert site["backbone_mean_abs"].shape == site["skip_low_frequency_share"].shape == (GX_STEPS, 2)
        assert (site["backbone_after"] >= site["backbone_before"]).all()  # b > 1 on half the channels
    # s2 = 0.2 damps the second stage's lowest frequencies.
    low = sites["up_blocks.1.resnets.0"]["skip_low_frequency_share"]
    assert (low[:, 1] < low[:, 0]).all()
    assert guidance.overlay_groups == list(sites) and guidance.group == "up_blocks.0.resnets.0"
    assert set(guidance.group_notes) == set(sites)
    with lab.freeu(tinyworld, preset="sd15"):
        alone = tinyworld(PROMPT, **seeded()).images[0]
    assert np.array_equal(np.asarray(result.guided), np.asarray(alone))
    half = guidance.show("freeu", 0.5)
    assert half.data["values"] == pytest.approx({k: 1 + (v - 1) / 2 for k, v in preset.items()})


def test_guidance_errors_reach_the_message_and_leave_no_hooks(guidance, tinyworld):
    explorer = guidance
    shown = explorer.guided_png
    explorer.subjects = "circle, triangle"
    assert explorer.message.startswith("Attend-and-Excite failed: ValueError: subject 'triangle'")
    assert "Traceback" not in explorer.message and not explorer.busy
    assert explorer.guided_png == shown and lab.active_hooks(tinyworld) == []
    explorer.subjects = ""
    assert explorer.message == ""
    explorer.pag_layers = "up_blocks.0.resnets.0"
    explorer.method = "pag"
    assert "picks no self-attention layer" in explorer.message and lab.active_hooks(tinyworld) == []
    with pytest.raises(RuntimeError, match="picks no self-attention layer"):
        explorer.show("pag")
    explorer.pag_layers = "mid"
    # A failure in the middle of a generation (the VAE, after every denoising step ran inside lab.sag).
    decode = tinyworld.vae.decode
    tinyworld.vae.decode = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("decoder broke"))
    try:
        explorer.method = "sag"
        assert explorer.message == "SAG failed: RuntimeError: decoder broke"
        assert lab.active_hooks(tinyworld) == [] and not explorer.busy and explorer.method == "sag"
    finally:
        tinyworld.vae.decode = decode
    explorer.refresh()  # asked again, it runs
    assert explorer.message == "" and explorer.result.method == "sag"


def test_guidance_shows_busy_and_progress_over_both_generations(guidance):
    seen = recorder(guidance, "busy", "progress")
    guidance.seed = 1  # a new seed: the plain image and the guided one
    assert seen["busy"] == [True, False]
    assert seen["progress"][: 2 * GX_STEPS] == pytest.approx([(i + 1) / (2 * GX_STEPS) for i in range(2 * GX_STEPS)])
    assert guidance.result.settings["seed"] == 1 and guidance.cached == [20.0]


def test_guidance_snapshot_and_static_html(guidance):
    picture = guidance.snapshot(100)
    assert picture.size == (5 * 100 + 4 * 6, 115)  # plain, guided, difference, two subject maps
    data, _ = guidance._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in data
    figure = data["text/html"]
    assert figure.startswith('<figure class="sdlab-explorer-static sdlab-guidance-static"')
    assert "Guidance explorer" in figure and "Attend-and-Excite" in figure


def test_guidance_front_end_is_shipped_and_fetches_nothing(tmp_path):
    script = (STATIC / "guidance.js").read_text()
    assert re.search(r"^\s*import\s", script, re.MULTILINE) is None
    assert re.search(r"https?://(?!www\.w3\.org/2000/svg)|fetch\(|XMLHttpRequest|WebSocket", script) is None
    module = widgets.GuidanceExplorer._esm
    assert module.index("function requester(") < module.index("function render(")
    assert module.rstrip().endswith("export default { render };")
    assert (STATIC / "guidance.css").is_file()
    if NODE is not None:  # a helper redefined by the widget would be a SyntaxError in the browser
        path = tmp_path / "guidance.mjs"
        path.write_text(module)
        subprocess.run([NODE, "--check", str(path)], check=True, capture_output=True, timeout=60)


def test_guidance_default_subjects():
    from widgets.guidance import default_subjects

    assert default_subjects("a red circle left of a blue square.") == ["circle", "square"]
    assert default_subjects("a cross left of a cross") == ["cross"]
    assert default_subjects("a photo of a cat") == []


# ---------------------------------------------------------------------------------------------------------
# widgets.EditingExplorer: a TinyWorld render inverted, edited by Prompt-to-Prompt (the embedded model)
# ---------------------------------------------------------------------------------------------------------

ED_STEPS = 4


@pytest.fixture
def editing(tinyworld):
    return widgets.EditingExplorer(
        tinyworld, 3, method="negative_prompt", num_inference_steps=ED_STEPS, local_blend="square"
    )


def png_of(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_editing_opens_on_an_inversion_and_its_edit(editing, tinyworld):
    from lab.tinyworld.world import render, sample_scene
    from widgets.editing import psnr

    explorer = editing
    assert explorer.message == "" and explorer.source_prompt == "a small pink square"  # seed 3's caption
    assert explorer.target_prompt == "a small green square"  # suggest_edit: the first colour swapped
    assert explorer.pipeline_runs == 3  # inversion, reconstruction, edit
    source = render(sample_scene(3)).image
    result = explorer.result
    assert np.array_equal(result.inversion.image_arrays[0], source)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(explorer.source_png))), source)
    # The reconstruction and the edit are lab's own, with the widget's settings.
    inv = lab.inversion.negative_prompt_inversion(
        tinyworld, source, explorer.source_prompt, num_inference_steps=ED_STEPS, guidance_scale=5.0, progress=False
    )
    images, _ = inv.reconstruct(tinyworld, output_type="np", progress=False)
    assert np.array_equal(result.reconstruction, images[0]) and result.reconstruction_psnr == psnr(source, images[0])
    assert f"PSNR {result.reconstruction_psnr:.1f} dB" in explorer.reconstruction_label
    alone = lab.prompt_to_prompt(
        tinyworld, explorer.source_prompt, explorer.target_prompt, inversion=inv, local_blend=["square"], progress=False
    )
    assert np.array_equal(result.edit.image_arrays, alone.image_arrays)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(explorer.edited_png))), alone.image_arrays[1])
    # LocalBlend's mask of every step, on the 16x16 latent grid, zero before blend_start.
    assert explorer.mask_size == [16, 16] and len(explorer.mask_frames) == ED_STEPS == len(explorer.mask_notes)
    frames = [np.frombuffer(frame, np.uint8).reshape(16, 16) for frame in explorer.mask_frames]
    assert [(f > 127).tolist() for f in frames] == [(m[0] > 0.5).tolist() for m in alone.masks.numpy()]
    assert frames[-1].max() == 255  # (4 steps: blend_start 0.2 blends from step 0)
    assert len(explorer.blend_panels) == 2 and lab.active_hooks(tinyworld) == []


def test_editing_caches_inversions_and_edits(editing, tinyworld):
    explorer = editing
    first, runs = explorer.edited_png, explorer.pipeline_runs
    calls, remove = unet_calls(tinyworld)
    try:
        # A new cross-attention fraction, as the browser's slider asks: only the edit runs (inversion cached).
        with explorer.hold_trait_notifications():
            explorer.cross_steps, explorer.request = 0.25, 1
        assert explorer.answered_request == 1 and not explorer.from_cache
        assert explorer.pipeline_runs == runs + 1 and len(calls) == ED_STEPS
        assert explorer.edited_png != first and explorer.cached_inversions() == 1
        # Back to the computed value: from the cache, no UNet call, the same picture.
        calls.clear()
        with explorer.hold_trait_notifications():
            explorer.cross_steps, explorer.request = 0.8, 2
        assert explorer.answered_request == 2 and explorer.from_cache
        assert calls == [] and explorer.pipeline_runs == runs + 1 and explorer.edited_png == first
        # Scrubbing the mask's steps is the browser's alone: the step moves, nothing is computed.
        explorer.step = ED_STEPS - 1
        assert calls == [] and explorer.shown_version == 3
        assert explorer.snapshot(64).size == (6 * 64 + 5 * 6, 79)  # five images and the mask of that step
        # Another method inverts again (once), then comes back from the cache.
        explorer.show(method="edict", guidance_scale=3.0)
        assert explorer.result.inversion.method == "edict" and explorer.cached_inversions() == 2
        calls.clear()
        explorer.show(method="negative_prompt", guidance_scale=5.0)
        assert calls == [] and explorer.from_cache and explorer.edited_png == first
    finally:
        remove()


def test_editing_edits_and_reweight(editing, tinyworld):
    explorer = editing
    result = explorer.show(edit="reweight", target_prompt="a small pink square", reweight=("square", 3.0))
    assert result.edit.settings["edit"] == "reweight" and result.edit.settings["reweight"] == {"square": 3.0}
    result = explorer.show(edit="refine", target_prompt="a small striped pink square", local_blend="")
    assert result.edit.settings["edit"] == "refine" and result.edit.masks is None
    assert explorer.mask_frames == [] and explorer.blend_panels == []
    # A reweighted word not in the prompt: lab's message, the last result kept.
    shown = explorer.edited_png
    explorer.show(edit="auto")
    with pytest.raises(RuntimeError, match="edit failed"):
        explorer.show(edit="reweight", reweight=("moon", 2.0))
    assert "moon" in explorer.message and not explorer.busy and explorer.edited_png != b""
    explorer.show(edit="auto")
    assert explorer.message == "" and explorer.edited_png == shown and lab.active_hooks(tinyworld) == []


def test_editing_upload(editing, tinyworld):
    from lab.tinyworld.world import fixed_caption, render, sample_scene

    explorer = editing
    shown, runs = explorer.source_png, explorer.pipeline_runs
    # Wrong size: lab.inversion's error in the message; the image on display stays chosen and usable.
    explorer._on_browser_message(
        explorer,
        {
            "event": "upload",
            "name": "big.png",
            "data": base64.b64encode(png_of(np.zeros((40, 50, 3), np.uint8))).decode(),
        },
        [],
    )
    assert "multiples of 16" in explorer.message and "50x40" in explorer.message and not explorer.busy
    assert explorer.source == "seed" and explorer.source_png == shown and explorer.pipeline_runs == runs + 1
    # Wrong mode (RGBA), then bytes that are not an image.
    buffer = io.BytesIO()
    Image.new("RGBA", (64, 64)).save(buffer, format="PNG")
    explorer.upload(buffer.getvalue(), "alpha.png")
    assert "RGBA image: convert it first" in explorer.message and explorer.source == "seed"
    explorer.upload(b"not an image", "notes.txt")
    assert explorer.message.startswith("Upload failed") and explorer.source == "seed"
    # Still usable: a control moves and computes.
    explorer.show(self_steps=0.2)
    assert explorer.message == "" and explorer.result.edit.settings["self_steps"] == 0.2
    # A good upload (a PNG of another render) with its caption.
    scene = sample_scene(5)
    explorer.upload(png_of(render(scene).image), "mine.png", source_prompt=fixed_caption(scene))
    assert explorer.message == "" and explorer.source == "upload" and "mine.png" in explorer.inversion_label
    assert np.array_equal(explorer.result.inversion.image_arrays[0], render(scene).image)
    # Picking a seed again (the browser's event) comes back from the cache when it was computed.
    explorer._on_browser_message(explorer, {"event": "pick", "seed": 3}, [])
    assert explorer.source == "seed" and explorer.source_prompt == "a small pink square"


def test_editing_progress_and_errors(tinyworld):
    explorer = widgets.EditingExplorer(tinyworld, 3, method="ddim", num_inference_steps=ED_STEPS)
    assert explorer.guidance_scale == 1.0 and explorer.mask_frames == []
    seen = recorder(explorer, "busy", "progress")
    explorer.show(method="null_text", guidance_scale=5.0)  # the inversion, its reconstruction, the edit
    assert seen["busy"] == [True, False] and seen["progress"][-1] == 0.0  # cleared when done
    counted = seen["progress"][:-1]  # a UNet call at a time, up to the bound (null-text may stop early)
    assert len(counted) > 3 * ED_STEPS and counted == sorted(counted) and 0 < counted[0] and counted[-1] <= 1
    with pytest.raises(RuntimeError, match="null-text inversion at guidance_scale 1"):
        explorer.show(guidance_scale=1.0)
    assert explorer.result.inversion.method == "null_text" and lab.active_hooks(tinyworld) == []


def test_editing_static_html_and_front_end(editing, tmp_path):
    data, _ = editing._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in data
    figure = data["text/html"]
    assert figure.startswith('<figure class="sdlab-explorer-static sdlab-editing-static"')
    assert "Editing explorer" in figure and "negative-prompt" in figure
    script = (STATIC / "editing.js").read_text()
    assert re.search(r"^\s*import\s", script, re.MULTILINE) is None
    assert re.search(r"https?://|fetch\(|XMLHttpRequest|WebSocket", script) is None
    module = widgets.EditingExplorer._esm
    assert module.index("function requester(") < module.index("function render(")
    assert module.rstrip().endswith("export default { render };") and (STATIC / "editing.css").is_file()
    if NODE is not None:
        path = tmp_path / "editing.mjs"
        path.write_text(module)
        subprocess.run([NODE, "--check", str(path)], check=True, capture_output=True, timeout=60)


def test_editing_suggest_edit():
    from widgets.editing import suggest_edit

    assert suggest_edit("a small pink square") == "a small green square"
    assert suggest_edit("a large green circle left of a red star") == "a large blue circle left of a red star"
    assert suggest_edit("a photo of a cat") == "a photo of a cat"


# ---------------------------------------------------------------------------------------------------------
# widgets.ErasingExplorer: a concept erased (UCE, ESD), held-out prompts before and after; a slider dragged
# ---------------------------------------------------------------------------------------------------------

ER_STEPS = 4
ER_SEEDS = (1,)


def parameters_of(pipe) -> dict:
    """Every parameter of the pipeline, its value (a copy) and requires_grad flag."""
    return {name: (p.detach().clone(), p.requires_grad) for name, p in lab.weights.named_parameters(pipe).items()}


def assert_parameters_are(pipe, saved: dict) -> None:
    now = lab.weights.named_parameters(pipe)
    assert now.keys() == saved.keys(), "the pipeline's parameters changed names (an adapter left in?)"
    for name, p in now.items():
        assert torch.equal(p.detach(), saved[name][0]) and p.requires_grad == saved[name][1], name
    assert not getattr(pipe.unet, "peft_config", None), "a LoRA adapter was left in the UNet"


@pytest.fixture
def erasing(tinyworld):
    return widgets.ErasingExplorer(tinyworld, "star", num_inference_steps=ER_STEPS, seeds=ER_SEEDS)


def generated(pipe, prompt, seed=ER_SEEDS[0]) -> np.ndarray:
    image = pipe(
        prompt, num_inference_steps=ER_STEPS, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed)
    ).images[0]
    return np.asarray(image.convert("RGB"))


def test_erasing_opens_on_uce_and_leaves_the_pipeline_as_it_was(tinyworld, restored):
    from lab.tinyworld.judge import read_image
    from widgets.erasing import default_preserve, held_out_prompts
    from widgets.erasing_parts import reading_text

    saved, check = parameters_of(tinyworld), restored(tinyworld)
    explorer = widgets.ErasingExplorer(tinyworld, "star", num_inference_steps=ER_STEPS, seeds=ER_SEEDS)
    assert explorer.message == "" and explorer.method == "uce"  # UCE runs at once (closed form)
    assert explorer.prompts == held_out_prompts("star") == ["a red star", "a large blue star", "a green circle",
                                                             "a yellow square"]  # fmt: skip
    assert explorer.preserve == "circle, square, triangle, heart, cross" == ", ".join(default_preserve("star"))
    assert [t["names"] for t in explorer.tiles] == [True, True, False, False]
    assert explorer.pipeline_runs == 4 + 1 + 4  # before, the erasure, after
    result = explorer.result
    # The after images are lab.uce's edit, as a script would make them; the before images the model's own.
    with lab.uce.erase(tinyworld, ["star"], preserve=default_preserve("star")):
        erased = {prompt: generated(tinyworld, prompt) for prompt in explorer.prompts}
    for tile in explorer.tiles:
        prompt = tile["prompt"]
        assert np.array_equal(result.after[prompt, 1], erased[prompt])
        assert np.array_equal(result.before[prompt, 1], generated(tinyworld, prompt))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(tile["after"]))), erased[prompt])
        assert tile["after_reading"] == reading_text(read_image(erased[prompt])) == result.readings["after", prompt, 1]
    changed = [t["prompt"] for t in explorer.tiles if t["before"] != t["after"]]
    assert {"a red star", "a large blue star"} <= set(changed), "erasing 'star' changed no image naming it"
    assert "UCE erased “star”" in explorer.erase_label and "preserving circle" in explorer.erase_label
    assert "of 2 before" in explorer.summary
    # Every weight is back, bit for bit, with its requires_grad; no hook or processor left behind.
    assert_parameters_are(tinyworld, saved)
    check()
    # The saved weights give the same edit again, from Python.
    with result.apply(tinyworld):
        assert np.array_equal(generated(tinyworld, "a red star"), erased["a red star"])
    assert_parameters_are(tinyworld, saved)


def test_erasing_caches_and_trains_esd_with_progress(erasing, tinyworld):
    explorer = erasing
    saved, shown = parameters_of(tinyworld), [t["after"] for t in erasing.tiles]
    calls, remove = unet_calls(tinyworld)
    try:
        explorer._on_browser_message(explorer, {"event": "run"}, [])  # Run again, same settings: the cache
        assert calls == [] and explorer.from_cache and [t["after"] for t in explorer.tiles] == shown
        seen = recorder(explorer, "busy", "progress", "progress_text")
        result = explorer.run(method="esd_x", esd_iterations=2, esd_lr=1e-3)  # trains (2 iterations), then after
        assert seen["busy"] == [True, False] and not explorer.from_cache and calls
        counted = seen["progress"][:-1]
        assert counted == sorted(counted) and counted[-1] == 1.0
        assert any("iteration 2 / 2" in text for text in seen["progress_text"])
        assert result.spec.method == "esd_x" and len(result.edit.losses) == 2
        assert all(".attn2." in name for name in result.tensors) and "ESD-x" in explorer.erase_label
        assert explorer.cached_edits() == 2
        assert_parameters_are(tinyworld, saved)
        # Back to UCE: from the cache, no UNet call, its images again.
        calls.clear()
        explorer.run(method="uce")
        assert calls == [] and explorer.from_cache and [t["after"] for t in explorer.tiles] == shown
    finally:
        remove()
    assert_parameters_are(tinyworld, saved)


def test_erasing_bad_input_is_a_message_and_changes_nothing(erasing, tinyworld):
    explorer = erasing
    saved, shown, result = parameters_of(tinyworld), explorer.tiles, explorer.result
    for controls, words in [
        (dict(concept=""), "empty concept"),
        (dict(concept="star", preserve="star, circle"), "both erased and preserved"),
        (dict(preserve="circle", method="esd_u", esd_iterations=0), "iterations must be a positive integer"),
        (dict(method="dreambooth"), "unknown erasing method"),
    ]:
        with pytest.raises(RuntimeError, match=words):
            explorer.run(**controls)
        assert words in explorer.message and "Traceback" not in explorer.message and not explorer.busy
        assert explorer.result is result and explorer.tiles == shown
        assert_parameters_are(tinyworld, saved)
    with pytest.raises(ValueError, match="unknown control 'slider_scale'"):
        explorer.run(slider_scale=2.0)
    explorer.run(method="uce", preserve="circle, square, triangle, heart, cross", concept="star")
    assert explorer.message == "" and explorer.from_cache and explorer.result is result


def test_erasing_defaults_follow_the_concept(erasing):
    from widgets.erasing import held_out_prompts

    explorer = erasing
    explorer.run(concept="red")
    assert explorer.prompts == held_out_prompts("red") == ["a red circle", "a large red square", "a green circle",
                                                           "a yellow square"]  # fmt: skip
    assert explorer.preserve == "orange, yellow, green, blue, purple, pink, brown"
    assert [t["names"] for t in explorer.tiles] == [True, True, False, False]
    explorer.run(concept="circle", preserve="square", prompts=["a blue circle", "a blue heart"])
    assert explorer.prompts == ["a blue circle", "a blue heart"] and len(explorer.tiles) == 2
    explorer.run(concept="heart")  # prompts given: they stay; preserve typed: it stays
    assert explorer.prompts == ["a blue circle", "a blue heart"] and explorer.preserve == "square"
    assert [t["names"] for t in explorer.tiles] == [False, True]


@pytest.fixture(scope="module")
def slider_folder(tinyworld, tmp_path_factory):
    slider = lab.sliders.train(
        tinyworld, positive="large", negative="small", iterations=2, lr=1e-2, num_steps=4, progress=False
    )
    return slider.save(tmp_path_factory.mktemp("slider") / "size")


def test_erasing_slider_scale_cache(tinyworld, slider_folder, restored):
    saved, check = parameters_of(tinyworld), restored(tinyworld)
    explorer = widgets.ErasingExplorer(
        tinyworld, "star", run=False, num_inference_steps=ER_STEPS, seeds=ER_SEEDS, slider=slider_folder, scale=2.0
    )
    assert explorer.message == "" and explorer.slider_loaded and "“large” vs “small”" in explorer.slider_label
    assert explorer.result is None and all(t["after"] == b"" for t in explorer.tiles)  # ESD/UCE not run
    at_2 = explorer.slider_png
    with lab.sliders.apply(tinyworld, [slider_folder], scales=[2.0]):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(at_2))), generated(tinyworld, "a red star"))
    assert explorer.slider_base_png != at_2 and explorer.slider_cached == [0.0, 2.0]
    calls, remove = unet_calls(tinyworld)
    try:
        # Dragged to -2, as the browser's requester asks: computed once.
        with explorer.hold_trait_notifications():
            explorer.slider_scale, explorer.request = -2.0, 1
        assert explorer.answered_request == 1 and not explorer.from_cache and len(calls) == ER_STEPS
        at_minus_2 = explorer.slider_png
        assert at_minus_2 != at_2 and explorer.slider_cached == [-2.0, 0.0, 2.0]
        # Back to 2, then to -2 again: the kernel's cache, no UNet call, the same pictures.
        calls.clear()
        for number, (scale, png) in enumerate([(2.0, at_2), (-2.0, at_minus_2)], start=2):
            with explorer.hold_trait_notifications():
                explorer.slider_scale, explorer.request = scale, number
            assert explorer.answered_request == number and explorer.from_cache and explorer.slider_png == png
        assert calls == []
        # Scale 0 is the model without the slider; another start step is another image (switched on later).
        explorer.show_slider(scale=0.0)
        assert calls == [] and explorer.slider_png == explorer.slider_base_png
        explorer.show_slider(scale=-2.0, start_step=2)
        assert len(calls) == ER_STEPS and explorer.slider_png not in (at_minus_2, explorer.slider_base_png)
        with lab.sliders.apply(tinyworld, [slider_folder], scales=[-2.0], start_step=2):
            assert np.array_equal(
                np.asarray(Image.open(io.BytesIO(explorer.slider_png))), generated(tinyworld, "a red star")
            )
        with pytest.raises(RuntimeError, match="outside the 4 denoising steps"):
            explorer.show_slider(start_step=4)
    finally:
        remove()
    assert_parameters_are(tinyworld, saved)
    check()
    assert explorer.snapshot(64).size[0] == 4 * 64 + 3 * 6


def test_erasing_slider_training_and_bad_sliders(tinyworld, sd1, tmp_path):
    saved = parameters_of(tinyworld)
    explorer = widgets.ErasingExplorer(
        tinyworld, "star", run=False, num_inference_steps=ER_STEPS, seeds=ER_SEEDS, slider_iterations=1
    )
    assert not explorer.slider_loaded and explorer.slider_png == b""
    # A folder without a slider: lab's message; nothing is loaded.
    explorer.load_slider(tmp_path)
    assert "holds no pytorch_lora_weights.safetensors" in explorer.message and not explorer.slider_loaded
    # A slider of another architecture (the tiny SD 1 pipeline): refused before anything is loaded.
    tiny = lab.sliders.train(sd1, positive="large", iterations=1, num_steps=2, progress=False)
    explorer.load_slider(tiny)
    assert "does not fit this UNet" in explorer.message and not explorer.slider_loaded
    assert_parameters_are(tinyworld, saved)
    # Trained from the browser: busy, the iterations counted, then drawn at the scale.
    seen = recorder(explorer, "busy", "progress_text")
    explorer._on_browser_message(explorer, {"event": "train_slider"}, [])
    assert explorer.message == "" and explorer.slider_loaded and explorer.slider.settings["iterations"] == 1
    assert seen["busy"][:2] == [True, False] and any("iteration 1 / 1" in t for t in seen["progress_text"])
    assert explorer.slider_png and explorer.slider_cached == [0.0, 2.0]
    # A bad prompt for the slider's ends: lab's message, the slider in use stays.
    slider = explorer.slider
    assert explorer.train_slider(positive="") is None
    assert "positive must be a non-empty prompt" in explorer.message and explorer.slider is slider
    assert_parameters_are(tinyworld, saved)


def test_erasing_static_html_and_front_end(erasing, tmp_path):
    data, _ = erasing._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in data
    figure = data["text/html"]
    assert figure.startswith('<figure class="sdlab-explorer-static sdlab-erasing-static"')
    assert "Erasing explorer" in figure and "UCE erased" in figure
    assert erasing.snapshot(64).size == (4 * 64 + 3 * 6, 15 + 2 * (64 + 15 + 6))
    script = (STATIC / "erasing.js").read_text()
    assert re.search(r"^\s*import\s", script, re.MULTILINE) is None
    assert re.search(r"https?://|fetch\(|XMLHttpRequest|WebSocket", script) is None
    module = widgets.ErasingExplorer._esm
    assert module.index("function requester(") < module.index("function render(")
    assert module.rstrip().endswith("export default { render };") and (STATIC / "erasing.css").is_file()
    if NODE is not None:
        path = tmp_path / "erasing.mjs"
        path.write_text(module)
        subprocess.run([NODE, "--check", str(path)], check=True, capture_output=True, timeout=60)


def test_erasing_prompts_and_readings():
    from lab.tinyworld.judge import Detection, Reading
    from widgets.erasing import default_preserve, held_out_prompts
    from widgets.erasing_parts import concept_seen, names_concept, reading_text

    assert held_out_prompts("circle") == ["a red circle", "a large blue circle", "a green square", "a yellow triangle"]
    assert held_out_prompts("dog") == ["a dog", "a red dog", "a green circle", "a yellow square"]
    assert default_preserve("dog") == [] and "star" not in default_preserve("star")
    assert names_concept("a large blue star", "star") and not names_concept("a starfish", "star")
    star = Detection("star", "red", "striped", 30.0, 20.0, 20.0, mask=np.zeros((1, 1), bool))
    reading = Reading("plain", [star])
    assert reading_text(reading) == "large striped red star" and reading_text(Reading("plain", [])) == "nothing"
    assert concept_seen(reading, "star") and concept_seen(reading, "red") and concept_seen(reading, "striped")
    assert concept_seen(reading, "circle") is False and concept_seen(reading, "dog") is None
