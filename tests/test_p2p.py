"""lab.prompt_to_prompt: the token mappers, the injections, LocalBlend and real images through every inversion, on
tiny SD1 / SD2 (v-prediction) / SDXL and the embedded model; bad input is refused before anything runs and the
pipeline is left as it was."""

import numpy as np
import pytest
import torch

import lab
from lab import inversion
from lab.p2p import cross_alphas, refinement_mapper, replacement_mapper
from lab.pipelines import EMBEDDED_MODEL
from lab.tinyworld.world import fixed_caption, render, sample_scene

needs_model = pytest.mark.skipif(not (EMBEDDED_MODEL / "model_index.json").exists(), reason="no embedded model")
FAMILIES = ["sd1", "sd2", "sdxl", pytest.param("embedded", marks=needs_model)]
SOURCE, TARGET = "a red circle left of a blue square", "a red star left of a blue square"

SCENE = sample_scene(43_950_000)
IMAGE = render(SCENE).image  # rendered, never generated
CAPTION = fixed_caption(SCENE)


@pytest.fixture(scope="module")
def embedded():
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, source=SOURCE, target=TARGET, steps=4, **kwargs):
    size = {} if kwargs.get("inversion") is not None else {"height": 64, "width": 64}
    if kwargs.get("inversion") is None:
        kwargs.setdefault("num_inference_steps", steps)
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return lab.prompt_to_prompt(pipe, source, target, progress=False, **size, **kwargs)


# -- token mappers ---------------------------------------------------------------------------------


def test_replacement_mapper_swaps_the_word_and_keeps_the_rest_in_place(sd1):
    mapper = replacement_mapper(sd1, SOURCE, TARGET)
    assert torch.equal(mapper, torch.eye(77))  # circle and star are one token each: position for position
    same = replacement_mapper(sd1, "a cat", "a cat")
    assert torch.equal(same, torch.eye(77))


def test_replacement_mapper_shares_a_word_of_another_token_count_evenly(sd1):
    """A word of one token replaced by a word of two: both target tokens take half of the source token's attention,
    and everything after moves by one position (the end token included)."""
    source, target = "a dog on grass", "a schnauzer on grass"
    src, tgt = lab.token_indices(sd1, source, "dog"), lab.token_indices(sd1, target, "schnauzer")
    assert len(src) == 1 and len(tgt) == 2, (src, tgt)
    mapper = replacement_mapper(sd1, source, target)
    assert torch.allclose(mapper[src[0], tgt], torch.full((2,), 0.5))
    on_s, on_t = lab.token_indices(sd1, source, "on")[0], lab.token_indices(sd1, target, "on")[0]
    assert mapper[on_s, on_t] == 1 and on_t == on_s + 1
    end_s = len(lab.prompt_tokens(sd1, source)) - 1
    assert mapper[end_s, end_s + 1] == 1
    assert torch.allclose(mapper.sum(1)[: 77 - 1], torch.ones(76))  # every source position but the last goes somewhere


def test_refinement_mapper_aligns_the_shared_tokens_and_marks_new_ones(sd1):
    index, alpha = refinement_mapper(sd1, "a red circle", "a striped red circle")
    striped = lab.token_indices(sd1, "a striped red circle", "striped")[0]
    assert alpha[striped] == 0
    for word in ("a", "red", "circle"):
        assert (
            index[lab.token_indices(sd1, "a striped red circle", word)[0]]
            == lab.token_indices(sd1, "a red circle", word)[0]
        )
    assert alpha.sum() == 77 - 1
    end_s, end_t = (
        len(lab.prompt_tokens(sd1, "a red circle")) - 1,
        len(lab.prompt_tokens(sd1, "a striped red circle")) - 1,
    )
    assert index[end_t] == end_s


def test_cross_alphas_follow_the_schedule_and_per_word_overrides(sd1):
    alphas = cross_alphas(sd1, TARGET, {"default_": 0.5, "star": (0.25, 1.0)}, 8)
    star = lab.token_indices(sd1, TARGET, "star")[0]
    assert alphas[:4, 0].eq(1).all() and alphas[4:, 0].eq(0).all()
    assert alphas[:2, star].eq(0).all() and alphas[2:, star].eq(1).all()


