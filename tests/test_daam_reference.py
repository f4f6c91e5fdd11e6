"""DAAM, OVAM, self-attention maps and the x0 trajectory on the embedded model are what the code of commit
f14f05c (before the core refactor) computed, up to float32 round-off on CPU: max relative difference <= 1e-6.
The reference file is written by tests/data/make_daam_reference.py."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import lab
from lab.pipelines import EMBEDDED_MODEL

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
from make_daam_reference import OUT, reference_maps  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (EMBEDDED_MODEL / "model_index.json").exists(), reason="the embedded model is not in this checkout"
)


@pytest.fixture(scope="module")
def maps():
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return reference_maps(pipe)


def test_maps_match_the_reference_saved_before_the_refactor(maps):
    with safe_open(str(OUT), framework="pt") as reference:
        assert sorted(reference.keys()) == sorted(maps)
        for key in reference.keys():
            expected, got = reference.get_tensor(key), maps[key]
            assert got.shape == expected.shape and got.dtype == expected.dtype, key
            if expected.dtype == torch.uint8:  # decoded images: the same pixels
                assert torch.equal(got, expected), key
                continue
            scale = expected.abs().max().clamp(min=torch.finfo(torch.float32).tiny)
            relative = float((got - expected).abs().max() / scale)
            assert relative <= 1e-6, f"{key}: max relative difference {relative:.2e}"


def test_the_reference_is_not_trivial(maps):
    """A check that could pass on blank maps would prove nothing: words must land in different places."""
    circle, square = maps["0/daam/circle"].numpy(), maps["0/daam/square"].numpy()
    assert circle.std() > 0 and square.std() > 0
    assert np.unravel_index(circle.argmax(), circle.shape) != np.unravel_index(square.argmax(), square.shape)
