"""lab.daam on tiny random pipelines: DAAM heat maps, open-vocabulary and self-attention maps, the x0 trajectory."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import snapshot

import lab
import lab.pipelines

PROMPT = "a photograph of an astronaut riding a horse"
STEPS = 4


def traced(pipe, prompt=PROMPT, steps=STEPS, **kwargs):
    kwargs.setdefault("height", 64)
    kwargs.setdefault("width", 64)
    return lab.daam.trace_generation(pipe, prompt, seed=0, num_inference_steps=steps, **kwargs)


@pytest.fixture(scope="module")
def run(sd1):
    """Everything recorded: per-step maps and heads, queries, self-attention, trajectory."""
    return traced(sd1, per_step=True)


def hand_daam(probs: dict, sizes: dict, tokens: list[int], image: int, image_size) -> torch.Tensor:
    """The paper's sum, literally: every step, layer and head upsampled on its own, then averaged."""
    total, terms = torch.zeros(image_size), 0
    for name, site_probs in probs.items():  # (steps, images, heads, queries, 77), lab.Stack
        word = site_probs[:, image][..., tokens].mean(dim=-1)  # multi-token words: mean of the tokens
        for step in range(word.shape[0]):
            for head in range(word.shape[1]):
                grid = word[step, head].reshape(1, 1, *sizes[name])
                total += F.interpolate(grid, size=image_size, mode="bicubic", align_corners=False)[0, 0]
                terms += 1
    return (total / terms).clamp(min=0)


def plain_capture(pipe, prompt, **kwargs):
    with lab.trace(pipe) as tr:
        capture = tr.capture("cross", "probs", reduce=lab.Stack(), cfg="cond")
        kwargs.setdefault("height", 64)
        kwargs.setdefault("width", 64)
        pipe(prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), **kwargs)
    return capture.result(), capture.sizes


# ---------------------------------------------------------------------------------------------
# DAAM heat maps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_step", [True, False])
def test_heat_map_equals_the_hand_computed_sum(sd1, per_step):
    """Per-step storage and running means both give the paper's map, computed from a plain lab capture."""
    run = traced(sd1, per_step=per_step)
    probs, sizes = plain_capture(sd1, PROMPT)
    tokens = lab.token_indices(sd1, PROMPT, "horse")
    expected = hand_daam(probs, sizes, tokens, 0, (64, 64)).numpy()
    heat_map = run.heat_map("horse")
    assert heat_map.values.shape == (64, 64) and heat_map.values.dtype == np.float32
    np.testing.assert_allclose(heat_map.values, expected, rtol=1e-4, atol=1e-7)


def test_multi_token_word_is_the_mean_of_its_tokens(sd1):
    prompt = "a hexagonal horse"  # CLIP's BPE: hex, ag, onal
    run = traced(sd1, prompt, per_step=True)
    tokens = lab.token_indices(sd1, prompt, "hexagonal")
    assert len(tokens) == 3
    probs, sizes = plain_capture(sd1, prompt)
    np.testing.assert_allclose(
        run.heat_map("hexagonal").values, hand_daam(probs, sizes, tokens, 0, (64, 64)).numpy(), rtol=1e-4, atol=1e-7
    )
    assert "hexagonal" in run.words()


def test_repeated_word_by_occurrence(sd1):
    prompt = "a red circle and a red square"
    run = traced(sd1, prompt, per_step=True)
    first, second, both = (run.heat_map("red", occurrence=k).values for k in (0, 1, None))
    assert not np.allclose(first, second)
    np.testing.assert_allclose(both, (first + second) / 2, atol=1e-3 * both.max())
    assert run.words() == ["a", "red", "circle", "and", "a", "red", "square"]
    with pytest.raises(ValueError, match="occurs 2 time"):
        run.heat_map("red", occurrence=2)


def test_word_not_in_prompt_lists_the_prompts_words(run):
    with pytest.raises(ValueError, match="'zebra' is not in the prompt.*astronaut, riding, a, horse"):
        run.heat_map("zebra")


