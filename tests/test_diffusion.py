"""lab.diffusion against diffusers: its schedulers, rescale_noise_cfg, VAE scaling, encode_prompt and,
end to end, a hand-written loop of lab.diffusion functions against the pipelines' own __call__."""

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from PIL import Image

import lab
from lab import diffusion

torch.set_num_threads(1)

SD_SCHEDULE = lab.testing._sd_scheduler_config("epsilon")  # SD 1.x's schedule, as the tiny configs use it


def ddim(**config) -> DDIMScheduler:
    return DDIMScheduler(**{**SD_SCHEDULE, **config})


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- the schedule ---------------------------------------------------------------------------------


def test_alpha_bar_reads_the_scheduler():
    scheduler = ddim()
    assert diffusion.alpha_bar(scheduler, 10).dtype == torch.float64
    assert diffusion.alpha_bar(scheduler, 10).item() == scheduler.alphas_cumprod[10].item()
    timesteps = torch.tensor([999, 500, 0, -1])
    expected = torch.cat([scheduler.alphas_cumprod[[999, 500, 0]], scheduler.final_alpha_cumprod.view(1)])
    assert torch.equal(diffusion.alpha_bar(scheduler, timesteps), expected.double())
    assert diffusion.alpha_bar(ddim(set_alpha_to_one=True), -1).item() == 1.0
    assert diffusion.alpha_bar(DDPMScheduler(), -1).item() == 1.0  # DDPM's step uses `one` after the last
    assert diffusion.alpha_bar(ddim(rescale_betas_zero_snr=True), 999).item() == 0.0
    with pytest.raises(ValueError, match="0 to 999"):
        diffusion.alpha_bar(scheduler, 1000)
    with pytest.raises(ValueError, match="integer"):
        diffusion.alpha_bar(scheduler, 10.5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_previous_timestep_follows_the_schedule(spacing):
    scheduler = ddim(timestep_spacing=spacing)
    with pytest.raises(ValueError, match="set_timesteps"):
        diffusion.previous_timestep(scheduler, 999)
    scheduler.set_timesteps(7)
    schedule = scheduler.timesteps.tolist()
    assert [diffusion.previous_timestep(scheduler, t) for t in scheduler.timesteps] == schedule[1:] + [-1]
    with pytest.raises(ValueError, match="not in the scheduler's schedule"):
        diffusion.previous_timestep(scheduler, schedule[0] - 1)


def test_previous_timestep_is_ddpms_for_custom_timesteps():
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(timesteps=[900, 650, 400, 120, 5])
    for t in scheduler.timesteps:
        assert diffusion.previous_timestep(scheduler, t) == int(scheduler.previous_timestep(t))


# -- predictions ----------------------------------------------------------------------------------


def daam_predicted_clean_latents(sample, model_output, alpha_bar, prediction_type):
    """lab.daam.predicted_clean_latents as of c82b8bc, frozen here: daam's regression test relies on it."""
    alpha_bar = torch.tensor(alpha_bar, dtype=torch.float64)
    signal, noise = float(alpha_bar.sqrt()), float((1 - alpha_bar).sqrt())
    if prediction_type == "epsilon":
        return (sample - noise * model_output) / signal
    if prediction_type == "v_prediction":
        return signal * sample - noise * model_output
    return model_output


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_x0_is_bit_identical_to_daams(prediction_type):
    sample, output = randn(2, 4, 8, 8, seed=1), randn(2, 4, 8, 8, seed=2)
    for abar in [0.9991, 0.5, float(ddim().alphas_cumprod[700])]:
        assert torch.equal(
            diffusion.predicted_x0(output, sample, abar, prediction_type),
            daam_predicted_clean_latents(sample, output, abar, prediction_type),
        )


@pytest.mark.parametrize("alpha_bar", [0.0, 0.02, 0.7, torch.tensor([0.0, 0.3, 0.99])])
def test_conversions_invert_the_forward_process(alpha_bar):
    x0, eps = randn(3, 4, 8, 8, seed=3).double(), randn(3, 4, 8, 8, seed=4).double()
    a = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1, 1, 1, 1)
    x_t, v = a.sqrt() * x0 + (1 - a).sqrt() * eps, a.sqrt() * eps - (1 - a).sqrt() * x0
    truth = {"epsilon": eps, "v_prediction": v, "sample": x0}
    zero_signal = bool((a == 0).any())
    for kind, output in truth.items():
        if kind == "epsilon" and zero_signal:  # pure noise: an eps model cannot say what x0 is
            with pytest.raises(ValueError, match="zero-terminal-SNR"):
                diffusion.predicted_x0(output, x_t, alpha_bar, kind)
            continue
        for convert, target in [
            (diffusion.predicted_x0, x0),
            (diffusion.predicted_epsilon, eps),
            (diffusion.predicted_v, v),
        ]:
            torch.testing.assert_close(convert(output, x_t, alpha_bar, kind), target, atol=1e-9, rtol=1e-9)
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion.predicted_x0(x0, x_t, 0.5, "flow")


