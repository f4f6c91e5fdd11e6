"""lab.results.Result: the shape every technique's result has, saved as safetensors + JSON, refused clearly
when a folder cannot be read."""

import json

import numpy as np
import pytest
import torch

import lab.daam
from lab.results import Result, ResultFormatError


class Toy(Result):
    FORMAT = "sdlab.test.Toy"
    VERSION = 2

    def __init__(self, latents, images=None, settings=None):
        self.latents = latents
        self.image_arrays = images
        self.settings = dict(settings or {})

    def to_record(self):
        return {"settings": self.settings}, {"latents": self.latents}

    @classmethod
    def from_record(cls, metadata, tensors, images):
        return cls(tensors["latents"], images, metadata["settings"])


@pytest.fixture
def toy():
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    return Toy(torch.randn(2, 4, 1, 1), images, {"seed": 3, "prompt": "a red circle"})


def test_round_trip_keeps_tensors_images_settings_and_versions(toy, tmp_path):
    folder = toy.save(tmp_path / "toy")
    metadata = json.loads((folder / Toy.METADATA_FILE).read_text())
    assert metadata["format"] == "sdlab.test.Toy" and metadata["version"] == 2 and metadata["sdlab_version"]
    loaded = Toy.load(folder)
    assert torch.equal(loaded.latents, toy.latents)
    assert np.array_equal(loaded.image_arrays, toy.image_arrays) and loaded.settings == toy.settings
    assert [image.size for image in loaded.images] == [(8, 8), (8, 8)]
    assert not list(folder.glob("*.pt")) and not list(folder.glob("*.pkl"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda f: (f / Toy.METADATA_FILE).write_text('{"format": "sdlab.test.Toy", "vers'),
            "is corrupted.*save the result again",
        ),
        (lambda f: (f / Toy.METADATA_FILE).unlink(), "has no result.json"),
        (lambda f: (f / Toy.TENSORS_FILE).unlink(), "tensors.safetensors is missing"),
        (lambda f: (f / Toy.TENSORS_FILE).write_bytes(b"\x00" * 5), "corrupted or not a safetensors file"),
        (
            lambda f: (f / Toy.METADATA_FILE).write_text(json.dumps({"format": "sdlab.other", "version": 1})),
            "not an sdlab Toy.*holds 'sdlab.other'",
        ),
        (
            lambda f: (f / Toy.METADATA_FILE).write_text(json.dumps({"format": "sdlab.test.Toy", "version": 9})),
            "version 9.*reads versions up to 2: update sdlab",
        ),
        (
            lambda f: (f / Toy.METADATA_FILE).write_text(json.dumps({"format": "sdlab.test.Toy", "version": 2})),
            "incomplete or corrupted",
        ),
    ],
)
def test_a_damaged_folder_is_a_clear_error(toy, tmp_path, damage, message):
    folder = toy.save(tmp_path / "toy")
    damage(folder)
    with pytest.raises(ResultFormatError, match=message):
        Toy.load(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        Toy.load(tmp_path / "nowhere")


def test_attribution_run_refuses_a_corrupted_run_json(sd1, tmp_path):
    run = lab.daam.trace_generation(sd1, "a red circle", num_inference_steps=2, height=64, width=64)
    folder = run.save(tmp_path / "run")
    text = (folder / "run.json").read_text()
    (folder / "run.json").write_text(text[: len(text) // 2])
    with pytest.raises(ResultFormatError, match="run.json is corrupted"):
        lab.daam.AttributionRun.load(folder)
    with pytest.raises(ResultFormatError, match="not an sdlab AttributionRun"):
        lab.daam.AttributionRun.load(Toy(torch.zeros(1)).save(tmp_path / "toy"))