def test_normalized_mask_and_overlay(run):
    heat_map = run.heat_map("astronaut")
    normalized = heat_map.normalized()
    assert normalized.max() == pytest.approx(1.0) and normalized.min() == pytest.approx(0.0)
    np.testing.assert_array_equal(heat_map.mask(), normalized > lab.daam.PAPER_THRESHOLD)
    assert heat_map.mask(0.0).sum() == heat_map.values.size - (normalized == 0).sum()
    assert not heat_map.mask(1.0).any()
    overlay = heat_map.overlay(alpha=0.5)
    assert overlay.size == (64, 64) and overlay.mode == "RGB"
    x, y = heat_map.peak()
    assert heat_map.values[y, x] == heat_map.values.max()


def test_plots(run):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = run.heat_map("horse").plot()
    assert ax.get_title() == "horse"
    fig = lab.daam.plot_grid([run.heat_map(word) for word in ("astronaut", "horse")], ncols=3)
    assert len(fig.axes) == 3  # the image, then one panel per word
    plt.close("all")


def test_batch_of_two_prompts_and_images_per_prompt(sd1):
    prompts = ["a horse in a field", "a small horse on a beach"]
    run = traced(sd1, prompts, num_images_per_prompt=2)
    assert run.num_images == 4 and run.prompts == [prompts[0]] * 2 + [prompts[1]] * 2
    maps = [run.heat_map("horse", image=i).values for i in range(4)]
    assert not np.allclose(maps[0], maps[2])  # different prompts
    assert not np.allclose(maps[0], maps[1])  # same prompt, different noise
    assert run.words(2) == ["a", "small", "horse", "on", "a", "beach"]
    with pytest.raises(ValueError, match="out of range.*4 image"):
        run.heat_map("horse", image=4)


def test_non_square_images_give_image_sized_maps(sd1):
    run = traced(sd1, height=64, width=96, per_step=True)
    assert run.image_size == (64, 96) and run.image_arrays.shape == (1, 64, 96, 3)
    assert run.heat_map("horse").values.shape == (64, 96)
    assert "8x12" in run.site_groups
    assert run.self_attention_map(95, 10).values.shape == (64, 96)
    assert run.x0[0][0].size == (96, 64)


def test_deterministic_from_a_seed(sd1):
    first, second = traced(sd1), traced(sd1)
    np.testing.assert_array_equal(first.heat_map("horse").values, second.heat_map("horse").values)
    np.testing.assert_array_equal(first.image_arrays, second.image_arrays)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_families(family, request, restored):
    pipe = request.getfixturevalue(family)
    check = restored(pipe)
    run = traced(pipe, per_step=True)
    check()
    heat_map = run.heat_map("horse")
    assert heat_map.values.shape == (64, 64) and heat_map.values.max() > 0
    heads = {site.heads for site in run.sites.values() if site.kind == "cross"}
    if family == "sd2":
        assert len(heads) == 2  # per-block head counts
    for group, names in run.site_groups.items():
        assert run.num_heads[group] == min(run.heads_per_site[name] for name in names)
    with pytest.raises(ValueError, match="out of range for .* heads"):
        run.heat_map("horse", heads=max(heads))
    # v-prediction (sd2) and Euler (sdxl): the last x0_hat is the image the pipeline decoded.
    assert np.abs(run.x0_images[-1, 0].astype(float) - run.image_arrays[0]).mean() < 2.0
    np.testing.assert_allclose(
        run.open_vocab_map("horse", attribution_prompt=PROMPT).values, heat_map.values, rtol=1e-4, atol=1e-6
    )


def test_img2img(sd1, restored):
    img2img = lab.testing.tiny_img2img_pipeline(sd1)
    init = traced(sd1).images[0]
    check = restored(img2img)
    run = lab.daam.trace_generation(img2img, PROMPT, image=init, strength=0.5, num_inference_steps=6, per_step=True)
    check()
    assert run.num_steps == 3 and len(run.x0[0]) == 3
    assert run.heat_map("horse", steps=range(1, 3)).values.shape == (64, 64)


