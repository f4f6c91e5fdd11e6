"""Named batch rows (beyond the two CFG halves), parsed selectors, and the bad inputs the core refuses."""

import pytest
import torch
from conftest import generate

import lab
import lab.daam
from lab.hooks import Selector, kind

CROSS_UP = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
PROMPTS = ["a photograph of an astronaut riding a horse", "a red circle"]


def two_prompts(pipe, **kwargs):
    return generate(pipe, prompt=PROMPTS, steps=3, guidance_scale=5.0, **kwargs)


# ---------------------------------------------------------------------------------------------
# Named rows
# ---------------------------------------------------------------------------------------------


def test_named_images_pick_the_same_rows_as_slicing_the_guidance_halves(sd1, restored):
    check = restored(sd1)
    with lab.trace(sd1) as tr:
        tr.name_rows(source=0, target=1)
        both = tr.capture(CROSS_UP, "probs", rows="both", reduce=lab.Stack())
        target = tr.capture(CROSS_UP, "probs", rows="target", reduce=lab.Stack())
        cond_target = tr.capture(CROSS_UP, "probs", rows="cond target", reduce=lab.Stack())
        either = tr.capture(CROSS_UP, "probs", rows=["uncond source", "cond target"], reduce=lab.Stack())
        two_prompts(sd1)
    rows = both[CROSS_UP]  # (steps, [uncond src, uncond tgt, cond src, cond tgt], heads, q, k)
    assert rows.shape[1] == 4
    assert torch.equal(target[CROSS_UP], rows[:, [1, 3]])
    assert torch.equal(cond_target[CROSS_UP], rows[:, [3]])
    assert torch.equal(either[CROSS_UP], rows[:, [0, 3]])
    check()


def test_an_edit_on_named_rows_changes_only_those_images(sd1):
    with lab.trace(sd1) as tr:  # the same explicit attention math, no change: the baseline
        tr.edit("cross", "probs", lambda p, ctx: p)
        baseline = two_prompts(sd1)
    with lab.trace(sd1) as tr:
        tr.name_rows(source=0, target=1)
        seen = []
        tr.edit("cross", "probs", lambda p, ctx: seen.append(p.shape[0]) or p.roll(1, dims=-1), rows="target")
        edited = two_prompts(sd1)
    assert set(seen) == {2}  # the target row of each CFG half, stacked: non-contiguous rows 1 and 3
    assert torch.equal(edited[0], baseline[0])
    assert not torch.allclose(edited[1], baseline[1])


def test_rows_name_only_groups_that_exist(sd1, restored):
    check = restored(sd1)
    with lab.trace(sd1) as tr:
        with pytest.raises(ValueError, match=r"names no row group: 'target'.*uncond \(part\).*name_rows"):
            tr.capture("cross", "probs", rows="cond target")
        with pytest.raises(ValueError, match="already names a part"):
            tr.name_rows(cond=0)
        with pytest.raises(ValueError, match="give rows= or cfg="):
            tr.capture("cross", "probs", rows="cond", cfg="cond")
        assert tr.describe() == []
    check()


def test_an_image_group_past_the_batch_is_refused_before_anything_runs(sd1, restored):
    check = restored(sd1)
    with pytest.raises(ValueError, match=r"images \[2\].*holds 2 image\(s\) per part"):
        with lab.trace(sd1) as tr:
            tr.name_rows(third=2)
            tr.capture("cross", "probs", rows="third")
            two_prompts(sd1)
    check()


def test_named_parts_for_a_technique_that_stacks_its_own_copy(sd1):
    """A technique that runs [uncond, cond, perturbed] through the UNet names the parts itself."""
    unet = sd1.unet
    latents = torch.randn(3, 4, 8, 8)
    text = torch.randn(3, 77, 32)
    with lab.trace(unet) as tr:
        tr.name_rows(parts=("uncond", "cond", "perturbed"))
        perturbed = tr.capture(CROSS_UP, "output", rows="perturbed", reduce=lab.Stack())
        every = tr.capture(CROSS_UP, "output", rows="all", reduce=lab.Stack())
        contexts = []
        tr.edit("unet", "input", lambda x, ctx: contexts.append(ctx) or x)
        unet(latents, 500, encoder_hidden_states=text)
    assert torch.equal(perturbed[CROSS_UP][0], every[CROSS_UP][0, 2:3])
    ctx = contexts[0]
    assert ctx.parts == ("uncond", "cond", "perturbed") and ctx.guidance == "batched"
    assert (ctx.uncond, ctx.cond) == (slice(0, 1), slice(1, 2))
    assert ctx.rows("perturbed") == (2,)


