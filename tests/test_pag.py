"""lab.pag against diffusers' PAG pipelines (SD 1, SD 2 v-prediction, SDXL, TinyWorld, image-to-image, guidance
rescale, adaptive scale), its layer selection, bad input, restoration after an exception at every step, and
stacking with SAG, FreeU and a user's trace.

Tolerance: atol = rtol = 1e-4 on latents after 3-5 steps (max |latent| ~19 on tiny SD 1, ~3-5 elsewhere).
Measured max |delta| (torch 2.13 CPU), guidance 5 / 1: tiny SD 1 1.8e-5 / 8.9e-6, tiny SD 2 (v) 4.2e-6 / 2.4e-6,
TinyWorld 1.6e-5 / 5.5e-6; tiny SDXL 1.9e-5, img2img 4.3e-6, guidance_rescale 0.7 1.5e-5, adaptive 1.3e-5,
layers "up_blocks.1" 9.2e-6. The differences are float32 rounding: diffusers runs the perturbed rows as a third
of one batch and the chosen layers with SDPA, lab as a side pass and with explicit softmax attention. Every
comparison also checks that PAG moved the latents far more than the tolerance, so a test comparing the wrong
things fails.
"""

import re

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionPAGImg2ImgPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionXLPAGPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

import lab
from lab.guidance import fold_term
from lab.hooks import Site, StepContext
from lab.hooks.context import row_groups
from lab.pag import PAG, perturbed_layers

PROMPTS = ["a red circle left of a blue square", "a green triangle"]
TOL = dict(atol=1e-4, rtol=1e-4)
MID = "mid_block.attentions.0.transformer_blocks.0.attn1"


@pytest.fixture(scope="module")
def tinyworld():
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts, steps=3, **kwargs):
    """Latents of `prompts` at 64 x 64 (image-to-image: the image's size), seed 0."""
    if "image" not in kwargs:
        kwargs.update(height=64, width=64)
    generator = torch.Generator().manual_seed(0)
    return pipe(prompts, num_inference_steps=steps, output_type="latent", generator=generator, **kwargs).images


def diffusers_pag(pipe, layers="mid", pipeline_class=StableDiffusionPAGPipeline, **kwargs):
    reference = pipeline_class.from_pipe(pipe, pag_applied_layers=layers)
    reference.set_progress_bar_config(disable=True)
    return generate(reference, PROMPTS, **kwargs)


def lab_pag(pipe, scale=3.0, layers="mid", **kwargs):
    with lab.pag(pipe, scale=scale, layers=layers) as pag:
        latents = generate(pipe, PROMPTS, **kwargs)
    return latents, pag


def assert_equal_and_moved(got, expected, plain):
    torch.testing.assert_close(got, expected, **TOL)
    # PAG moved the latents far more than the tolerance: the comparison means something
    assert (expected - plain).abs().max() > 100 * TOL["atol"]


# ---------------------------------------------------------------------------------------------
# Equal to diffusers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "tinyworld"])
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])  # 1.0: no classifier-free guidance, [cond] rows only
def test_latents_equal_diffusers_pag_pipeline(family, guidance_scale, request, restored):
    pipe = request.getfixturevalue(family)
    check = restored(pipe)
    options = dict(steps=4, guidance_scale=guidance_scale)
    expected = diffusers_pag(pipe, pag_scale=3.0, **options)
    got, pag = lab_pag(pipe, **options)
    check()
    assert_equal_and_moved(got, expected, generate(pipe, PROMPTS, **options))
    assert pag.layers == [MID] and pag.scales == [3.0] * 4


def test_sdxl_equals_diffusers(sdxl, restored):
    check = restored(sdxl)
    expected = diffusers_pag(
        sdxl, pipeline_class=StableDiffusionXLPAGPipeline, steps=3, guidance_scale=5.0, pag_scale=3.0
    )
    got, _ = lab_pag(sdxl, steps=3, guidance_scale=5.0)
    check()
    assert_equal_and_moved(got, expected, generate(sdxl, PROMPTS, steps=3, guidance_scale=5.0))