def test_add_noise_is_the_schedulers():
    x0, noise = randn(4, 4, 8, 8, seed=5), randn(4, 4, 8, 8, seed=6)
    timesteps = torch.tensor([999, 500, 20, 0])
    for scheduler in [ddim(), DDPMScheduler(), ddim(rescale_betas_zero_snr=True)]:
        torch.testing.assert_close(
            diffusion.add_noise(scheduler, x0, noise, timesteps),
            scheduler.add_noise(x0, noise, timesteps),
            atol=1e-6,
            rtol=1e-5,
        )
        torch.testing.assert_close(
            diffusion.add_noise(scheduler, x0, noise, 500),
            scheduler.add_noise(x0, noise, torch.tensor([500])),
            atol=1e-6,
            rtol=1e-5,
        )


# -- DDIM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_is_ddim_schedulers(prediction_type, spacing, zero_snr):
    scheduler = ddim(prediction_type=prediction_type, timestep_spacing=spacing, rescale_betas_zero_snr=zero_snr)
    scheduler.set_timesteps(10)
    sample = randn(2, 4, 8, 8, seed=7)
    for i, t in enumerate(scheduler.timesteps):
        output = randn(2, 4, 8, 8, seed=100 + i)
        if diffusion.alpha_bar(scheduler, t) == 0 and prediction_type == "epsilon":  # trailing + zero SNR, t = 999
            with pytest.raises(ValueError, match="zero-terminal-SNR"):
                diffusion.ddim_step(scheduler, sample, output, t)
            sample = randn(2, 4, 8, 8, seed=200 + i)
            continue
        ours = diffusion.ddim_step(scheduler, sample, output, t)
        theirs = scheduler.step(output, t, sample, eta=0.0).prev_sample
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        sample = theirs


