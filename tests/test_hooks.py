"""lab.hooks on tiny random pipelines: sites, selectors, captures, edits, steps, guidance, restoration."""

import re
import warnings

import numpy as np
import pytest
import torch
from conftest import generate, snapshot
from diffusers.models.attention_processor import Attention

import lab

PROMPT = "a photograph of an astronaut riding a horse"
CROSS_UP = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
SELF_UP = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"


# ---------------------------------------------------------------------------------------------
# Sites and selectors
# ---------------------------------------------------------------------------------------------


def test_sites_index_every_attention_module_and_block(any_pipe):
    unet = any_pipe.unet
    found = lab.sites(any_pipe)
    attention_names = {name for name, module in unet.named_modules() if isinstance(module, Attention)}
    assert {s.name for s in found if s.is_attention} == attention_names
    assert {s.name for s in found if s.is_attention} == {
        name.removesuffix(".processor") for name in unet.attn_processors
    }
    blocks = [s.name for s in found if s.kind == "block"]
    assert blocks == [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"] + [
        f"up_blocks.{i}" for i in range(len(unet.up_blocks))
    ]
    for site in found:
        if site.is_attention:
            assert site.kind == ("self" if site.name.endswith("attn1") else "cross")
            assert site.place == {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[site.name.split(".")[0]]
        assert site.module is unet.get_submodule(site.name)


@pytest.mark.parametrize("height,width", [(64, 64), (64, 96), (72, 40)])
def test_spatial_sizes_follow_the_actual_latent(sd1, height, width):
    """Attention queries and block outputs have the size lab predicts, also non-square and odd."""
    with lab.trace(sd1) as tr:
        outputs = tr.capture(["attention", "blocks"], "output", reduce=lab.Stack())
        generate(sd1, steps=1, height=height, width=width)
    latent = (height // 8, width // 8)
    by_name = {s.name: s for s in lab.sites(sd1)}
    for name, tensor in outputs.result().items():
        h, w = by_name[name].spatial_size(latent)
        if by_name[name].is_attention:
            assert tensor.shape[2] == h * w, name  # (steps, batch, queries, channels)
        else:
            assert tensor.shape[-2:] == (h, w), name
        assert outputs.sizes[name] == (h, w)


def test_selectors_every_kind(sdxl):
    names = [s.name for s in lab.sites(sdxl)]
    pick = lambda sel, **kw: [s.name for s in lab.select_sites(sdxl, sel, **kw)]  # noqa: E731
    cross = [n for n in names if n.endswith("attn2")]
    self_ = [n for n in names if n.endswith("attn1")]

    assert pick(CROSS_UP.replace("up_blocks.1", "up_blocks.0")) == [
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2"
    ]
    assert pick("cross") == cross
    assert pick("self") == self_
    assert pick("attention") == [n for n in names if n.endswith(("attn1", "attn2"))]
    assert pick("blocks") == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert pick("mid") == [n for n in names if n.startswith("mid_block.")]
    assert pick("down cross") == [n for n in cross if n.startswith("down")]
    assert pick("blocks up") == ["up_blocks.0", "up_blocks.1"]
    assert pick("up_blocks.*.attn2") == [n for n in cross if n.startswith("up")]
    assert pick("re:transformer_blocks\\.1\\.attn2$") == [n for n in cross if "transformer_blocks.1." in n]
    assert pick(re.compile("mid_block.*attn1")) == [n for n in self_ if n.startswith("mid")]
    assert pick(["mid_block", "cross"]) == [n for n in names if n in cross or n == "mid_block"]
    assert pick(lambda s: s.kind == "cross" and s.level == 1) == [n for n in cross]  # SDXL tiny: all at level 1
    assert pick("level1 self") == self_
    # Resolutions are query sizes for a latent size: with an 8x12 latent, level 1 is 4x6.
    assert pick("4x6", latent_size=(8, 12)) == pick("attention")
    assert pick("blocks 8x12", latent_size=(8, 12)) == ["up_blocks.0", "up_blocks.1"]
    assert pick("blocks 4x6", latent_size=(8, 12)) == ["down_blocks.0", "down_blocks.1", "mid_block"]


def test_level_shorthand_and_unknown_level(sd1):
    assert [s.name for s in lab.select_sites(sd1, "level0 cross")] == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    ]
    with pytest.raises(ValueError, match="matches no site"):
        lab.select_sites(sd1, "level7")


def test_unknown_selectors_are_clear_errors(sd1):
    with pytest.raises(
        ValueError,
        match=r"unknown site .*attn3.*Did you mean: up_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn[12]",
    ):
        lab.select_sites(sd1, "up_blocks.1.attentions.0.transformer_blocks.0.attn3")
    with pytest.raises(ValueError, match="Did you mean: cross"):
        lab.select_sites(sd1, "crosss")
    with pytest.raises(ValueError, match="glob 'up_blocks.9.*' matches no site"):
        lab.select_sites(sd1, "up_blocks.9.*")
    with pytest.raises(ValueError, match="regex 'nothing' matches no site"):
        lab.select_sites(sd1, "re:nothing")
    with pytest.raises(ValueError, match="predicate"):
        lab.select_sites(sd1, lambda s: False)
    with pytest.raises(ValueError, match="latent_size"):
        lab.select_sites(sd1, "16x16")
    with pytest.raises(ValueError, match=r"shorthand '16x16' matches no site .*queries of 4x4, 8x8"):
        lab.select_sites(sd1, "16x16", latent_size=(8, 8))
    with pytest.raises(TypeError, match="cannot select sites with a int"):
        lab.select_sites(sd1, 3)
    with pytest.raises(ValueError, match="empty list"):
        lab.select_sites(sd1, [])


def test_unet_site_is_picked_only_by_its_exact_name(sd1):
    names = [s.name for s in lab.sites(sd1)]
    assert "unet" not in names and [s.name for s in lab.sites(sd1, unet=True)] == ["unet"] + names
    assert lab.select_sites(sd1, "unet") == [lab.Site("unet", "unet", "unet", 0, sd1.unet)]
    assert lab.select_sites(sd1, "unet")[0].module is sd1.unet and not lab.select_sites(sd1, "unet")[0].is_attention
    for selector in (
        "*",
        "re:.*",
        re.compile("unet|blocks"),
        lambda s: True,
        "attention",
        "blocks",
        "level0",
        "blocks 8x8",
    ):
        picked = [s.name for s in lab.select_sites(sd1, selector, latent_size=(8, 8))]
        assert "unet" not in picked, selector
    assert [s.name for s in lab.select_sites(sd1, ["unet", "mid_block"])] == ["unet", "mid_block"]


def test_select_sites_on_a_list_of_site_records_without_a_model(sd1):
    records = [lab.Site(s.name, s.kind, s.place, s.level, None) for s in lab.sites(sd1, unet=True)]
    for selector, latent_size in [
        ("cross up", None),
        ("self 4x4", (8, 8)),
        ("level1", None),
        ("up_blocks.1.*", None),
        ("re:attn2$", None),
        (["mid", "blocks"], None),
        ("unet", None),
        (CROSS_UP, None),
        (lambda s: s.level == 0, None),
    ]:
        from_model = [s.name for s in lab.select_sites(sd1, selector, latent_size=latent_size)]
        assert [s.name for s in lab.select_sites(records, selector, latent_size=latent_size)] == from_model, selector
    cross = [r for r in records if r.kind == "cross"]
    assert [s.name for s in lab.select_sites(cross, "8x8", latent_size=(8, 8))] == [
        s.name for s in cross if s.level == 0
    ]
    with pytest.raises(ValueError, match="shorthand 'self' matches no site"):
        lab.select_sites(cross, "self")
    with pytest.raises(ValueError, match="latent_size"):
        lab.select_sites(cross, "8x8")


def test_unet_site_captures_the_denoising_step(sd1, restored):
    check = restored(sd1)
    with lab.trace(sd1) as tr:
        inputs = tr.capture("unet", "input", reduce=lab.Stack(), cfg="both")
        outputs = tr.capture("unet", "output", reduce=lab.Stack(), cfg="both")
        cond = tr.capture("unet", "output", reduce=lab.Stack(), cfg="cond")
        mean = tr.capture("unet", "output", reduce=lab.Mean(over=("steps", "batch")), cfg="uncond")
        estimate = tr.estimate(latent_size=(8, 12), batch=2, steps=3)
        final = generate(sd1, ["a cat", "a dog"], steps=3, width=96)
    check()
    x, eps = inputs["unet"], outputs["unet"]
    assert x.shape == eps.shape == (3, 4, 4, 8, 12)  # steps, [uncond, cond] x 2 images, latent channels, h, w
    assert [c.step for c in inputs.contexts] == [0, 1, 2] and inputs.contexts[0].site is None
    assert [c.timestep for c in inputs.contexts] == [float(t) for t in sd1.scheduler.timesteps]
    torch.testing.assert_close(cond["unet"], eps[:, 2:])
    torch.testing.assert_close(mean["unet"], eps[:, :2].mean(dim=(0, 1)))
    assert torch.equal(x[:, :2], x[:, 2:])  # both CFG halves get the same x_t
    assert [n for _, n in estimate.per_capture] == [c.nbytes() for c in (inputs, outputs, cond, mean)]
    # The input of step i + 1 is the scheduler's step from the input and guided output of step i.
    scheduler = sd1.scheduler
    for i, t in enumerate(scheduler.timesteps):
        uncond, text = eps[i].chunk(2)
        following = scheduler.step(uncond + sd1.guidance_scale * (text - uncond), t, x[i, 2:]).prev_sample
        torch.testing.assert_close(following, x[i + 1, 2:] if i + 1 < len(x) else final, rtol=1e-4, atol=1e-5)


def test_unet_site_edits_input_and_output(sd1, restored):
    check = restored(sd1)
    plain = generate(sd1, steps=2)
    with lab.trace(sd1) as tr:
        tr.edit("unet", "input", lambda x, ctx: x)
        tr.edit("unet", "output", lambda e, ctx: e)
        assert torch.equal(generate(sd1, steps=2), plain)
    with lab.trace(sd1) as tr:
        tr.edit("unet", "input", lambda x, ctx: x * 0, steps=[1])
        seen = tr.capture("unet", "input", reduce=lab.Stack(), cfg="both")
        zeroed = generate(sd1, steps=2)
    assert seen["unet"][1].abs().max() == 0 and seen["unet"][0].abs().max() > 0
    assert not torch.equal(zeroed, plain)
    with lab.trace(sd1.unet, guidance="batched") as tr:
        tr.edit("unet", "output", lambda e, ctx: e * 0, cfg="uncond")
        with torch.no_grad():  # return_dict=True: the edited output keeps its class
            out = sd1.unet(torch.ones(2, 4, 8, 8), 10, encoder_hidden_states=torch.zeros(2, 77, 32))
    assert type(out).__name__ == "UNet2DConditionOutput"
    assert out.sample[0].abs().max() == 0 and out[0][1].abs().max() > 0
    with pytest.raises(ZeroDivisionError):
        with lab.trace(sd1) as tr:
            tr.edit("unet", "output", lambda e, ctx: e / 0 if ctx.step == 1 else e)
            tr.edit("unet", "input", lambda x, ctx: 1 / 0 if ctx.step == 1 else x)
            generate(sd1, steps=3)
    check()


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda tr: tr.capture("unet", "probs"), r"'probs' does not exist at unet"),
        (lambda tr: tr.capture("cross", "input"), r"'input' does not exist at down_blocks"),
        (lambda tr: tr.capture("blocks", "q"), r"'q' does not exist at down_blocks.0, "),
        (lambda tr: tr.capture("unet", "output", reduce=lab.Mean(over=("steps", "heads"))), "no heads axis"),
    ],
)
def test_unet_site_bad_requests_change_nothing(sd1, restored, call, message):
    check = restored(sd1)
    with lab.trace(sd1) as tr:
        with pytest.raises(ValueError, match=message):
            call(tr)
        assert tr.describe() == []
    check()