def test_context_manager_form_matches_trace_generation(sd1, run):
    with lab.daam.trace(sd1, per_step=True) as recording:
        out = sd1(PROMPT, num_inference_steps=STEPS, height=64, width=64, generator=torch.Generator().manual_seed(0))
    mine = recording.result(PROMPT, images=out.images)
    np.testing.assert_array_equal(
        mine.heat_map("horse", steps=[0, 3]).values, run.heat_map("horse", steps=[0, 3]).values
    )
    np.testing.assert_array_equal(mine.x0_images, run.x0_images)


def test_two_generations_in_one_trace_is_an_error(sd1):
    with lab.daam.trace(sd1) as recording:
        for _ in range(2):
            sd1(PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent")
    with pytest.raises(RuntimeError, match="more than one generation"):
        recording.result(PROMPT)


# ---------------------------------------------------------------------------------------------
# Slicing: steps, layer groups, heads (what the widget's sliders call)
# ---------------------------------------------------------------------------------------------


def test_slices_combine_like_the_paper_sum(run):
    """A map over several slices is the term-weighted mean of the slices' maps."""
    whole = run.heat_map("horse").values
    early, late = run.heat_map("horse", steps=range(0, 1)).values, run.heat_map("horse", steps=slice(1, None)).values
    np.testing.assert_allclose(whole, (1 * early + 3 * late) / 4, rtol=1e-4, atol=1e-7)
    assert not np.allclose(early, late)

    groups = run.site_groups
    assert list(groups)[:3] == ["all", "8x8", "4x4"]  # fine to coarse
    fine, coarse = run.heat_map("horse", sites="8x8").values, run.heat_map("horse", sites="4x4").values
    n_fine, n_coarse = len(groups["8x8"]), len(groups["4x4"])  # every layer has 2 heads here
    np.testing.assert_allclose(whole, (n_fine * fine + n_coarse * coarse) / (n_fine + n_coarse), rtol=1e-4, atol=1e-7)

    heads = [run.heat_map("horse", heads=h).values for h in range(run.num_heads["all"])]
    np.testing.assert_allclose(whole, np.mean(heads, axis=0), rtol=1e-4, atol=1e-7)


def test_every_kind_of_layer_selector(run):
    up_fine = run.heat_map("horse", sites="up 8x8")
    assert up_fine.sites == tuple(n for n in run.site_groups["up"] if n in run.site_groups["8x8"])
    name = run.site_groups["mid"][0]
    assert run.heat_map("horse", sites=name).sites == (name,)
    assert run.heat_map("horse", sites="up_blocks.1.*").sites == tuple(
        n for n in run.site_groups["all"] if n.startswith("up_blocks.1.")
    )
    assert run.heat_map("horse", sites="re:^down").sites == tuple(run.site_groups["down"])
    assert run.heat_map("horse", sites=lambda site: site.level == 1).sites == tuple(run.site_groups["4x4"])
    assert run.heat_map("horse", sites=["mid", "down"]).sites == tuple(
        n for n in run.site_groups["all"] if n in run.site_groups["mid"] + run.site_groups["down"]
    )


def test_layer_selectors_on_a_loaded_run_are_lab_selectors(run, tmp_path):
    loaded = lab.daam.AttributionRun.load(run.save(tmp_path / "run"))  # no pipeline
    groups = run.site_groups
    cases = {
        "up 8x8": [n for n in groups["up"] if n in groups["8x8"]],
        "cross level1": groups["4x4"],
        "all": groups["all"],
        ("mid", "re:^down"): [n for n in groups["all"] if n in groups["mid"] + groups["down"]],
        (run.sites[groups["mid"][0]],): groups["mid"][:1],
    }
    for selector, expected in cases.items():
        selector = list(selector) if isinstance(selector, tuple) else selector
        assert loaded.heat_map("horse", sites=selector).sites == tuple(expected), selector
        assert run.heat_map("horse", sites=selector).sites == tuple(expected), selector
    # The names lab resolves are the recorded layers of the asked kind only.
    assert loaded.self_attention_map(3, 4, sites="8x8").sites == tuple(loaded.self_attention_site_groups["8x8"])
    with pytest.raises(ValueError, match="picks none of the recorded cross-attention layers.*Valid groups"):
        loaded.heat_map("horse", sites="self")


def test_recording_touches_the_unet_only_through_lab_hooks(sd1):
    with lab.daam.trace(sd1, per_step=True) as recording:
        hooks = [
            hook
            for module in sd1.unet.modules()
            for hook in [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        ]
        assert hooks and all(getattr(hook, "lab_hook", False) for hook in hooks)
        sd1(PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent")
    assert recording.result(PROMPT).num_steps == 2


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(sites="16x16"), ValueError, "Valid groups: all, 8x8, 4x4, down, mid, up"),
        (dict(sites="down_blocks.0.attentions.0.transformer_blocks.0.attn1"), ValueError, "Valid groups"),
        (dict(steps=range(2, 2)), ValueError, "empty"),
        (dict(steps=[1, 4]), ValueError, r"out of range: this run has steps 0..3"),
        (dict(steps="early"), TypeError, "steps must be"),
        (dict(heads=[]), ValueError, "empty"),
        (dict(heads=2), ValueError, "out of range"),
        (dict(image=1), ValueError, "1 image"),
    ],
)
def test_bad_slices_are_clear_errors(run, kwargs, error, message):
    with pytest.raises(error, match=message):
        run.heat_map("horse", **kwargs)