# -- generation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_identical_prompts_reproduce_the_source_image(name, request, restored):
    pipe = request.getfixturevalue(name)
    check = restored(pipe)
    result = run(pipe, SOURCE, SOURCE)
    assert result.image_arrays.shape[0] == 2
    torch.testing.assert_close(result.latents[1], result.latents[0], atol=1e-5, rtol=0)
    check()


@pytest.mark.parametrize("name", FAMILIES)
def test_an_edit_without_injection_is_plain_generation_of_the_target(name, request):
    pipe = request.getfixturevalue(name)
    result = run(pipe, cross_steps=0, self_steps=0)
    for row, prompt in ((slice(1, None), TARGET), (slice(0, 1), SOURCE)):
        plain = pipe(
            prompt,
            num_inference_steps=4,
            height=64,
            width=64,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images
        torch.testing.assert_close(result.latents[row], plain.float(), atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_the_injection_changes_only_the_target_rows(name, request):
    pipe = request.getfixturevalue(name)
    free, kept = run(pipe, cross_steps=0, self_steps=0), run(pipe)
    source_change = (kept.latents[0] - free.latents[0]).abs().max()  # float rounding only (explicit vs SDPA attention)
    assert source_change < 1e-3 and (kept.latents[1] - free.latents[1]).abs().max() > 100 * source_change


def test_reweight_scales_the_words_attention_in_the_target_rows_only(sd1):
    red = lab.token_indices(sd1, SOURCE, "red")[0]
    with lab.trace(sd1) as tr:
        probs = tr.capture("cross", "probs", rows="cond", steps=0, reduce=lab.Mean(over=("steps",)))
        run(sd1, SOURCE, SOURCE, reweight={"red": 3.0})
    for maps in probs.result().values():
        source, target = maps[0], maps[1]  # rows [source, target] of the cond part, (heads, queries, tokens)
        torch.testing.assert_close(target[..., red], 3 * source[..., red], rtol=1e-4, atol=1e-7)
        others = [k for k in range(77) if k != red]
        torch.testing.assert_close(target[..., others], source[..., others], rtol=1e-4, atol=1e-7)


def test_refine_and_reweight_compose(sd1):
    result = run(sd1, "a red circle", "a striped red circle", reweight={"striped": 2.0}, edit="refine")
    assert result.settings["edit"] == "refine" and result.image_arrays.shape[0] == 2


@needs_model
def test_local_blend_keeps_the_source_outside_the_mask_embedded(embedded):
    result = run(embedded, local_blend=["circle", "star"], blend_start=0.0, steps=6)
    assert result.masks.shape == (6, 1, *result.latents.shape[-2:])
    mask = result.masks[-1, 0].bool()
    assert 0 < mask.float().mean() < 1, "a mask that covers nothing or everything tests nothing"
    outside = ~mask
    assert torch.equal(result.latents[1][:, outside], result.latents[0][:, outside])
    assert not torch.equal(result.latents[1][:, mask], result.latents[0][:, mask])
    assert result.blend_maps.shape[:2] == (1, 2)


def test_several_targets_at_once(sd1):
    result = run(sd1, SOURCE, [TARGET, "a red circle left of a blue star"], local_blend=["circle", "star", "square"])
    assert result.image_arrays.shape[0] == 3 and result.masks.shape[1] == 2


def test_result_saves_and_loads(sd1, tmp_path):
    result = run(sd1, local_blend="star")
    result.save(tmp_path / "edit")
    loaded = type(result).load(tmp_path / "edit")
    assert loaded.prompts == result.prompts and loaded.settings == result.settings
    assert torch.equal(loaded.masks, result.masks) and np.array_equal(loaded.image_arrays, result.image_arrays)


# -- real images ------------------------------------------------------------------------------------


def _invert(pipe, method, **kwargs):
    return getattr(inversion, f"{method}_inversion")(
        pipe, IMAGE, CAPTION, num_inference_steps=4, progress=False, **kwargs
    )


@pytest.mark.parametrize(
    "method, kwargs",
    [("ddim", {}), ("null_text", {"guidance_scale": 3.0}), ("negative_prompt", {"guidance_scale": 3.0}), ("edict", {})],
)
@pytest.mark.parametrize("name", FAMILIES)
def test_a_real_image_through_each_inversion_regenerates_in_the_source_row(name, method, kwargs, request, restored):
    pipe = request.getfixturevalue(name)
    if name == "sdxl" and method == "null_text":
        kwargs = {**kwargs}  # the SDXL path also optimises the pooled embedding: covered the same way
    inv = _invert(pipe, method, **kwargs)
    _, reconstruction = inv.reconstruct(pipe, progress=False, output_type=None)
    check = restored(pipe)
    result = lab.prompt_to_prompt(pipe, CAPTION, CAPTION, inversion=inv, progress=False)
    check()
    torch.testing.assert_close(result.latents[:1], reconstruction.float().cpu(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(result.latents[1], result.latents[0], atol=1e-5, rtol=0)
    assert result.settings["inversion"] == method and result.settings["num_inference_steps"] == 4


@needs_model
def test_a_real_image_edit_changes_the_object_and_keeps_the_rest_embedded(embedded):
    words = CAPTION.split()
    shapes = [w for w in words if w in ("circle", "square", "triangle", "star", "heart", "hexagon", "cross")]
    target = CAPTION.replace(shapes[0], "star" if shapes[0] != "star" else "circle", 1)
    inv = _invert(embedded, "negative_prompt", guidance_scale=5.0)
    result = lab.prompt_to_prompt(embedded, CAPTION, target, inversion=inv, local_blend=[shapes[0]], progress=False)
    assert (result.image_arrays[1] != result.image_arrays[0]).any()
    mask = result.masks[-1, 0].bool()
    assert torch.equal(result.latents[1][:, ~mask], result.latents[0][:, ~mask])


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": "a red star left of a big blue square", "edit": "replace"}, "as many words"),
        ({"reweight": {"green": 2.0}}, "'green' is not in the prompt"),
        ({"local_blend": ["hexagon"]}, "none of the blend words"),
        ({"cross_steps": 1.5}, "cross_steps must be a fraction"),
        ({"cross_steps": {"purple": 0.5}}, "'purple' is not in the prompt"),
        ({"self_steps": (0.5, 0.2)}, "self_steps must be a fraction"),
        ({"blend_threshold": 1.5, "local_blend": "star"}, "blend_threshold"),
        ({"reweight": {"red": float("nan")}, "target": SOURCE}, "finite"),
        ({"edit": "swap"}, "edit must be one of"),
        ({"num_images_per_prompt": 2}, "one image per prompt"),
        ({"num_inference_steps": 0}, "num_inference_steps must be an int"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(sd1, restored, kwargs, message):
    check = restored(sd1)
    kwargs = dict(kwargs)
    target = kwargs.pop("target", TARGET)
    kwargs.setdefault("num_inference_steps", 3)
    calls = []
    hook = sd1.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises((ValueError, TypeError), match=message):
            lab.prompt_to_prompt(sd1, SOURCE, target, progress=False, height=64, width=64, **kwargs)
    finally:
        hook.remove()
    assert calls == []
    check()


def test_an_inversion_refuses_its_own_settings_again(sd1):
    inv = _invert(sd1, "ddim")
    with pytest.raises(ValueError, match="the inversion's is used"):
        lab.prompt_to_prompt(sd1, CAPTION, CAPTION, inversion=inv, num_inference_steps=10)


def test_pipeline_arguments_are_refused_with_an_edict_inversion(sd1):
    inv = _invert(sd1, "edict")
    with pytest.raises(ValueError, match="EDICT inversion is edited by lab's coupled steps"):
        lab.prompt_to_prompt(sd1, CAPTION, CAPTION, inversion=inv, callback_on_step_end=lambda *a: {})


def test_an_error_during_the_run_leaves_the_pipeline_as_it_was(sd1, restored):
    check = restored(sd1)
    scheduler = sd1.scheduler

    def fail(pipe, i, t, tensors):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        run(sd1, callback_on_step_end=fail)
    check()
    assert sd1.scheduler is scheduler
    inv = _invert(sd1, "ddim")
    with pytest.raises(RuntimeError, match="stop here"):
        lab.prompt_to_prompt(sd1, CAPTION, CAPTION, inversion=inv, callback_on_step_end=fail)
    check()
    assert sd1.scheduler is scheduler
