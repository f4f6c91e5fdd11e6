"""lab.attend_excite: equal to diffusers' StableDiffusionAttendAndExcitePipeline, the maps by hand, stacking with a
user's trace, restoration on errors, inputs refused before anything runs."""

import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionAttendAndExcitePipeline
from diffusers.models.attention_processor import Attention

import lab
from lab.attend_excite import PAPER, AttendExciteResult, attend_and_excite, schedule_for
from lab.hooks import ExplicitAttnProcessor, select_sites

PROMPT = "a red circle left of a blue square"
WORDS = ["circle", "square"]
# Float32 tolerance for latents of magnitude ~1..20 after several gradient steps of size ~20. Measured max |delta|
# against diffusers (below): tiny SD1 1.5e-5, tiny SD2 2.5e-6, TinyWorld 2.9e-5, the batch 1.1e-5. Most of it is the
# other sites' SDPA, which diffusers replaces by explicit attention (TinyWorld: 6e-6 when both use explicit attention).
ATOL, RTOL = 1e-4, 1e-5
_PIPE_ARGS = ("num_inference_steps", "guidance_scale", "output_type", "height", "width")


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tinyworld():
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_reference(pipe, prompt, words, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pipeline is deprecated
        reference = StableDiffusionAttendAndExcitePipeline.from_pipe(pipe)
    reference.set_progress_bar_config(disable=True)
    prompts = [prompt] if isinstance(prompt, str) else prompt
    per_prompt = words if isinstance(words[0], list) else [words] * len(prompts)
    indices = [[i for word in group for i in lab.token_indices(pipe, p, word)] for p, group in zip(prompts, per_prompt)]
    return reference(prompt, token_indices=indices if len(indices) > 1 else indices[0], **kwargs).images


# -- equality with diffusers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, attn_res, size, thresholds",
    [
        ("sd1", 8, 64, {0: 0.9}),  # random weights: max attention ~0.02, the refinement runs its 20 steps
        ("sd2", 8, 64, {2: 0.9}),
        ("tinyworld", 16, None, {0: 0.9, 2: 0.95}),  # trained: reached after 14 and 4 refinement steps
    ],
)
def test_latents_equal_diffusers_attend_and_excite(request, name, attn_res, size, thresholds):
    pipe = request.getfixturevalue(name)
    settings = dict(
        num_inference_steps=6,
        guidance_scale=5.0,
        output_type="latent",
        max_iter_to_alter=4,
        thresholds=thresholds,
        scale_factor=20,
        attn_res=attn_res,
    )
    if size:
        settings.update(height=size, width=size)
    expected = diffusers_reference(pipe, PROMPT, WORDS, generator=seeded(), **{**settings, "attn_res": (attn_res,) * 2})
    # SD 2's "!" padding turns normalize_eot on by default; diffusers never normalises (the authors do, for SD 2.1)
    eot = {"normalize_eot": False} if name == "sd2" else {}
    result = attend_and_excite(pipe, PROMPT, WORDS, generator=seeded(), **eot, **settings)
    plain = pipe(PROMPT, generator=seeded(), **{k: v for k, v in settings.items() if k in _PIPE_ARGS}).images
    assert all(result.refinements[result.steps.index(step)].item() > 0 for step in thresholds)  # refinement ran
    assert result.steps == [0, 1, 2, 3]
    assert not torch.allclose(plain, expected, atol=1e-2)  # A&E moved the latents: the comparison means something
    torch.testing.assert_close(result.images, expected, atol=ATOL, rtol=RTOL)
    assert lab.active_hooks(pipe) == []


def test_batch_of_prompts_with_their_own_subjects_equals_diffusers(sd1):
    prompts = ["a red circle left of a blue square", "a cat on a mat"]
    words = [["circle", "square"], ["cat"]]
    settings = dict(
        num_inference_steps=3,
        guidance_scale=5.0,
        output_type="latent",
        height=64,
        width=64,
        max_iter_to_alter=2,
        thresholds={},
        num_images_per_prompt=2,
    )
    expected = diffusers_reference(sd1, prompts, words, generator=seeded(), attn_res=(8, 8), **settings)
    result = attend_and_excite(sd1, prompts, words, generator=seeded(), attn_res=8, **settings)
    torch.testing.assert_close(result.images, expected, atol=ATOL, rtol=RTOL)
    assert result.max_attention.shape == (2, 4, 2)  # steps x (prompts x images per prompt) x subjects
    assert result.maps.shape == (2, 4, 2, 8, 8)
    assert [[word for word, _ in columns] for columns in result.subjects] == [WORDS, WORDS, ["cat"], ["cat"]]
    assert torch.isnan(result.max_attention[:, 2:, 1]).all() and not torch.isnan(result.max_attention[:, :, 0]).any()