def test_ddim_step_clips_x0_like_ddim_scheduler_and_refuses_thresholding():
    scheduler = ddim(clip_sample=True)
    scheduler.set_timesteps(4)
    sample, output, t = randn(2, 4, 8, 8, seed=18) * 3, randn(2, 4, 8, 8, seed=19), scheduler.timesteps[1]
    assert diffusion.predicted_x0(output, sample, diffusion.alpha_bar(scheduler, t), "epsilon").abs().max() > 1
    torch.testing.assert_close(
        diffusion.ddim_step(scheduler, sample, output, t),
        scheduler.step(output, t, sample).prev_sample,
        atol=1e-5,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="thresholding"):
        diffusion.ddim_step(ddim(thresholding=True), sample, output, 500, 250)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ddim_step_where_diffusers_leaves_the_schedule(spacing):
    """DDIMScheduler.step goes to t - 1000 // 7 = t - 142: with trailing / linspace spacing that is not
    the schedule's next timestep. ddim_step follows the schedule; given diffusers' target, it agrees."""
    scheduler = ddim(timestep_spacing=spacing)
    scheduler.set_timesteps(7)
    sample, output, t = randn(1, 4, 8, 8, seed=8), randn(1, 4, 8, 8, seed=9), scheduler.timesteps[1]
    theirs = scheduler.step(output, t, sample).prev_sample
    assert diffusion.previous_timestep(scheduler, t) != int(t) - 142
    assert not torch.allclose(diffusion.ddim_step(scheduler, sample, output, t), theirs, atol=1e-5)
    torch.testing.assert_close(
        diffusion.ddim_step(scheduler, sample, output, t, int(t) - 142), theirs, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_invert_then_step_returns_the_sample(prediction_type):
    scheduler = ddim(prediction_type=prediction_type, timestep_spacing="trailing", rescale_betas_zero_snr=True)
    x0 = randn(2, 4, 8, 8, seed=10).double()
    for low, high in [(-1, 99), (99, 499), (499, 999)]:
        x_low = diffusion.add_noise(scheduler, x0, randn(2, 4, 8, 8, seed=low + 2).double(), low) if low >= 0 else x0
        output = randn(2, 4, 8, 8, seed=high).double()  # any model output at (x_low, low)
        x_high = diffusion.ddim_invert_step(scheduler, x_low, output, low, high)
        # the same x0 and eps, expressed as this model's output at the higher timestep
        a_low, a_high = diffusion.alpha_bar(scheduler, low), diffusion.alpha_bar(scheduler, high)
        x0_hat = diffusion.predicted_x0(output, x_low, a_low, prediction_type)
        eps_hat = diffusion.predicted_epsilon(output, x_low, a_low, prediction_type)
        v_high = a_high.sqrt() * eps_hat - (1 - a_high).sqrt() * x0_hat
        output_high = {"epsilon": eps_hat, "v_prediction": v_high, "sample": x0_hat}[prediction_type]
        if prediction_type == "epsilon":
            assert output_high is output  # an epsilon model's output carries over unchanged
        if prediction_type == "epsilon" and high == 999:  # abar = 0 there: an eps model cannot step back
            continue
        back = diffusion.ddim_step(scheduler, x_high, output_high, high, low)
        torch.testing.assert_close(back, x_low, atol=1e-9, rtol=1e-9)
    with pytest.raises(ValueError, match="goes up in noise"):
        diffusion.ddim_invert_step(scheduler, x0, x0, 500, 400)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_invert_step_is_ddim_inverse_schedulers(prediction_type, spacing):
    """DDIMInverseScheduler.step(output, t, x) is told the target timestep t; it starts from
    t - 1000 // n (its initial_alpha_cumprod when that is negative)."""
    scheduler = ddim(prediction_type=prediction_type, timestep_spacing=spacing)
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(10)
    sample = randn(2, 4, 8, 8, seed=11)
    for i, t in enumerate(inverse.timesteps):
        source = max(int(t) - 100, -1)
        output = randn(2, 4, 8, 8, seed=300 + i)
        theirs = inverse.step(output, t, sample).prev_sample
        torch.testing.assert_close(
            diffusion.ddim_invert_step(scheduler, sample, output, source, t), theirs, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            diffusion.ddim_invert_step(inverse, sample, output, source, t), theirs, atol=1e-5, rtol=1e-5
        )
        sample = theirs


# -- guidance -------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7, 1.0])
def test_guided_prediction_is_diffusers(guidance_rescale):
    uncond, cond = randn(3, 4, 8, 8, seed=12), randn(3, 4, 8, 8, seed=13) * 0.5
    expected = uncond + 7.5 * (cond - uncond)
    if guidance_rescale:
        expected = rescale_noise_cfg(expected, cond, guidance_rescale=guidance_rescale)
    assert torch.equal(diffusion.guided_prediction(uncond, cond, 7.5, guidance_rescale), expected)


# -- VAE ------------------------------------------------------------------------------------------


def daam_decode_latents(pipe, latents, chunk=8):
    """lab.daam._decode_latents as of c82b8bc, frozen here: daam will switch to decode_latents."""
    vae, config = pipe.vae, pipe.vae.config
    latents_mean, latents_std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if latents_mean is not None and latents_std is not None:
        latents = latents * torch.tensor(latents_std).view(1, -1, 1, 1) / config.scaling_factor + torch.tensor(
            latents_mean
        ).view(1, -1, 1, 1)
    else:
        latents = latents / config.scaling_factor
        if getattr(config, "shift_factor", None) is not None:
            latents = latents + config.shift_factor
    images = []
    with torch.no_grad():
        for start in range(0, len(latents), chunk):
            decoded = vae.decode(latents[start : start + chunk].to(vae.device, vae.dtype), return_dict=False)[0]
            images.append(pipe.image_processor.postprocess(decoded, output_type="np"))
    return (np.concatenate(images) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def vae_variants():
    """A tiny SD pipeline per VAE scaling convention: plain, shift_factor (SD3-like), latents_mean/std (SDXL-like)."""
    pipes = {}
    for name, extra in [
        ("plain", {}),
        ("shift", {"shift_factor": 0.1}),
        ("mean_std", {"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [1.5, 0.5, 2.0, 1.0]}),
    ]:
        pipe = lab.testing.tiny_sd1_pipeline()
        pipe.vae.register_to_config(**extra)
        pipes[name] = pipe
    return pipes


@pytest.mark.parametrize("variant", ["plain", "shift", "mean_std"])
def test_decode_latents_is_daams_decode(vae_variants, variant):
    pipe = vae_variants[variant]
    latents = randn(3, 4, 8, 8, seed=14)
    expected = daam_decode_latents(pipe, latents)
    images = diffusion.decode_latents(pipe, latents)
    assert images.dtype == np.uint8 and images.shape == (3, 64, 64, 3)
    assert np.array_equal(images, expected)
    assert np.array_equal(diffusion.decode_latents(pipe, latents, chunk=2), daam_decode_latents(pipe, latents, chunk=2))
    pils = diffusion.decode_latents(pipe, latents, "pil")
    assert [np.asarray(p).tolist() for p in pils] == [image.tolist() for image in expected]
    tensors = diffusion.decode_latents(pipe, latents, "pt")
    assert tensors.shape == (3, 3, 64, 64) and 0 <= tensors.min() and tensors.max() <= 1
    with pytest.raises(ValueError, match="output_type"):
        diffusion.decode_latents(pipe, latents, "latent")


@pytest.mark.parametrize("variant", ["plain", "shift", "mean_std"])
def test_encode_image_is_the_vae_posterior_scaled(vae_variants, variant):
    pipe = vae_variants[variant]
    config = pipe.vae.config
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)) for _ in range(2)]
    pixels = pipe.image_processor.preprocess(images)  # diffusers' own uint8 -> [-1, 1]
    with torch.no_grad():
        z = pipe.vae.encode(pixels).latent_dist.mean
    if variant == "mean_std":
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (config.latents_mean, config.latents_std))
        expected = (z - mean) * config.scaling_factor / std
    else:
        expected = (z - (config.shift_factor or 0.0)) * config.scaling_factor
    for form in [images, np.stack([np.asarray(i) for i in images]), pixels]:
        torch.testing.assert_close(diffusion.encode_image(pipe, form), expected, atol=1e-6, rtol=1e-6)
    single = diffusion.encode_image(pipe, images[0])
    torch.testing.assert_close(single, expected[:1], atol=1e-6, rtol=1e-6)
    sampled = diffusion.encode_image(pipe, images, sample=True, generator=torch.Generator().manual_seed(0))
    again = diffusion.encode_image(pipe, images, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, again) and not torch.allclose(sampled, expected)
    decoded = diffusion.decode_latents(pipe, diffusion.encode_image(pipe, images))
    assert decoded.shape == (2, 64, 48, 3)


