"""lab.dift: DIFT features equal a hand-run UNet with a plain forward hook, matching is exact where it must be,
and TinyWorld keypoints are found across different instances of a shape."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import lab
from lab import dift
from lab.hooks import CaptureTooLarge
from lab.pipelines import EMBEDDED_MODEL
from lab.tinyworld.world import render, sample_scene

needs_model = pytest.mark.skipif(not (EMBEDDED_MODEL / "model_index.json").exists(), reason="no embedded model")


@pytest.fixture(scope="module")
def tinyworld():
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_images(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def hand_features(pipe, image, prompt, timestep, block, ensemble, seed):
    """The DIFT recipe written out with diffusers and a torch forward hook, no lab hooks involved."""
    vae, config = pipe.vae, pipe.vae.config
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    mean, std = posterior.mean * config.scaling_factor, posterior.std * config.scaling_factor
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((ensemble, *mean.shape[1:]), generator=generator)
    vae_noise = torch.randn((ensemble, *mean.shape[1:]), generator=generator)
    z0 = mean + std * vae_noise
    x_t = pipe.scheduler.add_noise(z0, noise, torch.tensor([timestep]))
    text = pipe.encode_prompt(prompt, "cpu", ensemble, False)[0]
    seen = []

    def keep(module, args, output):  # a down block returns (hidden_states, skip states)
        seen.append(output[0] if isinstance(output, tuple) else output)

    handle = pipe.unet.get_submodule(block).register_forward_hook(keep)
    try:
        with torch.no_grad():
            pipe.unet(x_t, timestep, encoder_hidden_states=text)
    finally:
        handle.remove()
    return F.normalize(seen[0].mean(dim=0, keepdim=True), dim=1)


@pytest.mark.parametrize("block", ["up_blocks.1", "down_blocks.1", "mid_block"])
def test_features_equal_a_hand_run_unet_with_a_forward_hook(sd1, restored, block):
    check = restored(sd1)
    image = random_images(1)[0]
    got = dift.extract(sd1, [image], prompt="a cat", timestep=261, blocks=block, ensemble=3, seed=5, progress=False)
    expected = hand_features(sd1, image, "a cat", 261, block, 3, 5)
    assert got.features.shape == expected.shape
    torch.testing.assert_close(got.features, expected, rtol=1e-4, atol=1e-5)
    check()


def test_the_unet_stops_after_the_last_block_it_needs(sd1):
    calls = []
    handle = sd1.unet.conv_out.register_forward_hook(lambda *args: calls.append(1))
    try:
        dift.extract(sd1, random_images(1), blocks="up_blocks.0", ensemble=2, progress=False)
        assert calls == []
        last = f"up_blocks.{len(sd1.unet.up_blocks) - 1}"  # nothing to skip after it but the output layers
        dift.extract(sd1, random_images(1), blocks=last, ensemble=2, progress=False)
        assert calls == [1]
    finally:
        handle.remove()


def test_the_ensemble_mean_does_not_depend_on_how_rows_are_batched(sd1):
    images = random_images(3)
    one = dift.extract(sd1, images, ensemble=4, batch_size=1, progress=False)
    many = dift.extract(sd1, images, ensemble=4, batch_size=12, progress=False)
    seen = []
    odd = dift.extract(sd1, images, ensemble=4, batch_size=5, progress=False, callback=lambda *a: seen.append(a))
    assert seen == [(5, 12), (10, 12), (12, 12)]
    torch.testing.assert_close(one.features, many.features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(odd.features, many.features, rtol=1e-4, atol=1e-5)
    other_seed = dift.extract(sd1, images, ensemble=4, seed=1, progress=False)
    assert not torch.allclose(other_seed.features, many.features)


def test_several_blocks_are_normalised_and_concatenated(sd1):
    image = random_images(1)
    both = dift.extract(sd1, image, blocks=["up_blocks.0", "up_blocks.1"], ensemble=2, progress=False)
    fine = dift.extract(sd1, image, blocks="up_blocks.1", ensemble=2, progress=False)
    coarse = dift.extract(sd1, image, blocks="up_blocks.0", ensemble=2, progress=False)
    assert both.features.shape[1] == fine.features.shape[1] + coarse.features.shape[1]
    assert both.features.shape[-2:] == fine.features.shape[-2:]
    torch.testing.assert_close(both.features.norm(dim=1), torch.ones(1, *fine.features.shape[-2:]))


def test_a_point_matches_itself_and_sampling_equals_full_upsampling(sd1):
    features = dift.extract(sd1, random_images(2), ensemble=2, progress=False)
    points = [(10.7, 40.2), (33, 5), (20, 52), (47.5, 30.1)]  # inside: every pixel's vector is its own
    where, scores = dift.match_points(features, points, target_index=0)
    assert where[0].tolist() == [[int(x), int(y)] for x, y in points]
    torch.testing.assert_close(scores[0], torch.ones(len(points)))
    # Near the border bilinear upsampling clamps: a few pixels share the edge cell's vector (a tie at 1).
    _, corner_scores = dift.match_points(features, [(0, 0), (63, 63)], target_index=0)
    torch.testing.assert_close(corner_scores[0], torch.ones(2))
    # The source vector at a pixel is what the fully upsampled map holds there (the reference's way).
    full = F.normalize(F.interpolate(features.features[:1], size=(64, 64), mode="bilinear"), dim=1)[0]
    heat = dift.similarity(features, (33, 5), target_index=1)[0]
    target = F.normalize(F.interpolate(features.features[1:], size=(64, 64), mode="bilinear"), dim=1)[0]
    torch.testing.assert_close(heat, torch.einsum("c,chw->hw", full[:, 5, 33], target), rtol=1e-5, atol=1e-6)


def test_dense_matches_of_an_image_with_itself_are_the_identity(sd1):
    features = dift.extract(sd1, random_images(1), ensemble=2, progress=False)
    cells, scores = dift.dense_matches(features, target_index=0)
    height, width = features.features.shape[-2:]
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    assert torch.equal(cells, torch.stack([columns, rows], dim=-1))
    torch.testing.assert_close(scores, torch.ones(height, width))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_families(request, family, restored):
    pipe = request.getfixturevalue(family)
    check = restored(pipe)
    features = dift.extract(pipe, random_images(2), prompt=["a cat", "a dog"], ensemble=2, progress=False)
    preset = dift.PRESETS[dift.preset_for(pipe)]
    assert dift.preset_for(pipe) == {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}[family]
    assert features.settings["blocks"] == list(preset["blocks"]) and len(features) == 2
    (x, y), score = dift.match(features, (30, 30))
    assert 0 <= x < 64 and 0 <= y < 64 and -1 <= score <= 1
    check()


def test_the_images_of_a_lab_run(sd1):
    run = lab.daam.trace_generation(sd1, "a cat", num_inference_steps=2, height=64, width=64)
    features = dift.extract(sd1, run, ensemble=1, progress=False)
    assert np.array_equal(features.image_arrays, run.image_arrays)


def test_save_and_load(sd1, tmp_path):
    features = dift.extract(sd1, random_images(2), ensemble=2, progress=False)
    loaded = dift.DiftFeatures.load(features.save(tmp_path / "features"))
    assert torch.equal(loaded.features, features.features) and loaded.settings == features.settings
    assert np.array_equal(loaded.image_arrays, features.image_arrays) and loaded.image_size == (64, 64)


def test_bad_inputs_are_clear_errors_and_leave_the_pipeline_alone(sd1, restored):
    check = restored(sd1)
    image = random_images(1)
    with pytest.raises(ValueError, match="not blocks of this UNet; its blocks: down_blocks.0"):
        dift.extract(sd1, image, blocks="up_blocks.7")
    with pytest.raises(ValueError, match="not blocks of this UNet"):
        dift.extract(sd1, image, blocks="up_blocks.1.attentions.0")
    for timestep in (1000, -1, 261.5):
        with pytest.raises(ValueError, match=r"integer training timestep in 0..999"):
            dift.extract(sd1, image, timestep=timestep)
    with pytest.raises(ValueError, match="multiple of 8"):
        dift.extract(sd1, random_images(1, size=60))
    with pytest.raises(ValueError, match="RGB"):
        dift.extract(sd1, [Image.new("RGBA", (64, 64))])
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        dift.extract(sd1, image, prompt=["a", "b"])
    with pytest.raises(CaptureTooLarge, match="Extract fewer images"):
        dift.extract(sd1, image, memory_limit=1024)
    features = dift.extract(sd1, random_images(2), ensemble=1, progress=False)
    with pytest.raises(ValueError, match=r"outside the 64x64 image"):
        dift.match(features, (64, 3))
    with pytest.raises(ValueError, match=r"out of range: these features hold 2 image\(s\)"):
        dift.match(features, (3, 3), target_index=2)
    check()


@needs_model
def test_tinyworld_keypoints_are_found_on_other_instances_of_the_shape(tinyworld):
    """A small fixed set of pairs (seeds 9000+, never used to choose the preset): most keypoints land
    within 0.1 of the image size of their true position. The full measurement: benchmarks/dift_pck.py."""
    hits = total = 0
    for pair, shape in enumerate(["star", "heart", "triangle", "cross", "square", "circle"]):
        source = render(sample_scene(9000 + 2 * pair, n_objects=1, shape=shape))
        target = render(sample_scene(9001 + 2 * pair, n_objects=1, shape=shape))
        features = dift.extract(tinyworld, [source.image, target.image], prompt=f"a {shape}", progress=False)
        names = list(source.keypoints[0])
        where, _ = dift.match_points(features, [source.keypoints[0][n] for n in names], target_index=1)
        for i, name in enumerate(names):
            true_x, true_y = target.keypoints[0][name]
            hits += float(np.hypot(where[0, i, 0] - true_x, where[0, i, 1] - true_y)) <= 6.4
            total += 1
    assert hits / total >= 0.6, f"PCK@0.1 {hits}/{total}"