# ---------------------------------------------------------------------------------------------
# Captures: values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])  # sd2 upcasts attention and uses linear projections
def test_captured_probs_equal_softmax_of_captured_q_k(family, request):
    pipe = request.getfixturevalue(family)
    sites = [CROSS_UP, SELF_UP]
    with lab.trace(pipe) as tr:
        q = tr.capture(sites, "q", reduce=lab.Stack(), cfg="both")
        k = tr.capture(sites, "k", reduce=lab.Stack(), cfg="both")
        probs = tr.capture(sites, "probs", reduce=lab.Stack(), cfg="both")
        generate(pipe, steps=2)
    for name in sites:
        attn = pipe.unet.get_submodule(name)
        expected = torch.softmax(q[name] @ k[name].transpose(-1, -2) * attn.scale, dim=-1)
        assert probs[name].shape == expected.shape
        assert probs[name].shape[:3] == (2, 2, attn.heads)  # steps, [uncond, cond], heads
        torch.testing.assert_close(probs[name], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probs[name].sum(-1), torch.ones_like(probs[name].sum(-1)))


def test_explicit_probabilities_match_the_fused_processor(sd1):
    """Capturing probs switches the site to explicit math; the image must stay (numerically) the same."""
    plain = generate(sd1)
    with lab.trace(sd1) as tr:
        tr.capture("attention", "probs")
        traced = generate(sd1)
    torch.testing.assert_close(traced, plain, rtol=1e-4, atol=1e-5)