def test_trajectory_and_queries_without_per_step_maps(sd1):
    run = traced(sd1, trajectory=True, open_vocabulary=True)
    assert not run.per_step and len(run.x0[0]) == STEPS
    np.testing.assert_allclose(
        run.open_vocab_map("horse", attribution_prompt=PROMPT).values,
        run.heat_map("horse").values,
        rtol=1e-4,
        atol=1e-7,
    )
    assert run.open_vocab_map("horse", steps=[0]).values.shape == (64, 64)  # the queries are per step


def test_running_means_refuse_step_and_head_slices(sd1):
    run = traced(sd1)
    assert run.heat_map("horse", steps=range(STEPS), heads=[0, 1]).values.shape == (64, 64)  # "all" is fine
    with pytest.raises(ValueError, match="per_step=True"):
        run.heat_map("horse", steps=range(2))
    with pytest.raises(ValueError, match="per_step=True"):
        run.heat_map("horse", heads=0)
    with pytest.raises(ValueError, match="trajectory was not recorded"):
        run.x0  # noqa: B018
    with pytest.raises(ValueError, match="open_vocabulary=True"):
        run.open_vocab_map("zebra")


def test_sliced_heat_maps_reuse_the_word_maps(run):
    """The widget scrubs sliders: a word's per-layer maps are computed once, then every slice is a sum
    over them (timed in benchmarks/results/widget_redraw.md, not here)."""
    run.heat_map("horse")
    cached = dict(run._word_maps)
    for step in range(6):
        sliced = run.heat_map(
            "horse", steps=range(step % STEPS, STEPS), sites=["8x8", "4x4", "all"][step % 3], heads=step % 2
        )
        assert sliced.values.shape == (64, 64)
    assert run._word_maps.keys() == cached.keys() and all(run._word_maps[k] is cached[k] for k in cached)


# ---------------------------------------------------------------------------------------------
# Open-vocabulary maps
# ---------------------------------------------------------------------------------------------


def test_open_vocabulary_with_the_generation_prompt_is_daam(run):
    daam = run.heat_map("horse", steps=range(1, 3), sites="8x8")
    ovam = run.open_vocab_map("horse", attribution_prompt=PROMPT, steps=range(1, 3), sites="8x8")
    np.testing.assert_allclose(ovam.values, daam.values, rtol=1e-4, atol=1e-7)
    assert ovam.kind == "open-vocabulary" and ovam.prompt == PROMPT