# -- the maps by hand --------------------------------------------------------------------------


def hand_map(probs: dict, token: int, end: int) -> np.ndarray:
    """The authors' _compute_max_attention_per_index, written out in numpy on captured probabilities."""
    stacked = np.concatenate([p[0].numpy().astype(np.float64) for p in probs.values()])  # (site heads, hw, keys)
    mean = stacked.mean(0)
    text = mean[:, 1:end] * 100
    text = np.exp(text - text.max(-1, keepdims=True))
    text /= text.sum(-1, keepdims=True)
    side = int(round(np.sqrt(text.shape[0])))
    grid = np.pad(text[:, token - 1].reshape(side, side), 1, mode="reflect")
    d = np.arange(3) - 1.0
    g = np.exp(-((d / (2 * 0.5)) ** 2))  # the reference's kernel: exp(-((x - mean) / (2 sigma))^2)
    kernel = np.outer(g, g) / np.outer(g, g).sum()
    return np.array([[(grid[y : y + 3, x : x + 3] * kernel).sum() for x in range(side)] for y in range(side)])


def test_maps_by_hand_and_normalize_eot_as_the_authors(sd2):
    """SD 2's tokenizer pads with "!": auto turns normalize_eot on, and the softmax then runs over the prompt's
    own tokens (1 .. end-of-text - 1), as the authors' code does for SD 2.1, instead of 1 .. 75."""
    assert sd2.tokenizer.pad_token != sd2.tokenizer.eos_token
    end_of_text = len(sd2.tokenizer(PROMPT).input_ids) - 1
    token = lab.token_indices(sd2, PROMPT, "circle")[0]
    runs = {}
    for normalize in ("auto", False):
        with lab.trace(sd2) as tr:
            sites = [site.name for site in select_sites(sd2, "cross 8x8", latent_size=(8, 8))]
            probs = tr.capture(sites, "probs", passes="attend_excite")  # the side pass's own maps, first one only
            result = attend_and_excite(
                sd2,
                PROMPT,
                WORDS,
                generator=seeded(),
                num_inference_steps=2,
                max_iter_to_alter=1,
                thresholds={},
                attn_res=8,
                height=64,
                width=64,
                output_type="latent",
                normalize_eot=normalize,
            )
            runs[normalize] = (result, probs.result())
    assert runs["auto"][0].settings["normalize_eot"] == [True]
    assert runs[False][0].settings["normalize_eot"] == [False]
    for normalize, end in (("auto", end_of_text), (False, -1)):
        result, probs = runs[normalize]
        np.testing.assert_allclose(result.maps[0, 0, 0].numpy(), hand_map(probs, token, end), rtol=1e-4, atol=1e-6)
        assert result.max_attention[0, 0, 0].item() == pytest.approx(hand_map(probs, token, end).max(), rel=1e-4)
    # same latent, same first pass: only the softmax's span differs, and it matters
    torch.testing.assert_close(runs["auto"][1], runs[False][1])
    assert not torch.allclose(runs["auto"][0].maps[0], runs[False][0].maps[0], rtol=1e-2)


# -- SDXL, stacking with a user's trace, callbacks ----------------------------------------------


def test_sdxl_runs_with_its_added_conditioning(sdxl):
    """No reference exists for SDXL. Its Euler scheduler checks what DDIM cannot: the gradient pass sees
    scale_model_input(z_t) as the pipeline's own call does, and z_0 goes through latents= unscaled."""
    # tiny SDXL at 64 px: cross-attention only at 4x4
    with pytest.raises(ValueError, match="here they are 4x4"):
        attend_and_excite(sdxl, PROMPT, WORDS, height=64, width=64, num_inference_steps=3)
    settings = dict(num_inference_steps=3, height=64, width=64, output_type="latent", attn_res=4)
    plain = sdxl(PROMPT, generator=seeded(), **{k: v for k, v in settings.items() if k != "attn_res"}).images
    with lab.trace(sdxl) as tr:
        seen = tr.capture("unet", "input", reduce=lab.Stack(), passes="attend_excite", steps=0)
        result = attend_and_excite(sdxl, PROMPT, WORDS, generator=seeded(), max_iter_to_alter=2, **settings)
    assert result.refinements[0].item() > 0
    assert result.steps == [0, 1] and result.maps.shape == (2, 1, 2, 4, 4)
    assert result.settings["normalize_eot"] == [False]  # SDXL's first tokenizer pads with end-of-text
    assert not torch.allclose(result.images, plain, atol=1e-3)
    # z_0 = noise * init_noise_sigma (3.1 at 3 steps); the UNet is given z_0 / sqrt(sigma_0^2 + 1) = the noise
    assert sdxl.scheduler.init_noise_sigma > 3
    torch.testing.assert_close(seen["unet"][0], torch.randn(1, 4, 8, 8, generator=seeded()), atol=1e-5, rtol=1e-5)
    untouched = attend_and_excite(
        sdxl, PROMPT, WORDS, generator=seeded(), max_iter_to_alter=0, thresholds={}, **settings
    )
    assert untouched.steps == []
    torch.testing.assert_close(untouched.images, plain, atol=1e-5, rtol=1e-5)
    assert lab.active_hooks(sdxl) == []