def test_capture_without_edits_leaves_output_bitwise_identical(sd1):
    plain = generate(sd1)
    with lab.trace(sd1) as tr:
        tr.capture("attention", "q")
        tr.capture("attention", "k")
        tr.capture("attention", "v")
        tr.capture(["attention", "blocks"], "output")
        traced = generate(sd1)
    assert torch.equal(traced, plain)


def test_reducers_match_naive_per_step_storage(sd1):
    site = SELF_UP
    with lab.trace(sd1) as tr:
        stack = tr.capture(site, "probs", reduce=lab.Stack(), cfg="both")
        mean = tr.capture(site, "probs", reduce=lab.Mean(), cfg="both")
        mean_heads_batch = tr.capture(site, "probs", reduce=lab.Mean(over=("steps", "heads", "batch")), cfg="both")
        total = tr.capture(site, "probs", reduce=lab.Sum(over=("steps", "heads")), cfg="both")
        small = tr.capture(site, "probs", reduce=lab.Mean(over=("steps", "heads"), downsample=2), cfg="both")
        stack_heads = tr.capture(site, "probs", reduce=lab.Stack(over=("heads",)), cfg="both")
        top = tr.capture(site, "probs", reduce=lab.TopK(3, over=("steps", "heads")), cfg="both")
        cond = tr.capture(site, "probs", reduce=lab.Mean(), cfg="cond")
        uncond = tr.capture(site, "probs", reduce=lab.Mean(), cfg="uncond")
        feats = tr.capture("up_blocks.0", "output", reduce=lab.Mean(downsample=2), cfg="both")
        feats_stack = tr.capture("up_blocks.0", "output", reduce=lab.Stack(), cfg="both")
        generate(sd1, steps=4)

    per_step = stack[site]  # (steps, batch, heads, 64, 64)
    assert per_step.shape == (4, 2, 2, 64, 64) and per_step.dtype == torch.float32
    torch.testing.assert_close(mean[site], per_step.mean(0))
    torch.testing.assert_close(mean_heads_batch[site], per_step.mean((0, 1, 2)))
    torch.testing.assert_close(total[site], per_step.mean(2).sum(0))
    torch.testing.assert_close(stack_heads[site], per_step.mean(2))
    torch.testing.assert_close(cond[site], per_step[:, 1:].mean(0))
    torch.testing.assert_close(uncond[site], per_step[:, :1].mean(0))
    # downsample=2 on self-attention pools both the query and the key grids (8x8 -> 4x4)
    grid = per_step.mean((0, 2)).reshape(2, 8, 8, 8, 8)
    pooled = grid.reshape(2, 4, 2, 4, 2, 4, 2, 4, 2).mean((2, 4, 6, 8)).reshape(2, 16, 16)
    torch.testing.assert_close(small[site], pooled)
    assert small.sizes[site] == (4, 4)
    values, indices = top[site]
    expected = torch.topk(per_step.mean((0, 2)), 3, dim=-1)
    torch.testing.assert_close(values, expected.values)
    assert torch.equal(indices, expected.indices)
    f = feats_stack["up_blocks.0"].mean(0)
    torch.testing.assert_close(feats["up_blocks.0"], torch.nn.functional.avg_pool2d(f, 2))