def test_open_vocabulary_word_absent_from_the_prompt(run):
    zebra = run.open_vocab_map("zebra")
    assert zebra.values.shape == (64, 64) and zebra.values.max() > 0
    assert zebra.prompt == "zebra"
    in_context = run.open_vocab_map("zebra", attribution_prompt="a photograph of a zebra")
    assert not np.allclose(zebra.values, in_context.values)
    with pytest.raises(ValueError, match="not in the prompt"):
        run.open_vocab_map("zebra", attribution_prompt="a photograph of a horse")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_token_optimisation_fits_the_mask_and_leaves_the_model_alone(run, sd1, tmp_path):
    """OVAM section 3.2: the optimised token's map matches the target mask better than the word's own."""
    target = np.zeros((64, 64), dtype=bool)
    target[8:30, 36:60] = True  # a box the random model's "horse" map knows nothing about
    before = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    token = run.optimize_token("horse", target, attribution_prompt=PROMPT, epochs=60, lr=0.1, progress=False)
    assert token.losses[-1] < 0.8 * token.losses[0]
    plain = run.open_vocab_map("horse", attribution_prompt=PROMPT)
    fitted = run.open_vocab_map(token)
    assert iou(fitted.mask(), target) > iou(plain.mask(), target) + 0.2
    assert fitted.word == "horse" and fitted.prompt == PROMPT
    # Only the word's rows of the embedding moved; the model has no gradients and the same weights.
    original = lab.ovam.text_embedding(run, sd1, PROMPT)
    moved = (token.embedding - original).abs().sum(dim=-1) > 0
    assert moved.nonzero().flatten().tolist() == list(token.tokens)
    assert all(p.grad is None for p in sd1.unet.parameters())
    assert all(torch.equal(before[k], v) for k, v in sd1.unet.state_dict().items())
    # Saved and loaded, the token gives the same map, also on a freshly loaded run.
    loaded = lab.daam.OptimizedToken.load(token.save(tmp_path / "horse.safetensors"))
    assert loaded.tokens == token.tokens and loaded.losses == token.losses
    np.testing.assert_allclose(run.open_vocab_map(loaded).values, fitted.values, rtol=1e-5, atol=1e-8)


def test_an_optimised_token_transfers_to_another_run_of_the_same_pipeline(run, sd1, sdxl):
    other = traced(sd1, prompt="a horse in a field", open_vocabulary=True)
    token = run.optimize_token("horse", np.ones((64, 64)) > 0, epochs=2, progress=False)
    assert other.open_vocab_map(token).values.shape == (64, 64)
    xl_run = traced(sdxl, prompt="a horse in a field", open_vocabulary=True, steps=2)
    with pytest.raises(ValueError, match="pipeline it was optimised on"):
        xl_run.open_vocab_map(token)


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.ones((32, 32)), "32x32"),
        (np.ones((64, 48)), "48x64"),
        (np.ones((64, 64, 3)), "2-D"),
    ],
)
def test_token_optimisation_needs_a_mask_of_the_image_size(run, mask, message):
    with pytest.raises(ValueError, match=message):
        run.optimize_token("horse", mask, epochs=1, progress=False)


# ---------------------------------------------------------------------------------------------
# Self-attention maps
# ---------------------------------------------------------------------------------------------


def test_self_attention_map_is_a_distribution_over_pixels(run):
    attention = run.self_attention_map(10, 50)
    assert attention.values.shape == (64, 64) and attention.values.min() >= 0
    assert attention.values.sum() == pytest.approx(1.0, abs=1e-5)
    assert attention.kind == "self-attention"
    late = run.self_attention_map(10, 50, steps=range(2, 4), sites="8x8")
    assert late.values.sum() == pytest.approx(1.0, abs=1e-5) and not np.allclose(late.values, attention.values)
    assert set(late.sites) == set(run.self_attention_site_groups["8x8"])