def test_force_upcast_runs_a_float16_vae_in_float32_and_puts_it_back():
    pipe = lab.testing.tiny_sd1_pipeline()
    assert pipe.vae.config.force_upcast
    pipe.vae.half()
    latents = randn(2, 4, 8, 8, seed=16).half()
    images = diffusion.decode_latents(pipe, latents)
    encoded = diffusion.encode_image(pipe, images)
    assert pipe.vae.dtype == torch.float16 and encoded.dtype == torch.float16
    pipe.vae.float()  # the same (float16-rounded) weights, in float32: what the upcast computed with
    assert np.array_equal(images, diffusion.decode_latents(pipe, latents.float()))
    assert torch.equal(encoded, diffusion.encode_image(pipe, images).half())


def test_encode_image_refuses_what_it_would_have_to_guess(sd1):
    rgb = np.zeros((64, 64, 3), dtype=np.uint8)
    for bad, message in [
        (Image.new("RGBA", (64, 64)), "convert"),
        (Image.new("L", (64, 64)), "convert"),
        (Image.new("RGB", (70, 64)), "multiple of 8"),
        (rgb.astype(np.float32), "uint8"),
        (torch.zeros(1, 3, 64, 64) + 2, r"x \* 2 - 1"),
        (torch.zeros(3, 64, 64), "B, 3, H, W"),
        ([Image.new("RGB", (64, 64)), Image.new("RGB", (64, 128))], "differ in size"),
        ("image.png", "str"),
    ]:
        with pytest.raises(ValueError, match=message):
            diffusion.encode_image(sd1, bad)