def test_a_users_capture_sees_only_the_pipelines_own_calls(sd1):
    settings = dict(num_inference_steps=4, height=64, width=64, output_type="latent")
    counts = {}
    for name in ("plain", "attend_excite"):
        with lab.trace(sd1) as tr:
            maps = tr.capture("cross", "probs", reduce=lab.Stack())  # a DAAM-style capture
            if name == "plain":
                sd1(PROMPT, generator=seeded(), **settings)
            else:
                result = attend_and_excite(sd1, PROMPT, WORDS, generator=seeded(), attn_res=8, **settings)
                assert tr.describe() == [repr(maps)]  # A&E's edit is gone, the user's capture stays
            counts[name] = [(c.step, c.pass_name) for c in maps.contexts]
            shapes = {site: tensor.shape for site, tensor in maps.result().items()}
    assert result.steps == [0, 1, 2, 3]  # side passes ran at every step
    assert counts["attend_excite"] == counts["plain"] == [(step, "main") for step in range(4)]
    assert all(shape[0] == 4 for shape in shapes.values())
    assert lab.active_hooks(sd1) == []


def test_a_users_callback_runs_first_and_its_latents_are_kept(sd1):
    seen = []

    def zero_at_the_end(pipe, i, t, tensors):
        seen.append((i, sorted(tensors)))
        return {"latents": tensors["latents"] * 0} if i == 2 else {}

    result = attend_and_excite(
        sd1,
        PROMPT,
        WORDS,
        generator=seeded(),
        attn_res=8,
        num_inference_steps=3,
        height=64,
        width=64,
        output_type="latent",
        callback_on_step_end=zero_at_the_end,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    assert seen == [(i, ["latents", "prompt_embeds"]) for i in range(3)]
    assert torch.equal(result.images, torch.zeros_like(result.images))


def test_only_the_chosen_resolution_gets_the_explicit_processor(sd1):
    """Memory: at a 16x16 latent with attn_res 8, only the four 8x8 cross-attention sites (down_blocks.1, mid,
    up_blocks.0 twice) compute explicit probabilities; the 16x16 sites and every self-attention keep their processor
    (on SD 1.5 at 512 px: the five 16x16 cross sites, never the 64x64 self-attention maps)."""
    originals = {name: m.processor for name, m in sd1.unet.named_modules() if isinstance(m, Attention)}
    explicit = []

    def look(pipe, i, t, tensors):
        if i == 0:
            explicit.extend(
                name
                for name, m in pipe.unet.named_modules()
                if isinstance(getattr(m, "processor", None), ExplicitAttnProcessor)
            )
        return {}

    attend_and_excite(
        sd1,
        PROMPT,
        WORDS,
        generator=seeded(),
        attn_res=8,
        num_inference_steps=2,
        height=128,
        width=128,
        output_type="latent",
        callback_on_step_end=look,
    )
    expected = [site.name for site in select_sites(sd1, "cross 8x8", latent_size=(16, 16))]
    assert sorted(explicit) == sorted(expected)
    assert {name.split(".")[0] for name in explicit} == {"down_blocks", "mid_block", "up_blocks"}
    assert len(explicit) == 4 and len(originals) == 14
    assert all(m.processor is originals[name] for name, m in sd1.unet.named_modules() if isinstance(m, Attention))


# -- restoration and refusals ------------------------------------------------------------------


class Stop(Exception):
    pass


def test_restored_after_an_exception_at_every_step(sd1, restored):
    check = restored(sd1)
    settings = dict(num_inference_steps=4, height=64, width=64, output_type="latent", attn_res=8, thresholds={})
    baseline = sd1(PROMPT, generator=seeded(), num_inference_steps=4, height=64, width=64, output_type="latent").images
    for k in range(4):

        def fail(pipe, i, t, tensors, k=k):
            if i == k:
                raise Stop(k)
            return {}

        with pytest.raises(Stop):
            attend_and_excite(sd1, PROMPT, WORDS, generator=seeded(), callback_on_step_end=fail, **settings)
        check()

    # inside the first gradient pass, before the pipeline is called, and inside a user's trace
    with lab.trace(sd1) as tr:
        tr.edit("cross", "probs", lambda p, ctx: (_ for _ in ()).throw(Stop("side")), passes="attend_excite")
        with pytest.raises(Stop):
            attend_and_excite(sd1, PROMPT, WORDS, generator=seeded(), **settings)
        assert len(tr.describe()) == 1
    check()
    again = sd1(PROMPT, generator=seeded(), num_inference_steps=4, height=64, width=64, output_type="latent").images
    assert torch.equal(again, baseline)
    assert all(p.grad is None for p in sd1.unet.parameters())


@pytest.mark.parametrize(
    "arguments, error, match",
    [
        (dict(subjects=["dog"]), ValueError, "subject 'dog' of prompt 0.*not in the prompt"),
        (dict(subjects="circle"), TypeError, "list of words"),
        (dict(subjects=[["circle"], "square"]), TypeError, "mixes words and lists"),
        (dict(subjects=[["circle"], ["square"]]), ValueError, "2 subject lists for 1 prompts"),
        (dict(scale_factor=-20), ValueError, "scale_factor must be a positive number"),
        (dict(thresholds={0: 0.5, 4: 0.8}), ValueError, r"steps \[4\] are outside this run's steps 0..3.*schedule_for"),
        (dict(thresholds={0: 1.5}), ValueError, r"in \(0, 1\]"),
        (dict(max_iter_to_alter=-1), ValueError, "max_iter_to_alter must be an int >= 0"),
        (dict(attn_res=16), ValueError, "no cross-attention map is 16x16.*here they are 8x8, 4x4"),
        (dict(normalize_eot="yes"), ValueError, "normalize_eot"),
        (dict(prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "prompt_embeds"),
        (dict(token_indices=[4]), TypeError, "subjects as words"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps must be a positive int"),
    ],
)
def test_bad_inputs_are_refused_before_anything_runs(sd1, restored, arguments, error, match):
    check = restored(sd1)
    generator = seeded()
    state = generator.get_state()
    call = dict(subjects=WORDS, generator=generator, num_inference_steps=4, height=64, width=64, attn_res=8)
    with pytest.raises(error, match=match):
        attend_and_excite(sd1, PROMPT, **{**call, **arguments})
    check()
    assert torch.equal(generator.get_state(), state)  # no latent was drawn


def test_image_to_image_is_refused(sd1):
    with pytest.raises(TypeError, match="image-to-image.*first latent from the image"):
        attend_and_excite(lab.testing.tiny_img2img_pipeline(sd1), PROMPT, WORDS)


def test_a_word_split_into_pieces_excites_each_piece(sd1):
    prompt = "a tiramisu next to a red circle"
    pieces = lab.token_indices(sd1, prompt, "tiramisu")
    assert len(pieces) == 3  # ti, ram, isu</w>
    result = attend_and_excite(
        sd1,
        prompt,
        ["tiramisu", "circle"],
        generator=seeded(),
        attn_res=8,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="latent",
    )
    assert result.subjects == [
        [("tiramisu", k) for k in pieces] + [("circle", lab.token_indices(sd1, prompt, "circle")[0])]
    ]
    assert result.max_attention.shape == (2, 1, 4)


# -- schedule and result -------------------------------------------------------------------------


def test_schedule_for_scales_the_papers_schedule():
    assert lab.attend_and_excite is attend_and_excite
    assert schedule_for(50) == {"max_iter_to_alter": 25, "thresholds": PAPER["thresholds"]}
    assert schedule_for(20) == {"max_iter_to_alter": 10, "thresholds": {0: 0.05, 4: 0.5, 8: 0.8}}
    assert schedule_for(6) == {"max_iter_to_alter": 3, "thresholds": {0: 0.05, 1: 0.5, 2: 0.8}}
    with pytest.raises(ValueError):
        schedule_for(0)


def test_default_schedule_and_result_round_trip(sd1, tmp_path):
    result = attend_and_excite(
        sd1,
        PROMPT,
        WORDS,
        generator=seeded(),
        attn_res=8,
        num_inference_steps=3,
        height=64,
        width=64,
        scale_factor=5,
        max_refinement_steps=2,
    )
    # the paper's schedule over 3 steps: every step altered, refinement at step 0 only (10 and 20 are never reached)
    assert result.steps == [0, 1, 2] and result.settings["thresholds"] == [(0, 0.05)]
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    loaded = AttendExciteResult.load(result.save(tmp_path / "run"))
    torch.testing.assert_close(loaded.maps, result.maps, equal_nan=True)
    assert loaded.subjects == result.subjects and loaded.steps == result.steps
    assert np.array_equal(loaded.image_arrays, result.image_arrays)
