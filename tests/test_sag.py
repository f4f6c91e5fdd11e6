"""lab.sag against diffusers' StableDiffusionSAGPipeline (SD 1, SD 2 v-prediction, TinyWorld, DPM-Solver, non-square
and odd sizes, image-to-image), its mask and blur against diffusers' and by hand, bad input, restoration after an
exception at every step, and a user's trace around it.

Tolerance: atol = rtol = 1e-4 on latents after 3-4 steps (max |latent| ~19 on tiny SD 1, ~3-5 elsewhere).
Measured max |delta| (torch 2.13 CPU), guidance 5 / 1: tiny SD 1 4.3e-6 / 2.9e-6, tiny SD 2 (v) 3.1e-6 / 9.8e-7,
TinyWorld 4.3e-6 / 0; non-square and odd sizes 3.1e-6 - 3.8e-6; DPM-Solver 1.5e-5. The differences are float32
rounding (lab computes x0^ and the re-noising with abar rounded from float64, diffusers in float32). Every
comparison also checks that SAG moved the latents far more than the tolerance.
"""

import sys

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionSAGPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import gaussian_blur_2d

import lab
from lab.sag import SITE, attention_mask, gaussian_blur

PROMPTS = ["a red circle left of a blue square", "a green triangle"]
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tinyworld():
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd2_for_diffusers(sd2):
    """diffusers' sag_masking takes the head count from unet.config.attention_head_dim, unpacking a list (as
    JSON configs load) but not the tuple the tiny SD 2 was built with: give it the list (nothing else reads it)."""
    heads = sd2.unet.config.attention_head_dim
    sd2.unet.register_to_config(attention_head_dim=list(heads))
    yield sd2
    sd2.unet.register_to_config(attention_head_dim=heads)


def generate(pipe, prompts=PROMPTS, steps=4, height=64, width=64, **kwargs):
    """Latents of `prompts`, seed 0 (image-to-image: no size, the image's)."""
    if "image" not in kwargs:
        kwargs.update(height=height, width=width)
    generator = torch.Generator().manual_seed(0)
    return pipe(prompts, num_inference_steps=steps, output_type="latent", generator=generator, **kwargs).images


def diffusers_sag(pipe, **kwargs):
    reference = StableDiffusionSAGPipeline.from_pipe(pipe)
    reference.set_progress_bar_config(disable=True)
    return generate(reference, **kwargs)


def assert_equal_and_moved(got, expected, plain):
    torch.testing.assert_close(got, expected, **TOL)
    # SAG moved the latents far more than the tolerance: the comparison means something
    assert (expected - plain).abs().max() > 100 * TOL["atol"]


# ---------------------------------------------------------------------------------------------
# Equal to diffusers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2_for_diffusers", "tinyworld"])
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])  # 1.0: no CFG, the cond rows are degraded
def test_latents_equal_diffusers_sag_pipeline(family, guidance_scale, request, restored):
    pipe = request.getfixturevalue(family)
    check = restored(pipe)
    expected = diffusers_sag(pipe, guidance_scale=guidance_scale, sag_scale=0.75)
    with lab.sag(pipe, scale=0.75) as sag:
        got = generate(pipe, guidance_scale=guidance_scale)
    check()
    assert_equal_and_moved(got, expected, generate(pipe, guidance_scale=guidance_scale))
    size = pipe.unet.config.sample_size // 2 if family != "tinyworld" else 4  # the mid block's grid at 64 px
    assert len(sag.masks) == 4 and all(m.dtype == torch.bool and m.shape == (2, size, size) for m in sag.masks)


