"""lab.freeu against diffusers' enable_freeu, the paper's structure-aware factor by hand, half precision,
restoration and stacking with a user's trace."""

import contextlib
import math

import diffusers
import pytest
import torch
from conftest import generate, snapshot

import lab
from lab.freeu import FREEU_PRESETS, backbone_scale, low_frequency_scaled, preset_for

PROMPT = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def tinyworld():
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_freeu(pipe, values, **kwargs):
    pipe.enable_freeu(**values)
    try:
        return generate(pipe, PROMPT, **kwargs)
    finally:
        pipe.disable_freeu()


# ---------------------------------------------------------------------------------------------
# Equal to diffusers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,preset", [("sd1", "sd15"), ("sd2", "sd21"), ("sdxl", "sdxl"), ("tinyworld", None)])
def test_latents_equal_diffusers_enable_freeu(family, preset, request, restored):
    pipe = request.getfixturevalue(family)
    check = restored(pipe)
    values = FREEU_PRESETS[preset or preset_for(pipe)]
    plain = generate(pipe, PROMPT, steps=4)
    expected = diffusers_freeu(pipe, values, steps=4)
    with lab.freeu(pipe, preset=preset):
        got = generate(pipe, PROMPT, steps=4)
    check()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - plain).abs().max() > 0.1  # FreeU changed the latents: the comparison means something
    assert torch.equal(generate(pipe, PROMPT, steps=4), plain)  # and nothing of it is left


def test_img2img_equals_diffusers_with_explicit_values(sd1, restored):
    img2img = lab.testing.tiny_img2img_pipeline(sd1)
    img2img.set_progress_bar_config(disable=True)
    check = restored(img2img)
    values = dict(b1=1.2, b2=1.7, s1=0.6, s2=0.3)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = diffusers_freeu(img2img, values, image=image, strength=0.6, steps=5)
    with lab.freeu(img2img, **values):
        got = generate(img2img, PROMPT, image=image, strength=0.6, steps=5)
    check()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, generate(img2img, PROMPT, image=image, strength=0.6, steps=5))


def test_values_given_override_the_preset_and_the_family_picks_the_default(sd1, sd2, sdxl, tinyworld):
    assert [preset_for(p) for p in (sd1, sd2, sdxl, tinyworld)] == ["sd15", "sd21", "sdxl", "sd15"]
    with lab.trace(sd1) as tr, lab.freeu(sd1, preset="sd21", b2=1.1):
        seen = tr.describe()
    assert any("freeu_backbone(b=1.4)" in line for line in seen)  # b1 from sd21
    assert any("freeu_backbone(b=1.1)" in line for line in seen)  # b2 given
    assert any("freeu_skip(s=0.9)" in line for line in seen) and any("freeu_skip(s=0.2)" in line for line in seen)


# ---------------------------------------------------------------------------------------------
# The formulas, by hand
# ---------------------------------------------------------------------------------------------


def test_structure_aware_backbone_equals_the_readme_by_hand(sd1, restored):
    check = restored(sd1)
    site, b1 = "up_blocks.0.resnets.1", 1.5
    with lab.trace(sd1) as tr:
        before = []  # an edit registered before FreeU's sees the backbone FreeU is given
        tr.edit(site, "backbone", lambda x, ctx: before.append(x.clone()) or x)
        after = tr.capture(site, "backbone", reduce=lab.Stack(), rows="both")  # captures see the edited tensor
        with lab.freeu(sd1, b1=b1, structure_aware=True):
            generate(sd1, PROMPT, steps=2)
    check()
    h = before[0]
    # FreeU repository README (SD branch), with this UNet's half of the channels:
    hidden_mean = h.mean(1).unsqueeze(1)
    B = hidden_mean.shape[0]
    hidden_max, _ = torch.max(hidden_mean.view(B, -1), dim=-1, keepdim=True)
    hidden_min, _ = torch.min(hidden_mean.view(B, -1), dim=-1, keepdim=True)
    hidden_mean = (hidden_mean - hidden_min.unsqueeze(2).unsqueeze(3)) / (hidden_max - hidden_min).unsqueeze(
        2
    ).unsqueeze(3)
    expected = h.clone()
    half = h.shape[1] // 2
    expected[:, :half] = expected[:, :half] * ((b1 - 1) * hidden_mean + 1)
    torch.testing.assert_close(after[site][0], expected, rtol=1e-6, atol=1e-6)
    constant = h.clone()
    constant[:, :half] *= b1
    assert not torch.allclose(after[site][0], constant)  # not diffusers' constant factor
    assert torch.equal(after[site][0][:, half:], h[:, half:])