def test_diffusers_pag_pipeline_rows_are_recognised(sd1):
    from diffusers import StableDiffusionPAGPipeline

    pag = StableDiffusionPAGPipeline.from_pipe(sd1, pag_applied_layers=["mid"])
    pag.set_progress_bar_config(disable=True)
    with lab.trace(pag) as tr:
        contexts = []
        tr.edit("unet", "input", lambda x, ctx: contexts.append(ctx) or x)
        perturbed = tr.capture(CROSS_UP, "output", rows="perturbed", reduce=lab.Stack())
        cond = tr.capture(CROSS_UP, "output", rows="cond", reduce=lab.Stack())
        generate(pag, steps=2, guidance_scale=5.0, pag_scale=3.0)
    assert contexts[0].parts == ("uncond", "cond", "perturbed") and contexts[0].batch_size == 3
    # The perturbed row differs from the conditional one: PAG changed its self-attention in the mid block.
    assert not torch.allclose(perturbed[CROSS_UP], cond[CROSS_UP])


def test_split_guidance_with_named_images_pairs_the_two_calls(sd1):
    """A manual loop with one call per CFG half: rows='target' gathers [uncond target, cond target]."""
    unet = sd1.unet
    latents = torch.randn(2, 4, 8, 8)
    uncond_text, cond_text = torch.randn(2, 77, 32), torch.randn(2, 77, 32)
    with lab.trace(unet, guidance="split") as tr:
        tr.name_rows(source=0, target=1)
        target = tr.capture(CROSS_UP, "probs", rows="target", reduce=lab.Stack())
        both = tr.capture(CROSS_UP, "probs", rows="both", reduce=lab.Stack())
        unet(latents, 500, encoder_hidden_states=uncond_text)
        unet(latents, 500, encoder_hidden_states=cond_text)
    assert torch.equal(target[CROSS_UP], both[CROSS_UP][:, [1, 3]])


# ---------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------


def test_selectors_are_parsed_once_and_compose(sd1):
    all_sites = lab.sites(sd1, unet=True)
    up = Selector.parse("up")
    assert up is Selector.parse(up)
    cross_up = up & kind("cross")
    assert [s.name for s in cross_up.resolve(all_sites)] == [s.name for s in lab.select_sites(sd1, "cross up")]
    either = Selector.parse("mid_block") | "down_blocks.0"
    assert [s.name for s in either.resolve(all_sites)] == ["down_blocks.0", "mid_block"]
    sized = Selector.parse("cross 16x16")
    assert sized.needs_latent_size and not up.needs_latent_size
    assert {s.spatial_size((32, 32)) for s in sized.resolve(all_sites, (32, 32))} == {(16, 16)}
    with pytest.raises(ValueError, match=r"matches no site \(latent 8x8"):
        sized.resolve(all_sites, (8, 8))
    with pytest.raises(ValueError, match="and kind 'self' matches no site"):
        (Selector.parse(CROSS_UP) & kind("self")).resolve(all_sites)


OLD_SELECTORS = [
    "up",
    "cross up",
    "self",
    "attention",
    "blocks",
    "blocks up",
    "level1",
    "*",
    "up_blocks.1.*",
    "up_blocks.1.attentions.*",
    "up_blocks.*.attn2",
    "re:.*",
    "re:up_blocks",
    lambda site: True,
    lambda site: site.place == "up",
    ["mid_block", "up cross"],
    kind("block"),
    kind("attention"),
    Selector.parse("up_blocks.*") & kind("cross"),
]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merge_sites_leave_every_older_selector_as_it_was(family, request):
    """Selectors written before merge sites existed pick the same sites, in the same order."""
    pipe = request.getfixturevalue(family)
    all_sites = lab.sites(pipe, unet=True)
    assert any(site.kind == "merge" for site in all_sites)
    without_merges = [lab.Site(s.name, s.kind, s.place, s.level, None) for s in all_sites if s.kind != "merge"]

    def outcome(sites, selector):
        try:
            return [site.name for site in lab.select_sites(sites, selector)]
        except ValueError:
            return "matches no site"  # e.g. 'up_blocks.1.*' on the tiny SDXL, whose up_blocks.1 has no attention

    for selector in OLD_SELECTORS:
        picked = outcome(pipe, selector)
        assert picked == outcome(without_merges, selector), selector
        assert not any(".resnets." in name for name in picked), selector
    assert [s.name for s in lab.select_sites(pipe, "up 4x4", latent_size=(8, 8))] == [
        s.name for s in lab.select_sites(without_merges, "up 4x4", latent_size=(8, 8))
    ]