def test_self_attention_row_is_the_captured_row(run):
    """On one 8x8 layer, the map at a pixel is that layer's captured row for the pixel's latent cell."""
    name = run.self_attention_site_groups["8x8"][0]
    x, y = 20, 45  # latent cell (row 5, column 2) of an 8x8 grid over 64 px
    row = run.self_attention[name][:, 0, 5 * 8 + 2].mean(dim=0).reshape(1, 1, 8, 8)
    expected = F.interpolate(row, size=(64, 64), mode="bicubic", align_corners=False)[0, 0].clamp(min=0)
    np.testing.assert_allclose(
        run.self_attention_map(x, y, sites=name).values, (expected / expected.sum()).numpy(), rtol=1e-4, atol=1e-8
    )


@pytest.mark.parametrize("x,y", [(64, 0), (0, 64), (-1, 3)])
def test_pixel_outside_the_image_is_an_error(run, x, y):
    with pytest.raises(ValueError, match="outside the 64x64 image"):
        run.self_attention_map(x, y)


def test_default_self_attention_layers_respect_the_native_resolution(sd1):
    """ "auto" keeps self-attention layers with at most 32x32 queries at the UNet's native size."""
    recording = lab.daam.trace(sd1)
    self_sites = [site for site in lab.sites(sd1) if site.kind == "self"]
    assert all(recording.self_selector(site) for site in self_sites)  # 8x8 native latent: all of them
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # SD 1.5's UNet, without allocating its weights
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
    chosen = lab.daam._low_resolution_self_attention(SimpleNamespace(unet=unet))
    sizes = {site.spatial_size((64, 64)) for site in lab.sites(unet) if site.kind == "self" and chosen(site)}
    assert sizes == {(32, 32), (16, 16), (8, 8)}


# ---------------------------------------------------------------------------------------------
# Trajectory
# ---------------------------------------------------------------------------------------------


def test_trajectory_has_one_image_per_step_ending_at_the_output(run):
    assert len(run.x0) == 1 and len(run.x0[0]) == run.num_steps == STEPS
    assert run.x0[0][0].size == (64, 64)
    last = np.asarray(run.x0[0][-1], dtype=float)
    assert np.abs(last - run.image_arrays[0]).mean() < 2.0  # 0-255 scale
    first = np.asarray(run.x0[0][0], dtype=float)
    assert np.abs(first - run.image_arrays[0]).mean() > np.abs(last - run.image_arrays[0]).mean()