def test_structure_aware_factor_is_one_on_a_flat_map():
    x = torch.ones(1, 4, 3, 3)
    assert torch.equal(backbone_scale(1.5, structure_aware=True)(x, None), x)  # max = min: α = 1, no NaN
    assert torch.equal(backbone_scale(1.5)(x, None)[:, :2], 1.5 * x[:, :2])


@pytest.mark.parametrize("size", [(8, 8), (5, 7), (1, 1), (2, 3)])
def test_skip_filter_scales_the_centred_low_frequency_box(size):
    """The paper's box with threshold 1, by the centred spectrum (fftshift), as the repository writes it."""
    h = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = 0.2
    freq = torch.fft.fftshift(torch.fft.fftn(h, dim=(-2, -1)), dim=(-2, -1))
    mask = torch.ones(size, dtype=torch.float64)
    crow, ccol = size[0] // 2, size[1] // 2
    mask[max(crow - 1, 0) : crow + 1, max(ccol - 1, 0) : ccol + 1] = s
    expected = torch.fft.ifftn(torch.fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real
    torch.testing.assert_close(low_frequency_scaled(h, s), expected, rtol=1e-12, atol=1e-12)
    # The mean (frequency 0) is scaled by s.
    torch.testing.assert_close(low_frequency_scaled(h, s).mean((-2, -1)), s * h.mean((-2, -1)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_skips_are_filtered_in_float32_and_cast_back(dtype):
    from diffusers.utils.torch_utils import fourier_filter  # the reference, only in the test

    h = torch.randn(2, 8, 16, 12, generator=torch.Generator().manual_seed(0)).to(dtype)
    got = low_frequency_scaled(h, 0.2)
    assert got.dtype == dtype
    assert torch.equal(got, low_frequency_scaled(h.float(), 0.2).to(dtype))
    assert torch.equal(got, fourier_filter(h, threshold=1, scale=0.2))
    exact = low_frequency_scaled(h.double(), 0.2)
    assert (got.double() - exact).abs().max() <= 2 * torch.finfo(dtype).eps * exact.abs().max()


@pytest.mark.skipif(
    tuple(int(part) for part in diffusers.__version__.split(".")[:2]) < (0, 32),
    reason="diffusers before 0.32 runs FreeU's FFT in bfloat16, which torch refuses (diffusers PR #10125)",
)
def test_bf16_pipeline_equals_diffusers(restored):
    pipe = lab.testing.tiny_sd1_pipeline().to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    check = restored(pipe)
    values = FREEU_PRESETS["sd15"]
    expected = diffusers_freeu(pipe, values, steps=2)
    with lab.freeu(pipe, **values):
        got = generate(pipe, PROMPT, steps=2)
    check()
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------
# Restoration, bad input, stacking
# ---------------------------------------------------------------------------------------------


def test_pipeline_restored_after_an_exception_mid_generation(sd1, restored):
    check = restored(sd1)
    plain = generate(sd1, PROMPT, steps=3)

    def stop(pipe, step, timestep, kwargs):
        if step == 1:
            raise KeyboardInterrupt
        return kwargs

    with pytest.raises(KeyboardInterrupt):
        with lab.freeu(sd1):
            generate(sd1, PROMPT, steps=3, callback_on_step_end=stop)
    check()
    assert lab.active_hooks(sd1) == [] and lab.hooks._ACTIVE_TRACES.get(sd1.unet) is None
    assert torch.equal(generate(sd1, PROMPT, steps=3), plain)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(preset="sd3"), ValueError, "unknown FreeU preset 'sd3': choose one of sd14, sd15, sd21, sdxl"),
        (dict(b1=-1.0), ValueError, r"b1 must be a finite number >= 0, got -1.0"),
        (dict(s2=math.nan), ValueError, r"s2 must be a finite number >= 0, got nan"),
        (dict(b2=math.inf), ValueError, "b2 must be a finite number"),
        (dict(s1="0.9"), TypeError, "s1 must be a number, got str"),
        (dict(b1=True), TypeError, "b1 must be a number, got bool"),
        (dict(structure_aware="yes"), TypeError, "structure_aware must be True or False"),
    ],
)
def test_bad_arguments_raise_before_anything_is_registered(sd1, restored, kwargs, error, message):
    check = restored(sd1)
    with pytest.raises(error, match=message):
        lab.freeu(sd1, **kwargs)  # raised by the call itself, not on entering
    check()
    with lab.trace(sd1) as tr:
        tr.capture("cross", "probs")
        described = tr.describe()
        with pytest.raises(error, match=message):
            with lab.freeu(sd1, **kwargs):
                pass
        assert tr.describe() == described  # the user's trace is as it was