# -- text -----------------------------------------------------------------------------------------


def test_encode_prompt_is_the_pipelines(sd1, sdxl):
    prompts = ["a red circle", "a blue square"]
    ours = diffusion.encode_prompt(sd1, prompts, ["blurry", "dark"], num_images_per_prompt=2)
    cond, uncond = sd1.encode_prompt(prompts, "cpu", 2, True, negative_prompt=["blurry", "dark"])
    assert torch.equal(ours.cond, cond) and torch.equal(ours.uncond, uncond) and ours.pooled_cond is None
    assert ours.cond.shape[0] == 4
    assert diffusion.encode_prompt(sd1, prompts, guidance=False).uncond is None

    ours = diffusion.encode_prompt(sdxl, prompts)
    theirs = sdxl.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
    for mine, reference in zip([ours.cond, ours.uncond, ours.pooled_cond, ours.pooled_uncond], theirs):
        assert torch.equal(mine, reference)
    assert not ours.uncond.any()  # force_zeros_for_empty_prompt


def test_unet_inputs_time_ids_are_the_sdxl_pipelines(sdxl):
    embeddings = diffusion.encode_prompt(sdxl, ["a", "b"])
    inputs = embeddings.unet_inputs(sdxl, 64, 96)
    expected = sdxl._get_add_time_ids(
        (64, 96),
        (0, 0),
        (64, 96),
        dtype=embeddings.cond.dtype,
        text_encoder_projection_dim=sdxl.text_encoder_2.config.projection_dim,
    )
    assert torch.equal(inputs["added_cond_kwargs"]["time_ids"], expected.repeat(4, 1))
    assert torch.equal(inputs["encoder_hidden_states"], torch.cat([embeddings.uncond, embeddings.cond]))
    assert torch.equal(
        inputs["added_cond_kwargs"]["text_embeds"], torch.cat([embeddings.pooled_uncond, embeddings.pooled_cond])
    )
    unguided = diffusion.encode_prompt(sdxl, "a", guidance=False)
    with pytest.raises(ValueError, match="no unconditional half"):
        unguided.unet_inputs(sdxl, 64, 64)
    assert unguided.unet_inputs(sdxl, 64, 64, guidance=False)["added_cond_kwargs"]["time_ids"].shape == (1, 6)


def test_model_prediction_checks_rows_against_guidance(sd1):
    embeddings = diffusion.encode_prompt(sd1, "a red circle")
    sample = randn(2, 4, 8, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="2 rows for 1 latents"):
        diffusion.model_prediction(sd1, sample[:1], 500, embeddings.unet_inputs(sd1, 64, 64), guidance_scale=1.0)
    with torch.no_grad(), pytest.raises(ValueError, match="2 rows for 2 latents"):
        diffusion.model_prediction(sd1, sample, 500, embeddings.unet_inputs(sd1, 64, 64), guidance_scale=5.0)
    with torch.no_grad(), pytest.raises(ValueError, match="1 rows for 1 latents"):
        diffusion.model_prediction(sd1, sample[:1], 500, embeddings.unet_inputs(sd1, 64, 64, guidance=False), 5.0)
    with torch.no_grad():
        zero = diffusion.model_prediction(sd1, sample[:1], 500, embeddings, guidance_scale=0.0)
        uncond = sd1.unet(sample[:1], 500, encoder_hidden_states=embeddings.uncond).sample
    torch.testing.assert_close(zero, uncond, atol=1e-6, rtol=1e-5)


# -- end to end: a loop of lab.diffusion functions is the pipeline --------------------------------