@pytest.mark.parametrize("height,width", [(64, 96), (72, 64), (88, 72)])  # latents 8x12, 9x8, 11x9
def test_non_square_and_odd_sizes_equal_diffusers(sd1, height, width):
    expected = diffusers_sag(sd1, height=height, width=width, steps=3, guidance_scale=5.0, sag_scale=0.75)
    with lab.sag(sd1) as sag:
        got = generate(sd1, height=height, width=width, steps=3, guidance_scale=5.0)
    assert_equal_and_moved(got, expected, generate(sd1, height=height, width=width, steps=3, guidance_scale=5.0))
    grid = ((height // 8 + 1) // 2, (width // 8 + 1) // 2)  # the mid block is one downsampling below the latent
    assert sag.masks[0].shape == (2, *grid)


def test_dpm_solver_equals_diffusers(sd1, restored):
    """A scheduler with sigmas (lab reads the UNet input's abar from them) and integer timesteps, which diffusers'
    SAG pipeline accepts: the same x0^ and re-noising."""
    check = restored(sd1)
    scheduler = sd1.scheduler
    sd1.scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config)
    try:
        expected = diffusers_sag(sd1, steps=4, guidance_scale=5.0, sag_scale=1.0)
        with lab.sag(sd1, scale=1.0):
            got = generate(sd1, steps=4, guidance_scale=5.0)
        plain = generate(sd1, steps=4, guidance_scale=5.0)
    finally:
        sd1.scheduler = scheduler
    check()
    assert_equal_and_moved(got, expected, plain)


def test_img2img_at_full_strength_equals_diffusers_from_the_same_start(sd1, restored):
    """Image-to-image at strength 1 runs the whole schedule from the noised image latents: diffusers' text-to-image
    SAG pipeline given those latents is the reference. At strength 0.6 it starts late (3 of 5 steps)."""
    img2img = lab.testing.tiny_img2img_pipeline(sd1)
    img2img.set_progress_bar_config(disable=True)
    check = restored(img2img)
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with lab.trace(img2img) as tr, lab.sag(img2img) as sag:
        start = tr.capture("unet", "input", reduce=lab.Stack(), steps=0)
        got = generate(img2img, image=image, strength=1.0, guidance_scale=5.0)
    expected = diffusers_sag(sd1, latents=start["unet"][0], guidance_scale=5.0, sag_scale=0.75)
    assert_equal_and_moved(got, expected, generate(img2img, image=image, strength=1.0, guidance_scale=5.0))
    assert len(sag.masks) == 4
    with lab.sag(img2img) as late:
        moved = generate(img2img, image=image, strength=0.6, steps=5, guidance_scale=5.0)
    check()
    assert len(late.masks) == 3
    assert (moved - generate(img2img, image=image, strength=0.6, steps=5, guidance_scale=5.0)).abs().max() > 1e-2


def test_sdxl_with_euler_guides_and_an_empty_mask_gives_back_the_input(sdxl, restored, monkeypatch):
    """No diffusers reference (its SAG pipeline is SD 1/2 only and refuses Euler's float timesteps). With an empty
    mask nothing is blurred and the re-noised x0^ is the UNet's own input x / sqrt(sigma^2 + 1) again (x0^ and the
    re-noising at the same abar), so the degraded pass equals the uncond rows and SAG adds ~0; with SDXL's
    conditioning taken at the uncond rows, or another abar, it would not."""
    check = restored(sdxl)
    plain = generate(sdxl, steps=3, guidance_scale=5.0)
    with lab.sag(sdxl) as sag:
        got = generate(sdxl, steps=3, guidance_scale=5.0)
    assert torch.isfinite(got).all() and (got - plain).abs().max() > 1e-2
    assert len(sag.masks) == 3 and sag.masks[0].shape == (2, 4, 4)
    monkeypatch.setattr(sys.modules["lab.sag"], "THRESHOLD", float("inf"))  # lab.sag is the function
    with lab.sag(sdxl, scale=5.0) as empty:
        nothing_blurred = generate(sdxl, steps=3, guidance_scale=5.0)
    check()
    assert not torch.stack(empty.masks).any()
    torch.testing.assert_close(nothing_blurred, plain, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# The mask and the blur
# ---------------------------------------------------------------------------------------------


def test_blur_equals_diffusers_gaussian_blur_2d():
    x = torch.randn(2, 4, 9, 13, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gaussian_blur(x, 9, 1.0), gaussian_blur_2d(x, 9, 1.0))
    constant = torch.full((1, 1, 7, 6), 3.0)
    torch.testing.assert_close(gaussian_blur(constant, 9, 1.0), constant)  # the kernel sums to 1
    assert not torch.allclose(gaussian_blur(x, 9, 1.0), x)


def test_mask_is_the_attention_each_position_receives_on_the_sites_grid():
    """(2, 3) grid, 2 heads: every query attends to key 4 in head 0 and to key 1 in head 1 -> mean 0.5 each,
    summed over 6 queries: 3 > 1 at keys 1 and 4, 0 elsewhere; row-major, key 4 is (1, 1), key 1 is (0, 1)."""
    probs = torch.zeros(1, 2, 6, 6)
    probs[0, 0, :, 4] = 1
    probs[0, 1, :, 1] = 1
    expected = torch.zeros(1, 2, 3, dtype=torch.bool)
    expected[0, 1, 1] = expected[0, 0, 1] = True
    assert torch.equal(attention_mask(probs, (2, 3)), expected)
    uniform = torch.full((1, 2, 6, 6), 1 / 6)  # each key receives exactly 1: not > 1
    assert not attention_mask(uniform, (2, 3)).any()


def test_masks_are_those_of_the_uncond_rows_map(sd1, restored):
    check = restored(sd1)
    with lab.trace(sd1) as tr:
        maps = tr.capture(SITE, "probs", reduce=lab.Stack(), rows="uncond")
        degraded = tr.capture(SITE, "probs", reduce=lab.Stack(), rows="all", passes="sag")
        with lab.sag(sd1) as sag:
            generate(sd1, steps=3, guidance_scale=5.0)
        assert tr.describe() == [repr(maps), repr(degraded)]  # SAG's hooks gone, the user's kept
    check()
    probs = maps[SITE]  # (steps, uncond rows, heads, queries, keys): main passes only
    assert [c.pass_name for c in maps.contexts] == ["main"] * 3
    by_hand = probs.mean(2).sum(2).gt(1.0).reshape(3, 2, 4, 4)
    assert torch.equal(torch.stack(sag.masks), by_hand) and 0 < by_hand.float().mean() < 1
    assert [(c.pass_name, c.batch_size, c.parts) for c in degraded.contexts] == [("sag", 2, ("uncond",))] * 3


# ---------------------------------------------------------------------------------------------
# Bad input and restoration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [-0.5, float("nan"), float("inf"), "0.75"])
def test_bad_scales_are_refused(sd1, restored, scale):
    check = restored(sd1)
    with pytest.raises(ValueError, match="finite number >= 0"):
        lab.sag(sd1, scale=scale)
    check()


def test_a_unet_without_mid_block_self_attention_is_refused(sd1):
    unet = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=16,
        mid_block_type=None,
    )
    pipe = StableDiffusionPipeline(**{**sd1.components, "unet": unet})
    with pytest.raises(ValueError, match="no such layer"):
        lab.sag(pipe)
    assert lab.active_hooks(pipe) == []


def test_latents_too_small_for_the_blur_are_a_clear_error(sd1, restored):
    check = restored(sd1)
    with pytest.raises(ValueError, match="reflection, which needs latents above 4 x 4"):
        with lab.sag(sd1):
            generate(sd1, height=32, width=64, steps=1)
    check()


class Stop(Exception):
    pass


@pytest.mark.parametrize("step", [0, 1, 2])
def test_pipeline_is_restored_after_an_exception_at_every_step(sd1, restored, step):
    check = restored(sd1)
    plain = generate(sd1, steps=3, guidance_scale=5.0)

    def stop(pipe, i, t, kwargs):
        if i == step:
            raise Stop
        return kwargs

    with pytest.raises(Stop):
        with lab.sag(sd1) as sag:
            generate(sd1, steps=3, guidance_scale=5.0, callback_on_step_end=stop)
    check()
    assert len(sag.masks) == step + 1 and sag._trace is None and sag._input is None
    assert torch.equal(generate(sd1, steps=3, guidance_scale=5.0), plain)


def test_scale_zero_adds_nothing_and_runs_no_degraded_pass(sd1):
    with lab.trace(sd1) as tr, lab.sag(sd1, scale=0.0) as sag:
        outputs = tr.capture("unet", "output", reduce=lab.Stack(), passes="all")
        got = generate(sd1, steps=2, guidance_scale=5.0)
    torch.testing.assert_close(got, generate(sd1, steps=2, guidance_scale=5.0), atol=1e-5, rtol=0)
    assert [c.pass_name for c in outputs.contexts] == ["main", "main"] and len(sag.masks) == 2


def test_with_guidance_rescale_the_term_goes_into_the_uncond_rows(sd1):
    """StableDiffusionPipeline rescales the guided prediction against its cond rows: SAG leaves them the UNet's
    own then (lab.guidance), so the rescale measures the cond prediction, not cond + term / w."""
    first_outputs = {}
    for scale, rescale in [(0.0, 0.7), (0.75, 0.7), (0.75, 0.0)]:
        with lab.trace(sd1) as tr, lab.sag(sd1, scale=scale):
            outputs = tr.capture("unet", "output", reduce=lab.Stack(), rows="both", steps=0)
            generate(sd1, steps=2, guidance_scale=5.0, guidance_rescale=rescale)
        first_outputs[scale, rescale] = outputs["unet"][0].chunk(2)  # (uncond, cond) rows after SAG's edit
    (u, c), (u_rescaled, c_rescaled), (u_plain, c_plain) = first_outputs.values()
    assert torch.equal(c_rescaled, c) and (u_rescaled - u).abs().max() > 1e-3
    assert torch.equal(u_plain, u) and (c_plain - c).abs().max() > 1e-3