def test_capture_memory_is_flat_in_steps_unless_stacked(sd1):
    sizes = {}
    for steps in (2, 6):
        with lab.trace(sd1) as tr:
            mean = tr.capture("attention", "probs", reduce=lab.Mean())
            stack = tr.capture("cross", "probs", reduce=lab.Stack())
            generate(sd1, steps=steps)
        sizes[steps] = (mean.nbytes(), stack.nbytes())
    assert sizes[2][0] == sizes[6][0]
    assert sizes[6][1] == 3 * sizes[2][1]


def test_capture_can_stay_on_the_model_device_and_accumulates_in_float32(sd1):
    unet = lab.testing.tiny_sd1_pipeline().unet.to(torch.bfloat16)
    latents = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    text = torch.randn(2, 77, 32, dtype=torch.bfloat16)
    with lab.trace(unet, guidance="batched") as tr:
        probs = tr.capture("cross", "probs", reduce=lab.Mean(over=("steps", "heads")), device=None)
        stack = tr.capture(CROSS_UP, "probs", reduce=lab.Stack(), device=None)
        for t in (900, 500):
            unet(latents, t, encoder_hidden_states=text)
    for tensor in probs.result().values():
        assert tensor.dtype == torch.float32
    assert stack[CROSS_UP].dtype == torch.float32
    torch.testing.assert_close(probs[CROSS_UP], stack[CROSS_UP].mean((0, 2)))


# ---------------------------------------------------------------------------------------------
# Steps and classifier-free guidance
# ---------------------------------------------------------------------------------------------


def _recording_edit(log):
    def record(x, ctx):
        log.append(ctx)
        return x

    return record


def test_step_context_with_batched_guidance(sd1):
    log = []
    with lab.trace(sd1) as tr:
        tr.edit(CROSS_UP, "output", _recording_edit(log))
        generate(sd1, ["a cat", "a dog"], steps=4, num_images_per_prompt=2)
    assert [c.step for c in log] == [0, 1, 2, 3]
    assert [c.run_step for c in log] == [0, 1, 2, 3]
    assert [c.timestep for c in log] == [float(t) for t in sd1.scheduler.timesteps]
    c = log[0]
    assert (c.guidance, c.part, c.batch_size, c.num_steps) == ("batched", "both", 8, 4)
    assert (c.uncond, c.cond) == (slice(0, 4), slice(4, 8))
    assert c.site.name == CROSS_UP and c.size == (8, 8) and c.latent_size == (8, 8)


def test_no_guidance_is_all_conditional(sd1):
    log = []
    with lab.trace(sd1) as tr:
        tr.edit(CROSS_UP, "output", _recording_edit(log))
        uncond = tr.capture(CROSS_UP, "probs", cfg="uncond")
        generate(sd1, steps=2, guidance_scale=1.0)
    assert {(c.guidance, c.part, c.batch_size) for c in log} == {("none", "cond", 1)}
    assert log[0].cond == slice(0, 1) and log[0].uncond == slice(0, 0)
    with pytest.raises(RuntimeError, match="nothing captured"):
        uncond.result()


def test_img2img_steps_index_the_full_schedule(sd1):
    img2img = lab.testing.tiny_img2img_pipeline(sd1)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64)
    log = []
    with lab.trace(img2img) as tr:
        tr.edit(CROSS_UP, "output", _recording_edit(log))
        probs = tr.capture("cross", "probs", reduce=lab.Stack())
        latents = tr.capture("unet", "input", reduce=lab.Stack())
        img2img(PROMPT, image=image, strength=0.5, num_inference_steps=10, output_type="latent")
    assert [c.step for c in log] == [5, 6, 7, 8, 9]  # the index in the full 10-step schedule
    assert [c.run_step for c in log] == [0, 1, 2, 3, 4]
    assert log[0].num_steps == 10
    assert [c.timestep for c in log] == [float(t) for t in img2img.scheduler.timesteps[5:]]
    assert [c.step for c in probs.contexts] == [c.step for c in latents.contexts] == [5, 6, 7, 8, 9]
    assert probs[CROSS_UP].shape == (5, 1, 2, 64, 77) and latents["unet"].shape == (5, 1, 4, 8, 8)