def test_merge_sites_are_picked_by_name_kind_word_and_resnets_patterns(sd1):
    merges = [
        "up_blocks.0.resnets.0",
        "up_blocks.0.resnets.1",
        "up_blocks.1.resnets.0",
        "up_blocks.1.resnets.1",
    ]
    pick = lambda sel, **kw: [s.name for s in lab.select_sites(sd1, sel, **kw)]  # noqa: E731
    assert [s.name for s in lab.sites(sd1) if s.kind == "merge"] == merges
    assert pick("merge") == pick("up merge") == pick(kind("merge")) == pick("up_blocks.*.resnets.*") == merges
    assert pick("re:resnets\\.0$") == ["up_blocks.0.resnets.0", "up_blocks.1.resnets.0"]
    assert pick("up_blocks.1.resnets.1") == ["up_blocks.1.resnets.1"]
    assert pick("merge 8x8", latent_size=(8, 8)) == pick("merge level0") == merges[2:]
    assert pick(kind("merge") & (lambda site: site.level == 1)) == merges[:2]  # a predicate filters them in &
    assert pick(["merge", "mid_block"]) == ["mid_block"] + merges
    with pytest.raises(ValueError, match="'blocks' and 'merge' pick different sites"):
        lab.select_sites(sd1, "blocks merge")
    with pytest.raises(ValueError, match="shorthand 'down merge' matches no site"):
        lab.select_sites(sd1, "down merge")
    with pytest.raises(ValueError, match="kind must be .*'merge'"):
        kind("merges")
    assert "merge" in lab.hooks.SELECTOR_HELP and "resnets" in lab.hooks.SELECTOR_HELP


def test_merge_sites_run_in_execution_order(sd1):
    """lab.sites lists an up block's merges and attention modules in the order the UNet runs them."""
    seen = []
    handles = [
        module.register_forward_pre_hook(lambda module, args, name=name: seen.append(name))
        for name, module in sd1.unet.named_modules()
        if name.startswith("up_blocks.1.") and (name.count(".") == 3 and ".resnets." in name or name.endswith("attn1"))
    ]
    try:
        generate(sd1, steps=1, guidance_scale=1.0)
    finally:
        for handle in handles:
            handle.remove()
    listed = [s.name for s in lab.sites(sd1) if s.name in set(seen)]
    assert seen == listed and len(seen) == 4


def test_exact_names_never_match_by_prefix(sd1):
    """diffusers' PAG matched "blocks.1" inside "blocks.10"; a lab name is the whole module path."""
    with pytest.raises(ValueError, match="unknown site 'up_blocks.1'.*Did you mean"):
        Selector.parse("up_blocks.1").resolve(lab.sites(sd1)[:0] + [s for s in lab.sites(sd1) if s.kind != "block"])
    assert [s.name for s in lab.select_sites(sd1, "up_blocks.1")] == ["up_blocks.1"]


def test_daam_sites_take_the_cross_attention_part_of_a_shorthand(sd1):
    run = lab.daam.trace_generation(
        sd1, PROMPTS[0], num_inference_steps=2, height=64, width=64, sites="up", self_attention_sites=None
    )
    assert run.cross_attention and all(
        run.sites[name].kind == "cross" and run.sites[name].place == "up" for name in run.cross_attention
    )
    with pytest.raises(ValueError, match="picks no cross-attention layers"):
        lab.daam.trace(sd1, sites="self up")


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, the pipeline as it was
# ---------------------------------------------------------------------------------------------


def test_negative_steps_are_refused_at_registration(sd1, restored):
    check = restored(sd1)
    with lab.trace(sd1) as tr:
        with pytest.raises(ValueError, match=r"steps \[-1\] are negative"):
            tr.edit("cross", "probs", lambda p, ctx: p, steps=[-1, 2])
        with pytest.raises(TypeError, match="steps must be"):
            tr.capture("cross", "probs", steps=2.5)
    check()


def test_steps_entirely_outside_the_run_are_refused_before_it_runs(sd1, restored):
    check = restored(sd1)
    calls = []
    with pytest.raises(ValueError, match=r"steps=range\(5, 9\) are all outside this generation's steps 0..2"):
        with lab.trace(sd1) as tr:
            tr.edit("cross", "probs", lambda p, ctx: calls.append(ctx.step) or p, steps=range(5, 9))
            generate(sd1, steps=3)
    assert calls == []
    check()
    with lab.trace(sd1) as tr:  # steps that partly fall in the run are fine
        capture = tr.capture("cross", "probs", steps=range(2, 9), reduce=lab.Stack())
        generate(sd1, steps=3)
    assert [ctx.step for ctx in capture.contexts] == [2]
    check()


def test_scale_tokens_past_the_prompt_is_a_clear_error(sd1, restored):
    check = restored(sd1)
    with pytest.raises(ValueError, match="non-negative ints"):
        lab.scale_tokens([-1], 2.0)
    with pytest.raises(ValueError, match=r"token positions \[80\] are past the 77 keys"):
        with lab.trace(sd1) as tr:
            tr.edit("cross", "probs", lab.scale_tokens([3, 80], 2.0))
            generate(sd1, steps=2)
    check()


def test_trace_generation_with_zero_steps_is_a_clear_error(sd1, restored):
    check = restored(sd1)
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps must be a positive int"):
            lab.daam.trace_generation(sd1, PROMPTS[0], num_inference_steps=steps)
    check()