def test_a_unet_without_two_decoder_stages_is_refused(restored):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        layers_per_block=1,
        cross_attention_dim=32,
        norm_num_groups=16,
    )
    before = snapshot(unet)
    with pytest.raises(ValueError, match=r"two decoder stages .*up_blocks.1 is not one .*up_blocks.0"):
        lab.freeu(unet, preset="sd15")
    assert snapshot(unet) == before
    with pytest.raises(TypeError, match="expected a diffusers"):
        lab.freeu(object())


def test_freeu_inside_a_user_trace_shows_in_the_user_captures_and_leaves_the_trace_as_it_was(sd1, restored):
    check = restored(sd1)
    site, b2 = "up_blocks.1.resnets.0", 1.6
    with lab.trace(sd1) as tr:
        given = []
        tr.edit(site, "backbone", lambda x, ctx: given.append(x.clone()) or x)  # before FreeU's edit
        backbone = tr.capture("merge", "backbone", reduce=lab.Stack(), rows="both")
        described = tr.describe()
        with lab.freeu(sd1, preset="sd15"):
            assert len(tr.describe()) == len(described) + 4  # backbone and skip edits for two stages
            generate(sd1, PROMPT, steps=2)
        assert tr.describe() == described
        scaled = backbone[site]
        half = scaled.shape[2] // 2
        for step, before in enumerate(given):
            torch.testing.assert_close(scaled[step][:, :half], b2 * before[:, :half], rtol=0, atol=0)
            assert torch.equal(scaled[step][:, half:], before[:, half:])
        backbone.reset()
        given.clear()
        generate(sd1, PROMPT, steps=2)  # FreeU has left: the capture sees the backbone as given
        assert all(torch.equal(backbone[site][step], given[step]) for step in range(2))
    check()


def test_two_techniques_on_one_trace_compose(sd1, restored):
    """Two FreeU contexts stack on one shared trace: the backbone factors multiply."""
    check = restored(sd1)
    site = "up_blocks.0.resnets.0"  # the first merge: its backbone comes from the mid block, before any FreeU edit
    captured = []
    for techniques in ([lab.freeu(sd1, b1=1.5, s1=1.0), lab.freeu(sd1, b1=2.0, s1=1.0)], []):
        with lab.trace(sd1) as tr, contextlib.ExitStack() as stack:
            backbone = tr.capture(site, "backbone", reduce=lab.Stack(), rows="both")
            for technique in techniques:
                stack.enter_context(technique)
            generate(sd1, PROMPT, steps=1)
        captured.append(backbone[site][0])
    once, plain = captured
    check()
    half = once.shape[1] // 2
    torch.testing.assert_close(once[:, :half], 3.0 * plain[:, :half], rtol=0, atol=0)
    assert torch.equal(once[:, half:], plain[:, half:])