def _manual_loop(unet, scheduler, latents, uncond, cond, steps, split, guidance_scale=5.0):
    """A hand-written DDIM loop; split=True runs uncond and cond as two UNet calls per step."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        with torch.no_grad():
            if split:
                eps_uncond = unet(latents, t, encoder_hidden_states=uncond).sample
                eps_cond = unet(latents, t, encoder_hidden_states=cond).sample
            else:
                both = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                eps_uncond, eps_cond = both.chunk(2)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


@pytest.mark.parametrize("guidance", ["split", "auto"])
def test_split_guidance_matches_batched(sd1, guidance):
    unet, scheduler = sd1.unet, sd1.scheduler
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    uncond, cond = torch.randn(2, 1, 77, 32, generator=generator)

    with lab.trace(unet, guidance="batched", scheduler=scheduler) as tr:
        batched = {cfg: tr.capture("cross", "probs", cfg=cfg) for cfg in ("cond", "uncond", "both")}
        _manual_loop(unet, scheduler, latents, uncond, cond, steps=3, split=False)

    log = []
    with lab.trace(unet, guidance=guidance, scheduler=scheduler) as tr:
        tr.edit(CROSS_UP, "output", _recording_edit(log))
        split = {cfg: tr.capture("cross", "probs", cfg=cfg) for cfg in ("cond", "uncond", "both")}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _manual_loop(unet, scheduler, latents, uncond, cond, steps=3, split=True)
    parts = [(c.step, c.part) for c in log]
    assert [c.guidance for c in log][1:] == ["split"] * 5
    assert parts[1:] == [(0, "cond"), (1, "uncond"), (1, "cond"), (2, "uncond"), (2, "cond")]
    if guidance == "split":
        assert parts[0] == (0, "uncond") and not caught
        for cfg in ("cond", "uncond", "both"):
            for name, tensor in split[cfg].result().items():
                torch.testing.assert_close(tensor, batched[cfg][name], rtol=1e-4, atol=1e-6)
    else:
        # Auto notices split guidance on the second call: the first is taken as cond, with a warning,
        # and dropped from captures: cond captures are exact, uncond/both ones miss step 0.
        assert parts[0] == (0, "cond")
        assert any("split classifier-free guidance" in str(w.message) for w in caught)
        for name, tensor in split["cond"].result().items():
            torch.testing.assert_close(tensor, batched["cond"][name], rtol=1e-4, atol=1e-6)
        for cfg in ("uncond", "both"):
            for name, tensor in split[cfg].result().items():
                assert tensor.shape == batched[cfg][name].shape


def test_split_guidance_cond_first_override(sd1):
    unet, scheduler = sd1.unet, sd1.scheduler
    log = []
    latents, text = torch.randn(1, 4, 8, 8), torch.randn(2, 1, 77, 32)
    with lab.trace(unet, guidance="split", uncond_first=False, scheduler=scheduler) as tr:
        tr.edit(CROSS_UP, "output", _recording_edit(log))
        _manual_loop(unet, scheduler, latents, text[0], text[1], steps=2, split=True)
    assert [c.part for c in log] == ["cond", "uncond", "cond", "uncond"]


# ---------------------------------------------------------------------------------------------
# Edits
# ---------------------------------------------------------------------------------------------


def test_scaling_probs_by_one_is_a_bitwise_no_op(sd1):
    with lab.trace(sd1) as tr:
        tr.capture("cross", "probs")
        reference = generate(sd1)
    with lab.trace(sd1) as tr:
        tr.edit("cross", "probs", lambda p, ctx: p * 1.0)
        edited = generate(sd1)
    assert torch.equal(edited, reference)


@pytest.mark.parametrize("what", ["probs", "q", "v", "output"])
def test_edit_at_step_k_changes_only_steps_from_k(sd1, what):
    k = 2

    def latents_per_step(edit_steps):
        seen = []

        def keep(pipe, i, t, tensors):
            seen.append(tensors["latents"].clone())
            return tensors

        with lab.trace(sd1) as tr:
            tr.edit("cross" if what != "output" else "up_blocks.0", what, lambda x, ctx: x * 1.5, steps=edit_steps)
            generate(sd1, steps=4, callback_on_step_end=keep)
        return seen

    baseline = latents_per_step([])
    edited = latents_per_step(range(k, 4))
    for step in range(k):
        assert torch.equal(edited[step], baseline[step]), f"step {step} changed"
    for step in range(k, 4):
        assert not torch.allclose(edited[step], baseline[step]), f"step {step} did not change"


def test_edits_apply_in_order_before_captures_and_respect_cfg(sd1):
    with lab.trace(sd1) as tr:
        seen = tr.capture(CROSS_UP, "output", reduce=lab.Stack(), cfg="both")
        tr.edit(CROSS_UP, "output", lambda x, ctx: x + 1.0)
        tr.edit(CROSS_UP, "output", lambda x, ctx: x * 0.0, cfg="uncond")
        tr.edit(CROSS_UP, "output", lambda x, ctx: x + 2.0, cfg="uncond")
        generate(sd1, steps=2)
    out = seen[CROSS_UP]  # (steps, [uncond, cond], queries, channels)
    assert torch.all(out[:, 0] == 2.0)  # (x + 1) * 0 + 2: registration order, capture last
    assert not torch.any(out[:, 1] == 2.0)


def test_edit_scale_tokens_reweights_attention(sd1):
    indices = lab.token_indices(sd1, PROMPT, "horse")
    with lab.trace(sd1) as tr:
        before = tr.capture(CROSS_UP, "probs", reduce=lab.Stack())
        generate(sd1, steps=1)
    with lab.trace(sd1) as tr:
        after = tr.capture(CROSS_UP, "probs", reduce=lab.Stack())  # captures see the edited tensor
        tr.edit(CROSS_UP, "probs", lab.scale_tokens(indices, 3.0))
        generate(sd1, steps=1)
    torch.testing.assert_close(after[CROSS_UP][..., indices], 3.0 * before[CROSS_UP][..., indices])
    others = [i for i in range(77) if i not in indices]
    torch.testing.assert_close(after[CROSS_UP][..., others], before[CROSS_UP][..., others])


def test_gradient_flows_to_latents_through_captured_attention(sd1):
    unet = sd1.unet
    latents = torch.randn(1, 4, 8, 8, requires_grad=True)
    text = torch.randn(1, 77, 32)
    with lab.trace(unet, guidance="none") as tr:
        maps = tr.capture("cross", "probs", reduce=lab.Mean(over=("steps", "heads")), device=None, detach=False)
        detached = tr.capture("cross", "probs")
        unet(latents, 500, encoder_hidden_states=text)
    loss = -maps[CROSS_UP][0, :, 5].max()
    (latents.grad,) = torch.autograd.grad(loss, [latents])  # not backward(): the shared pipeline keeps no .grad
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert not detached[CROSS_UP].requires_grad


# ---------------------------------------------------------------------------------------------
# Restoration, cost, refusals
# ---------------------------------------------------------------------------------------------


def test_untouched_sites_keep_their_processor_objects(sd1):
    before = {name: m.processor for name, m in sd1.unet.named_modules() if isinstance(m, Attention)}
    with lab.trace(sd1) as tr:
        tr.capture(CROSS_UP, "probs")
        tr.capture(SELF_UP, "q")
        tr.edit("mid_block.attentions.0.transformer_blocks.0.attn2", "output", lambda x, ctx: x)
        during = {name: m.processor for name, m in sd1.unet.named_modules() if isinstance(m, Attention)}
    for name, processor in during.items():
        if name == CROSS_UP:
            assert isinstance(processor, lab.ExplicitAttnProcessor) and processor.original is before[name]
        else:
            assert processor is before[name], name  # q/output hooks keep the fused processor too


@pytest.mark.parametrize("stop_at", [0, 1, 2])
@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_everything_restored_when_interrupted_at_any_step(sd1, restored, stop_at, error):
    check = restored(sd1)

    def interrupt(pipe, i, t, tensors):
        if i == stop_at:
            raise error("stop")
        return tensors

    with pytest.raises(error):
        with lab.trace(sd1) as tr:
            tr.capture("attention", "probs")
            tr.capture("attention", "q")
            tr.edit("blocks", "output", lambda x, ctx: x)
            generate(sd1, steps=3, callback_on_step_end=interrupt)
    check()


def test_everything_restored_when_a_hook_function_raises(sd1, restored):
    check = restored(sd1)

    def broken(p, ctx):
        raise ZeroDivisionError("user bug")

    with pytest.raises(ZeroDivisionError):
        with lab.trace(sd1) as tr:
            tr.capture("cross", "probs")
            tr.edit(CROSS_UP, "probs", broken, steps=[1])
            generate(sd1, steps=3)
    check()


def test_edit_returning_wrong_shape_is_a_clear_error(sd1, restored):
    check = restored(sd1)
    with pytest.raises(ValueError, match=r"returned \(2, 2, 64, 76\); expected a tensor shaped \(2, 2, 64, 77\)"):
        with lab.trace(sd1) as tr:
            tr.edit(CROSS_UP, "probs", lambda p, ctx: p[..., :-1])
            generate(sd1, steps=1)
    check()


def test_nesting_reentering_and_cleanup(sd1, restored):
    check = restored(sd1)
    tr = lab.trace(sd1)
    with tr:
        with pytest.raises(RuntimeError, match="already active"):
            with lab.trace(sd1):
                pass
        with pytest.raises(RuntimeError, match="entered once"):
            with tr:
                pass
        assert lab.active_hooks(sd1)  # still ours, still active
    with pytest.raises(RuntimeError, match="closed"):
        tr.__enter__()
    with pytest.raises(RuntimeError, match="inside `with"):
        tr.capture("cross", "probs")
    check()

    # A notebook cell that entered a trace and never left it:
    left_open = lab.trace(sd1).__enter__()
    left_open.capture("cross", "probs")
    left_open.capture("self", "k")
    assert len(lab.active_hooks(sd1)) == 3
    assert lab.remove_all_hooks(sd1) > 0
    check()
    assert lab.remove_all_hooks(sd1) == 0


def test_remove_all_hooks_cleans_leftovers_no_trace_owns(sd1, restored):
    """Even if the registry is lost (e.g. module reloaded), lab's processors and hooks are recognised."""
    check = restored(sd1)
    tr = lab.trace(sd1).__enter__()
    tr.capture("cross", "probs")
    tr.capture(SELF_UP, "v")
    lab.hooks._ACTIVE_TRACES.clear()  # simulate a lost registry
    assert any("leftover" in line for line in lab.active_hooks(sd1))
    with pytest.raises(RuntimeError, match="remove_all_hooks"):
        lab.trace(sd1).__enter__()
    lab.remove_all_hooks(sd1)
    check()