def test_predicted_clean_latents_inverts_the_forward_process():
    x0, noise, alpha_bar = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), 0.3
    x_t = alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise
    v = alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * x0
    for prediction_type, output in (("epsilon", noise), ("v_prediction", v), ("sample", x0)):
        recovered = lab.daam.predicted_clean_latents(x_t, output, alpha_bar, prediction_type)
        torch.testing.assert_close(recovered, x0, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Saving, restoring the pipeline, memory
# ---------------------------------------------------------------------------------------------


def test_save_load_round_trip(run, sd1, tmp_path):
    run.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["maps.safetensors", "run.json"]
    loaded = lab.daam.AttributionRun.load(tmp_path / "run", pipe=sd1)
    assert loaded.prompts == run.prompts and loaded.timesteps == run.timesteps and loaded.sites == run.sites
    assert loaded.site_groups == run.site_groups and loaded.num_heads == run.num_heads
    for kwargs in (dict(), dict(steps=[0, 2], sites="4x4", heads=1)):
        np.testing.assert_array_equal(loaded.heat_map("horse", **kwargs).values, run.heat_map("horse", **kwargs).values)
    np.testing.assert_array_equal(loaded.self_attention_map(3, 4).values, run.self_attention_map(3, 4).values)
    np.testing.assert_array_equal(loaded.open_vocab_map("zebra").values, run.open_vocab_map("zebra").values)
    np.testing.assert_array_equal(loaded.image_arrays, run.image_arrays)
    np.testing.assert_array_equal(loaded.x0_images, run.x0_images)
    without_pipe = lab.daam.AttributionRun.load(tmp_path / "run")  # the bundled CLIP tokenizer reads words
    assert without_pipe.words() == run.words()
    with pytest.raises(ValueError, match="pass pipe="):
        without_pipe.open_vocab_map("zebra")


def test_pipeline_is_restored_after_a_run(sd1, restored):
    check = restored(sd1)
    traced(sd1, per_step=True)
    check()


def test_pipeline_is_restored_after_an_exception_inside_a_run(sd1, restored):
    check = restored(sd1)

    def stop(steps_done, total):
        if steps_done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        traced(sd1, per_step=True, callback=stop)
    check()
    before = snapshot(sd1.unet)
    with pytest.raises(ZeroDivisionError):
        with lab.daam.trace(sd1, per_step=True):
            sd1(PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent")
            1 / 0  # noqa: B018
    assert snapshot(sd1.unet)[0] == before[0]
    check()


def test_bad_trace_arguments_change_nothing(sd1, restored):
    check = restored(sd1)
    with pytest.raises(ValueError, match="must pick cross-attention layers"):
        traced(sd1, sites="down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    with pytest.raises(ValueError, match="picks no self-attention"):
        traced(sd1, self_attention_sites="cross")
    with pytest.raises(ValueError, match="downsample"):
        traced(sd1, downsample=0)
    check()


def test_shorthand_sites_record_cross_attention_only(sd1):
    run = traced(sd1, sites="8x8", self_attention_sites="4x4")
    assert set(run.cross_attention) == set(run.site_groups["all"]) and list(run.site_groups) == [
        "all",
        "8x8",
        "down",
        "up",
    ]
    assert all(
        run.sites[name].kind == "self" and run.sites[name].attention_size == (4, 4) for name in run.self_attention
    )


def test_memory_guard_says_what_to_narrow(sd1, restored):
    check = restored(sd1)
    with pytest.raises(lab.CaptureTooLarge, match="per_step=False.*downsample"):
        traced(sd1, per_step=True, memory_limit=10_000)
    check()


def test_downsampled_maps_still_cover_the_image(sd1):
    run = traced(sd1, downsample=2, per_step=True)
    name = run.site_groups["8x8"][0]
    assert run.sites[name].grid == (4, 4) and run.sites[name].attention_size == (8, 8)
    assert run.heat_map("horse").values.shape == (64, 64)
    assert run.self_attention_map(5, 5).values.sum() == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# TinyWorld (needs the trained embedded model)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (lab.pipelines.EMBEDDED_MODEL / "model_index.json").exists(),
    reason="needs the trained TinyWorld model in lab/models/tinyworld-sd",
)
def test_tinyworld_object_word_maps_peak_inside_the_object():
    """Render known scenes, let the model redraw them (img2img keeps the layout), and check that
    each object noun's DAAM map peaks inside that object's ground-truth mask (dilated by 2 px)."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image
    from scipy import ndimage

    from lab.tinyworld import world

    pipe = lab.pipelines.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    hits, total = 0, 0
    for seed in (11, 12, 13, 14):
        scene = world.sample_scene(seed, n_objects=2)
        rendered = world.render(scene)
        prompt = world.fixed_caption(scene)
        run = lab.daam.trace_generation(
            img2img,
            prompt,
            image=Image.fromarray(rendered.image),
            strength=0.5,
            num_inference_steps=20,
            guidance_scale=5.0,
            seed=seed,
        )
        for index, obj in enumerate(scene.objects):
            occurrence = sum(other.shape == obj.shape for other in scene.objects[:index])
            x, y = run.heat_map(obj.shape, occurrence=occurrence).peak()
            hits += bool(ndimage.binary_dilation(rendered.masks[index], iterations=2)[y, x])
            total += 1
    assert hits >= 0.75 * total, f"{hits}/{total} object maps peak inside their object"