def test_img2img_equals_diffusers(sd1, restored):
    img2img = lab.testing.tiny_img2img_pipeline(sd1)
    img2img.set_progress_bar_config(disable=True)
    check = restored(img2img)
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    options = dict(image=image, strength=0.6, steps=5, guidance_scale=4.0)
    expected = diffusers_pag(img2img, pipeline_class=StableDiffusionPAGImg2ImgPipeline, pag_scale=3.0, **options)
    got, pag = lab_pag(img2img, **options)
    check()
    assert_equal_and_moved(got, expected, generate(img2img, PROMPTS, **options))
    assert len(pag.scales) == 3  # strength 0.6 of 5 steps


def test_block_and_glob_layers_equal_diffusers_regex(sd1):
    """diffusers' "up_blocks.1" (a regex search) is lab's block site "up_blocks.1": its self-attention layers."""
    options = dict(steps=3, guidance_scale=5.0)
    expected = diffusers_pag(sd1, layers="up_blocks.1", pag_scale=2.0, **options)
    got, pag = lab_pag(sd1, scale=2.0, layers="up_blocks.1", **options)
    assert_equal_and_moved(got, expected, generate(sd1, PROMPTS, **options))
    assert pag.layers == [f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn1" for i in (0, 1)]
    got_glob, _ = lab_pag(sd1, scale=2.0, layers="up_blocks.1.attentions.*.attn1", **options)
    assert torch.equal(got_glob, got)


def test_adaptive_scale_equals_diffusers_and_clips_at_zero(sd1):
    options = dict(steps=4, guidance_scale=5.0)
    expected = diffusers_pag(sd1, pag_scale=3.0, pag_adaptive_scale=0.005, **options)
    with lab.pag(sd1, scale=3.0, adaptive_scale=0.005) as pag:
        got = generate(sd1, PROMPTS, **options)
    assert_equal_and_moved(got, expected, generate(sd1, PROMPTS, **options))
    timesteps = sd1.scheduler.timesteps.tolist()  # 751, 501, 251, 1
    assert pag.scales == pytest.approx([max(3.0 - 0.005 * (1000 - t), 0.0) for t in timesteps])
    assert pag.scales[-1] == 0.0 and pag.scales[0] > 0  # clipped: no perturbed pass at those steps


def test_guidance_rescale_measures_the_unperturbed_cond_as_diffusers(sd1):
    """diffusers rescales u + w(c - u) + s(c - p) against std(c): lab folds the term into the uncond rows
    then, so the pipeline's rescale sees the UNet's own cond rows (folding into cond would not match)."""
    options = dict(steps=4, guidance_scale=5.0, guidance_rescale=0.7)
    expected = diffusers_pag(sd1, pag_scale=3.0, **options)
    got, _ = lab_pag(sd1, **options)
    torch.testing.assert_close(got, expected, **TOL)
    without_rescale = diffusers_pag(sd1, pag_scale=3.0, steps=4, guidance_scale=5.0)
    assert (expected - without_rescale).abs().max() > 100 * TOL["atol"]


def _context(parts, images):
    groups = row_groups(parts, images * len(parts), {})
    span = {part: slice(rows[0], rows[-1] + 1) for part, rows in groups.items()}
    none = slice(0, 0)
    return StepContext(
        0,
        0,
        1.0,
        4,
        "",
        "",
        span.get("uncond", none),
        span.get("cond", none),
        images * len(parts),
        (5, 5),
        0,
        parts=parts,
        groups=groups,
    )


def test_fold_term_makes_the_pipelines_guidance_add_the_term():
    torch.manual_seed(0)
    u, c, term = torch.randn(3, 2, 4, 5, 5).unbind(0)
    w = 5.0
    for rescale in (0.0, 0.7):
        folded_u, folded_c = fold_term(torch.cat([u, c]), _context(("uncond", "cond"), 2), term, w, rescale).chunk(2)
        guided = rescale_noise_cfg(folded_u + w * (folded_c - folded_u), folded_c, guidance_rescale=rescale)
        expected = rescale_noise_cfg(u + w * (c - u) + term, c, guidance_rescale=rescale)
        torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(folded_c if rescale else folded_u, c if rescale else u)  # the other rows untouched
    assert torch.equal(fold_term(c, _context(("cond",), 2), term, 1.0), c + term)
    with pytest.raises(ValueError, match="diffusers' PAG or SAG pipelines"):
        fold_term(torch.cat([u, c, c]), _context(("uncond", "cond", "perturbed"), 2), term, w)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def _site(name, kind, place):
    return Site(name, kind, place, 0, None)


def test_a_block_never_picks_blocks_whose_number_starts_the_same():
    """diffusers' regex "down_blocks.1" also matches "down_blocks.10..." (diffusers#13594); lab's block site doesn't."""
    names = [f"down_blocks.{n}.attentions.0.transformer_blocks.0.attn{k}" for n in (1, 10) for k in (1, 2)]
    records = [_site(f"down_blocks.{n}", "block", "down") for n in (1, 10)]
    records += [_site(name, "self" if name.endswith("attn1") else "cross", "down") for name in names]
    picked = [site.name for site in perturbed_layers(records, "down_blocks.1")]
    assert picked == ["down_blocks.1.attentions.0.transformer_blocks.0.attn1"]
    assert [s.name for s in perturbed_layers(records, "down_blocks.1.*")] == picked  # the glob needs the dot
    regex_picks = [n for n in names if n.endswith("attn1") and re.search("down_blocks.1", n)]
    assert len(regex_picks) == 2  # what diffusers' search picks: both blocks


def test_layers_shorthand_resolution_and_names(sd1):
    assert [s.name for s in perturbed_layers(sd1, "mid")] == [MID]
    assert [s.name for s in perturbed_layers(sd1, "mid_block")] == [MID]
    assert [s.name for s in perturbed_layers(sd1, "down self")] == [
        f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn1" for i in (0, 1)
    ]
    # a resolution word is resolved at the run: at 64 px the tiny UNet's up blocks run at 4x4 and 8x8
    with lab.pag(sd1, layers="up self 4x4") as pag:
        generate(sd1, PROMPTS, steps=1)
    assert pag.layers == [f"up_blocks.0.attentions.{i}.transformer_blocks.0.attn1" for i in (0, 1)]


@pytest.mark.parametrize(
    "layers,message",
    [
        ("mid cross", "picks no self-attention layer"),
        ("blocks.1", r"pag_applied_layers='blocks.1', a regex .* picks 3 self-attention layers"),
        ("down.block_1", "'down.block_1' reads 'down_blocks.1' here"),
        ("nothing_here", "unknown site 'nothing_here'"),
    ],
)
def test_layers_matching_no_self_attention_are_refused_before_anything_is_registered(sd1, restored, layers, message):
    check = restored(sd1)
    with pytest.raises(ValueError, match=message):
        lab.pag(sd1, layers=layers)
    with lab.trace(sd1) as tr:
        with pytest.raises(ValueError):
            with lab.pag(sd1, layers=layers):
                pass
        assert tr.describe() == []
    check()


@pytest.mark.parametrize(
    "bad", [dict(scale=-1.0), dict(scale=float("nan")), dict(adaptive_scale=-0.1), dict(scale=True)]
)
def test_bad_scales_are_refused(sd1, restored, bad):
    check = restored(sd1)
    with pytest.raises(ValueError, match="finite number >= 0"):
        lab.pag(sd1, **bad)
    check()


# ---------------------------------------------------------------------------------------------
# Restoration and stacking
# ---------------------------------------------------------------------------------------------


class Stop(Exception):
    pass


@pytest.mark.parametrize("step", [0, 1, 2])
def test_pipeline_is_restored_after_an_exception_at_every_step(sd1, restored, step):
    check = restored(sd1)
    plain = generate(sd1, PROMPTS, steps=3, guidance_scale=5.0)

    def stop(pipe, i, t, kwargs):
        if i == step:
            raise Stop
        return kwargs

    with pytest.raises(Stop):
        with lab.pag(sd1, layers="up self"):
            generate(sd1, PROMPTS, steps=3, guidance_scale=5.0, callback_on_step_end=stop)
    check()
    assert torch.equal(generate(sd1, PROMPTS, steps=3, guidance_scale=5.0), plain)


def test_an_error_inside_the_perturbed_pass_leaves_the_users_trace_working(sd1, restored):
    check = restored(sd1)

    def fail(x, ctx):
        if ctx.step == 1:
            raise Stop
        return x

    with lab.trace(sd1) as tr:
        tr.edit(MID, "output", fail, rows="perturbed")  # the user's edit, on PAG's perturbed rows only
        with pytest.raises(Stop):
            with lab.pag(sd1):
                generate(sd1, PROMPTS, steps=3)
        assert len(tr.describe()) == 1  # PAG's hooks are gone, the user's edit stays
        outputs = tr.capture("unet", "output", reduce=lab.Stack())
        generate(sd1, PROMPTS, steps=2)  # no pag pass any more: the edit never fails
        assert [(ctx.step, ctx.pass_name) for ctx in outputs.contexts] == [(0, "main"), (1, "main")]
    check()


def test_inside_a_user_trace_captures_pick_the_perturbed_rows_by_name(sd1, restored):
    check = restored(sd1)
    with lab.trace(sd1) as tr:
        main = tr.capture(MID, "probs", reduce=lab.Stack(), rows=["uncond", "cond"])
        perturbed = tr.capture(MID, "probs", reduce=lab.Stack(), rows="perturbed")
        with lab.pag(sd1) as pag:
            got = generate(sd1, PROMPTS, steps=3)
        assert len(tr.describe()) == 2  # PAG's hooks are gone, the user's stay
    check()
    assert [c.pass_name for c in main.contexts] == ["main"] * 3 and main[MID].shape[1] == 4  # [uncond, cond] x 2
    probs = perturbed[MID]  # (steps, cond rows, heads, queries, keys): the identity
    assert [c.parts for c in perturbed.contexts] == [("uncond", "cond", "perturbed")] * 3 and probs.shape[1] == 2
    assert torch.equal(probs, torch.eye(probs.shape[-1]).expand_as(probs))
    alone, _ = lab_pag(sd1, steps=3)
    assert torch.equal(got, alone) and pag.layers == [MID]


def test_pag_and_sag_stack_additively_in_either_order(sd1, restored):
    """One step: the DDIM update is affine in the prediction, and both terms are read from the same rows, so
    the latents' changes add up (a technique reading the other's folded rows would break this)."""
    check = restored(sd1)
    options = dict(steps=1, guidance_scale=5.0)
    scheduler = sd1.scheduler
    sd1.scheduler = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")  # the step at t = 999
    try:
        plain = generate(sd1, PROMPTS, **options)
        alone_pag, _ = lab_pag(sd1, **options)
        with lab.sag(sd1):
            alone_sag = generate(sd1, PROMPTS, **options)
        with lab.pag(sd1), lab.sag(sd1):
            pag_then_sag = generate(sd1, PROMPTS, **options)
        with lab.sag(sd1), lab.pag(sd1):
            sag_then_pag = generate(sd1, PROMPTS, **options)
    finally:
        sd1.scheduler = scheduler
    check()
    torch.testing.assert_close(pag_then_sag, sag_then_pag, atol=1e-6, rtol=0)
    # the update divides by sqrt(abar_999) ~ 0.07: float32 rounding of the predictions grows to ~5e-5
    torch.testing.assert_close(pag_then_sag - plain, (alone_pag - plain) + (alone_sag - plain), atol=1e-4, rtol=0)
    assert min((alone_pag - plain).abs().max(), (alone_sag - plain).abs().max()) > 0.1


def test_stacks_with_freeu_as_diffusers_pag_with_enable_freeu(tinyworld, restored):
    from lab.freeu import FREEU_PRESETS

    check = restored(tinyworld)
    values = FREEU_PRESETS["sd15"]
    options = dict(steps=3, guidance_scale=5.0)
    tinyworld.enable_freeu(**values)
    try:
        expected = diffusers_pag(tinyworld, pag_scale=3.0, **options)
    finally:
        tinyworld.disable_freeu()
    with lab.freeu(tinyworld, preset="sd15"), lab.pag(tinyworld, scale=3.0):
        got = generate(tinyworld, PROMPTS, **options)
    check()
    pag_only, _ = lab_pag(tinyworld, **options)
    assert_equal_and_moved(got, expected, pag_only)


def test_reentering_and_repr(sd1):
    pag = PAG(sd1, scale=2.0, layers="up self", adaptive_scale=0.001)
    assert "scale=2, adaptive_scale=0.001 on 4 self-attention layers" in repr(pag)
    with pag:
        with pytest.raises(RuntimeError, match="already active"):
            pag.__enter__()
    with pag:
        generate(sd1, PROMPTS, steps=1)
    assert len(pag.scales) == 1 and lab.active_hooks(sd1) == []