class _IPAdapterLikeProcessor:
    """Stands in for a processor with extra keys/values that hooks could not reproduce."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return self.wrapped(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_unsupported_processor_is_refused_with_nothing_applied(sd1, restored):
    attn = sd1.unet.get_submodule(CROSS_UP)
    original = attn.processor
    attn.set_processor(_IPAdapterLikeProcessor(original))
    try:
        check = restored(sd1)
        with lab.trace(sd1) as tr:
            inside = snapshot(sd1.unet)
            for what in ("probs", "q", "k"):
                with pytest.raises(ValueError, match=f"{re.escape(CROSS_UP)} uses _IPAdapterLikeProcessor"):
                    tr.capture("cross", what)
            assert snapshot(sd1.unet) == inside  # not half-applied: no other cross site got hooked
            tr.capture("cross", "output")  # reading the module's output is faithful whatever the processor
            generate(sd1, steps=1)
        check()
    finally:
        attn.set_processor(original)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda tr: tr.capture("cross", "attention_map"), ValueError, "unknown tensor 'attention_map'"),
        (lambda tr: tr.capture("mid_block", "probs"), ValueError, "'probs' does not exist at mid_block"),
        (lambda tr: tr.capture("blocks", "output", reduce=lab.Mean(over=("steps", "heads"))), ValueError, "no heads"),
        (lambda tr: tr.capture("cross", "probs", cfg="conditional"), ValueError, "cfg must be one of"),
        (lambda tr: tr.capture("cross", "probs", steps="all"), TypeError, "steps must be"),
        (lambda tr: tr.capture("cross", "probs", reduce="mean"), TypeError, "reduce must be a lab reducer"),
        (lambda tr: tr.capture("cross", "probs", reduce=lab.Mean(over=("heads",))), ValueError, "include 'steps'"),
        (lambda tr: tr.capture("cross", "probs", reduce=lab.Stack(over=("steps",))), ValueError, "accepts"),
        (lambda tr: tr.capture("cross", "probs", reduce=lab.Mean(downsample=0)), ValueError, "downsample"),
        (lambda tr: tr.capture("crosss", "probs"), ValueError, "Did you mean: cross"),
        (lambda tr: tr.edit("cross", "probs", "double"), TypeError, "must be callable"),
    ],
)
def test_bad_inputs_are_clear_errors_and_change_nothing(sd1, restored, call, error, message):
    check = restored(sd1)
    with lab.trace(sd1) as tr:
        inside = snapshot(sd1.unet)
        with pytest.raises(error, match=message):
            call(tr)
        assert snapshot(sd1.unet) == inside
        assert tr.describe() == []
    check()


def test_bad_trace_arguments(sd1):
    with pytest.raises(ValueError, match="guidance must be one of"):
        lab.trace(sd1, guidance="cfg")
    with pytest.raises(TypeError, match="expected a diffusers"):
        lab.trace(sd1.vae)


def test_memory_estimate_matches_captured_bytes(sd1):
    with lab.trace(sd1) as tr:
        captures = [
            tr.capture("cross", "probs", reduce=lab.Mean(over=("steps", "heads"))),
            tr.capture("self", "probs", reduce=lab.Mean(downsample=2), cfg="both"),
            tr.capture("cross up", "q", reduce=lab.Stack(over=("batch",)), cfg="uncond"),
            tr.capture("blocks", "output", reduce=lab.Stack()),
            tr.capture("4x6", "v", reduce=lab.Sum(), cfg="both"),
        ]
        estimate = tr.estimate(64, 96, batch=2, steps=3)
        generate(sd1, ["a", "b"], steps=3, height=64, width=96)
    actual = [capture.nbytes() for capture in captures]
    assert [nbytes for _, nbytes in estimate.per_capture] == actual
    assert estimate.total_bytes == sum(actual) > 0
    assert "total" in str(estimate)


def test_capture_over_the_memory_limit_is_refused_before_anything_runs(sd1, restored):
    check = restored(sd1)
    calls = []
    with pytest.raises(lab.CaptureTooLarge) as refused:
        with lab.trace(sd1, memory_limit=100_000) as tr:
            tr.edit("cross", "probs", lambda p, ctx: calls.append(ctx) or p)
            big = tr.capture("self", "probs", reduce=lab.Stack(), cfg="both")
            generate(sd1, steps=3)
    message = str(refused.value)
    for tip in ("fewer sites", "downsample", "cfg='cond'", "heads", "lab.Mean", "memory_limit"):
        assert tip in message
    assert calls == []  # refused at the UNet pre-forward, before any site ran
    assert big.nbytes() == 0
    check()
    # Narrowed as advised, it fits.
    with lab.trace(sd1, memory_limit=100_000) as tr:
        small = tr.capture("self", "probs", reduce=lab.Mean(over=("steps", "heads"), downsample=2))
        generate(sd1, steps=3)
    assert 0 < small.nbytes() <= 100_000


def test_resolution_selectors_follow_each_run(sd1, restored):
    check = restored(sd1)
    with lab.trace(sd1) as tr:
        probs = tr.capture("cross 4x4", "probs")
        generate(sd1, steps=1, height=64, width=64)  # 8x8 latent: 4x4 is level 1
        level1 = sorted(probs.result())
        probs.reset()
        generate(sd1, steps=1, height=32, width=32)  # 4x4 latent: 4x4 is level 0
        level0 = sorted(probs.result())
    assert level1 == sorted(s.name for s in lab.select_sites(sd1, "cross level1"))
    assert level0 == sorted(s.name for s in lab.select_sites(sd1, "cross level0"))
    check()


# ---------------------------------------------------------------------------------------------
# Merge sites: where a decoder skip connection joins the backbone
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tinyworld():
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "tinyworld"])
def test_merge_sites_split_every_decoder_resnet_input_into_backbone_and_skip(family, request, restored):
    pipe = request.getfixturevalue(family)
    unet = pipe.unet
    merges = [site for site in lab.sites(pipe) if site.kind == "merge"]
    assert [site.name for site in merges] == [
        f"up_blocks.{n}.resnets.{i}" for n, block in enumerate(unet.up_blocks) for i in range(len(block.resnets))
    ]
    check = restored(pipe)
    inputs = {}  # what each resnet really receives, seen by a plain torch pre-hook

    def keep(name):
        return lambda module, args: inputs.update({name: args[0].clone()})

    handles = [site.module.register_forward_pre_hook(keep(site.name)) for site in merges]
    try:
        with lab.trace(pipe) as tr:
            backbone = tr.capture("merge", "backbone", reduce=lab.Stack(), rows="both")
            skip = tr.capture("merge", "skip", reduce=lab.Stack(), rows="both")
            estimate = tr.estimate(latent_size=(8, 12), steps=1)
            generate(pipe, steps=1, height=8 * pipe.vae_scale_factor, width=12 * pipe.vae_scale_factor)
    finally:
        for handle in handles:
            handle.remove()
    check()
    assert [nbytes for _, nbytes in estimate.per_capture] == [backbone.nbytes(), skip.nbytes()]
    for site in merges:
        b, h = backbone[site.name][0], skip[site.name][0]  # the only step: (batch, channels, height, width)
        assert torch.equal(torch.cat([b, h], dim=1), inputs[site.name]), site.name
        assert b.shape[-2:] == site.spatial_size((8, 12)) == backbone.sizes[site.name]
        assert b.shape[1] + h.shape[1] == site.module.in_channels
        block, i = int(site.name.split(".")[1]), int(site.name.split(".")[-1])
        if i > 0:  # the previous resnet's output, through its attention (same channels)
            assert b.shape[1] == unet.up_blocks[block].resnets[i - 1].out_channels
        elif block > 0:  # the previous up block's output
            assert b.shape[1] == unet.up_blocks[block - 1].resnets[-1].out_channels
        else:  # the mid block's output
            assert b.shape[1] == unet.mid_block.resnets[-1].out_channels


def test_identity_merge_edits_leave_the_image_bit_identical(sd1, restored):
    check = restored(sd1)
    baseline = generate(sd1, steps=2, output_type="np")
    with lab.trace(sd1) as tr:
        seen = []
        tr.edit("merge", "backbone", lambda x, ctx: seen.append(ctx.site.name) or x.clone())
        tr.edit("merge", "skip", lambda x, ctx: x.clone())  # new tensors: the input is concatenated again
        same = generate(sd1, steps=2, output_type="np")
    check()
    assert len(seen) == 2 * 4 and np.array_equal(same, baseline)
    with lab.trace(sd1) as tr:
        tr.edit("up_blocks.1.resnets.0", "skip", lambda x, ctx: x * 0.5)
        halved = generate(sd1, steps=2, output_type="np")
    check()
    assert not np.allclose(halved, baseline)


def test_merge_edits_reach_the_resnet_and_both_tensors_share_one_hook(sd1, restored):
    site = "up_blocks.1.resnets.0"
    resnet = sd1.unet.get_submodule(site)
    check = restored(sd1)
    received = []
    with lab.trace(sd1) as tr:
        tr.edit(site, "backbone", lambda x, ctx: torch.zeros_like(x))
        skip = tr.capture(site, "skip", reduce=lab.Stack(), rows="both")
        assert len(resnet._forward_pre_hooks) == 1  # one lab hook serves both tensors
        # Registered after lab's hook, so it sees what the resnet really receives.
        handle = resnet.register_forward_pre_hook(lambda module, args: received.append(args[0].clone()))
        try:
            generate(sd1, steps=1)
        finally:
            handle.remove()
    check()
    backbone_channels = lab.select_sites(sd1, site)[0].backbone_channels
    assert backbone_channels == 64 and received[0].shape[1] == 96
    assert not received[0][:, :backbone_channels].any()
    assert torch.equal(received[0][:, backbone_channels:], skip[site][0])
    with pytest.raises(ValueError, match="'output' does not exist at up_blocks.1.resnets.0"):
        with lab.trace(sd1) as tr:
            tr.capture(site, "output")
    with pytest.raises(ValueError, match="'backbone' does not exist at up_blocks.0, up_blocks.1 "):
        with lab.trace(sd1) as tr:
            tr.capture("blocks up", "backbone")
    check()


# ---------------------------------------------------------------------------------------------
# Pipelines and batch shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_families_batches_and_non_square_latents(family, request, restored):
    pipe = request.getfixturevalue(family)
    check = restored(pipe)
    with lab.trace(pipe) as tr:
        probs = tr.capture("cross", "probs", reduce=lab.Mean(over=("steps", "heads")))
        feats = tr.capture("blocks", "output")
        latents = generate(
            pipe, ["a red circle", "a blue square"], steps=2, height=64, width=96, num_images_per_prompt=2
        )
    assert latents.shape == (4, 4, 8, 12)
    for name, tensor in probs.result().items():
        h, w = probs.sizes[name]
        assert tensor.shape == (4, h * w, 77)
        torch.testing.assert_close(tensor.sum(-1), torch.ones(4, h * w))
    assert all(t.shape[0] == 4 for t in feats.result().values())
    check()


def test_img2img_pipeline_runs_with_hooks(sd1, restored):
    img2img = lab.testing.tiny_img2img_pipeline(sd1)
    img2img.set_progress_bar_config(disable=True)
    check = restored(img2img)
    with lab.trace(img2img) as tr:
        probs = tr.capture("cross", "probs", reduce=lab.Mean(over=("steps", "heads")), cfg="both")
        img2img([PROMPT] * 2, image=torch.rand(2, 3, 64, 96), strength=0.6, num_inference_steps=5, output_type="latent")
    assert probs[CROSS_UP].shape == (4, 96, 77)
    check()