def with_scheduler(pipe, scheduler):
    """A new pipeline object: the same components but this scheduler (the session fixtures stay as they are)."""
    components = {**pipe.components, "scheduler": scheduler}
    if "text_encoder_2" in components:
        return type(pipe)(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)
    return type(pipe)(**components, requires_safety_checker=False)


def with_ddim(pipe):
    return with_scheduler(pipe, DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False))


@pytest.fixture(scope="module")
def embedded():
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hand_written_loop(pipe, prompt, latents, steps, guidance_scale, guidance_rescale=0.0, step=None):
    embeddings = diffusion.encode_prompt(pipe, prompt)
    pipe.scheduler.set_timesteps(steps)
    latents = latents * pipe.scheduler.init_noise_sigma
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            output = diffusion.model_prediction(pipe, latents, t, embeddings, guidance_scale, guidance_rescale)
            if step is None:
                latents = diffusion.ddim_step(pipe.scheduler, latents, output, t)
            else:
                latents = step(output, t, latents).prev_sample
    return latents


@pytest.mark.parametrize(
    "name,guidance_rescale",
    [("sd1", 0.0), ("sd2", 0.0), ("sdxl", 0.0), ("sd2", 0.7), ("embedded", 0.0), ("embedded", 0.7)],
)
def test_hand_written_loop_reproduces_the_pipeline(request, name, guidance_rescale):
    pipe = request.getfixturevalue(name)
    if name != "embedded":
        pipe = with_ddim(pipe)
    prompt = ["a red circle left of a blue square", "a green triangle"]
    size = 64 // pipe.vae_scale_factor
    start = randn(2, 4, size, size, seed=15)
    final = {}

    def keep_latents(pipe, step, timestep, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs

    images = pipe(
        prompt,
        num_inference_steps=4,
        guidance_scale=5.0,
        guidance_rescale=guidance_rescale,
        latents=start.clone(),
        height=64,
        width=64,
        output_type="np",
        callback_on_step_end=keep_latents,
    ).images
    ours = hand_written_loop(pipe, prompt, start.clone(), 4, 5.0, guidance_rescale)
    torch.testing.assert_close(ours, final["latents"], atol=1e-5, rtol=1e-5)
    assert np.array_equal(diffusion.decode_latents(pipe, final["latents"]), (images * 255).round().astype(np.uint8))
    if name == "embedded":
        config = pipe.scheduler.config
        assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
        assert diffusion.alpha_bar(pipe.scheduler, pipe.scheduler.timesteps[0]) == 0  # the zero-SNR first step


def test_model_prediction_drives_the_pipelines_own_euler_scheduler(sdxl):
    """SDXL's Euler scheduler scales the UNet input (scale_model_input) and starts at init_noise_sigma."""
    pipe = with_scheduler(sdxl, type(sdxl.scheduler).from_config(sdxl.scheduler.config))  # its own step counter
    start = randn(1, 4, 8, 8, seed=17)
    theirs = pipe(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=5.0,
        latents=start.clone(),
        height=64,
        width=64,
        output_type="latent",
    ).images
    ours = hand_written_loop(pipe, "a red circle", start.clone(), 3, 5.0, step=pipe.scheduler.step)
    assert pipe.scheduler.init_noise_sigma > 1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_input_alpha_bar_follows_the_scheduler_kind(sd1, sdxl):
    """DDIM feeds x_t at a training timestep; Euler, once stepping, x / sqrt(sigma^2 + 1)."""
    ddim = sd1.scheduler
    ddim.set_timesteps(4)
    t = ddim.timesteps[1]
    assert diffusion.input_alpha_bar(ddim, 1, t) == diffusion.alpha_bar(ddim, int(t))
    euler = EulerDiscreteScheduler.from_config(sdxl.scheduler.config)
    euler.set_timesteps(4)
    euler.scale_model_input(torch.zeros(1, 4, 8, 8), euler.timesteps[0])  # starts stepping: step_index is set
    sigma = float(euler.sigmas[2])
    assert float(diffusion.input_alpha_bar(euler, 2, euler.timesteps[2])) == pytest.approx(1 / (1 + sigma**2))
