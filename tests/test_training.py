"""The training command (`sdlab tinyworld train`) on a toy budget: every stage runs, the export is a
plain Stable Diffusion folder, re-running resumes instead of retraining, and checkpoints restore."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from lab.tinyworld import train
from lab.tinyworld.world import mirror_scene

TOY = [
    "--n-images",
    "48",
    "--text-steps",
    "3",
    "--text-batch",
    "8",
    "--vae-steps",
    "3",
    "--vae-batch",
    "8",
    "--decoder-steps",
    "2",
    "--unet-steps",
    "3",
    "--unet-batch",
    "8",
    "--eval-seeds",
    "0",
    "--threads",
    "1",
]


def test_training_runs_every_stage_and_exports_a_pipeline(tmp_path):
    out = tmp_path / "run"
    train.main(["--out", str(out), *TOY])
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    report = json.loads((out / "training_report.json").read_text())
    assert report["unet_steps_done"] == 3 and report["latent_scaling_factor"] > 0
    assert (out / "training_losses.png").stat().st_size > 0
    assert not list((out / "pipeline").rglob("*.bin")) and not list((out / "pipeline").rglob("*.pt*"))
    # The UNet trained on the pre-trained text encoder, frozen: the exported one is that one, exactly.
    pretrained = load_file(str(out / "text_encoder_pretrained.safetensors"))
    exported = pipe.text_encoder.state_dict()
    assert all(torch.equal(pretrained[k], exported[k]) for k in pretrained)
    assert report["text_encoder_pretraining"]["steps"] == 3

    # The same command again finds every stage done: nothing retrains, the export is the same.
    unet_file = out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    before = load_file(str(unet_file))
    train.main(["--out", str(out), *TOY])
    after = load_file(str(unet_file))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _toy_unet_run(out, scenes, masks, latents, **kwargs):
    """Six UNet steps of batch 4, the text encoder trained jointly (both EMAs), grounding and object weights on."""
    options = dict(steps=6, batch=4, lr=1e-3, seed=0, device="cpu", layout_weight=1.0, masks=masks)
    options |= dict(grounding_weight=0.1, object_weight=2.0, checkpoint_every=3)
    train.train_unet(out, latents, 1.0, scenes, **(options | kwargs))
    return json.loads((out / "unet_final" / "state.json").read_text()), {
        name: load_file(str(out / "unet_final" / f"{name}_ema.safetensors")) for name in ("unet", "text_encoder")
    }


def test_a_resumed_unet_stage_continues_bit_for_bit_as_an_uninterrupted_run(tmp_path, monkeypatch):
    _, scenes, masks = train.make_data(tmp_path, 16, workers=1)
    latents = torch.randn(16, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    whole, whole_weights = _toy_unet_run(tmp_path / "whole", scenes, masks, latents)

    # The same run, stopped during step 4 (after its checkpoint at step 3), then the same call again.
    calls, denoising_loss = [], train.denoising_loss

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return denoising_loss(*args, **kwargs)

    monkeypatch.setattr(train, "denoising_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _toy_unet_run(tmp_path / "resumed", scenes, masks, latents)
    monkeypatch.undo()
    step, unet, text_encoder = train.unet_checkpoint(tmp_path / "resumed")  # what the benchmarks read mid-run
    assert step == 3
    _, raw_unet, _ = train.unet_checkpoint(tmp_path / "resumed", ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(unet.parameters(), raw_unet.parameters()))
    assert {f.name for f in (tmp_path / "resumed" / "unet_ckpt").iterdir()} >= {
        "model.safetensors",  # the UNet
        "model_1.safetensors",  # the text encoder, trained jointly here
        "optimizer.bin",
        "scheduler.bin",
        "custom_checkpoint_0.pkl",  # step, losses, seconds
        "custom_checkpoint_1.pkl",  # the UNet's EMAModel
        "custom_checkpoint_2.pkl",  # the text encoder's
    }
    resumed, resumed_weights = _toy_unet_run(tmp_path / "resumed", scenes, masks, latents)

    assert resumed["losses"] == whole["losses"] and len(whole["losses"]) == 6
    assert resumed["grounding_losses"] == whole["grounding_losses"]
    for name, tensors in whole_weights.items():
        assert tensors.keys() == resumed_weights[name].keys()
        assert all(torch.equal(tensors[k], resumed_weights[name][k]) for k in tensors), name


def test_a_resumed_vae_stage_continues_bit_for_bit(tmp_path, monkeypatch):
    images, _, masks = train.make_data(tmp_path, 16, workers=1)
    options = dict(steps=4, batch=4, lr=1e-3, seed=0, device="cpu", masks=masks, object_weight=4.0)
    (tmp_path / "whole").mkdir()
    torch.manual_seed(0)  # the VAE's initialisation draws from the global generator (main seeds it earlier)
    whole = train.train_vae(tmp_path / "whole", images, **options, checkpoint_every=2).state_dict()
    calls, reconstruction_loss = [], train.reconstruction_loss

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return reconstruction_loss(*args, **kwargs)

    monkeypatch.setattr(train, "reconstruction_loss", interrupted)
    (tmp_path / "resumed").mkdir()
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train.train_vae(tmp_path / "resumed", images, **options, checkpoint_every=2)
    monkeypatch.undo()
    torch.manual_seed(123)  # another process: the VAE's fresh initialisation is replaced by the checkpoint
    resumed = train.train_vae(tmp_path / "resumed", images, **options, checkpoint_every=2).state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert json.loads((tmp_path / "resumed" / "vae_losses.json").read_text()) == json.loads(
        (tmp_path / "whole" / "vae_losses.json").read_text()
    )


def test_the_time_budget_counts_the_minutes_spent_before_a_resume(tmp_path, monkeypatch):
    import time

    _, scenes, _ = train.make_data(tmp_path, 8, workers=1)
    latents = torch.randn(8, 4, 16, 16)

    class Clock:  # time.time as train.py sees it: 90 s pass just before the checkpoint at step 5
        offset = 0.0

        def time(self):
            return time.time() + self.offset

    clock, save_checkpoint = Clock(), train._save_checkpoint

    def checkpoint_then_stop(accelerator, folder):
        clock.offset = 90.0
        save_checkpoint(accelerator, folder)
        raise KeyboardInterrupt  # an earlier run stopped at step 5, after 90 s

    monkeypatch.setattr(train, "time", clock)
    monkeypatch.setattr(train, "_save_checkpoint", checkpoint_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.train_unet(tmp_path, latents, 1.0, scenes, steps=10, batch=2, lr=1e-3, seed=0, device="cpu",
                         checkpoint_every=5)  # fmt: skip
    monkeypatch.undo()

    # 90 s were spent before; the budget is 60 s: the resumed run stops at once, at step 5.
    train.train_unet(tmp_path, latents, 1.0, scenes, steps=10, batch=2, lr=1e-3, seed=0, device="cpu", max_minutes=1.0)
    state = json.loads((tmp_path / "unet_final" / "state.json").read_text())
    assert state["step"] == 5 and state["unet_seconds"] >= 90.0


def test_no_checkpoint_means_a_fresh_start_and_an_old_format_one_a_clear_stop(tmp_path):
    accelerator = train._accelerator("cpu")
    assert train._load_checkpoint(accelerator, tmp_path / "unet_ckpt") is False
    (tmp_path / "unet_ckpt").mkdir()
    (tmp_path / "unet_ckpt" / "state.json").write_text(json.dumps({"step": 250, "losses": []}))  # before accelerate
    with pytest.raises(SystemExit, match="cannot resume"):
        train._load_checkpoint(accelerator, tmp_path / "unet_ckpt")


def _learning_rates(steps: int, warmup: int, n: int, budget_s=None, spent=lambda step: 0.0) -> list[float]:
    """The learning rate lr_schedule gives each of the first n optimizer steps (peak 1), stepped as in
    training; `spent(step)` is the clock's reading when step's rate is set."""
    now = {"s": spent(0)}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = train.lr_schedule(opt, steps, warmup, budget_s, clock=lambda: now["s"])
    rates = []
    for step in range(n):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        now["s"] = spent(step + 1)
        schedule.step()
    return rates


def test_learning_rate_warms_up_then_anneals_to_zero_at_the_steps_or_the_time_budget():
    rates = _learning_rates(10_000, 200, 10_001)
    assert rates[0] == pytest.approx(1 / 200) and rates[99] == pytest.approx(0.5, abs=0.01)
    assert rates[5_000] == pytest.approx(0.5)  # no budget: a cosine over the planned steps
    assert rates[10_000] == pytest.approx(0.0, abs=1e-12)
    # With a budget, whichever is further along sets the cosine: a run cut by time still ends annealed.
    budget = _learning_rates(100_000, 200, 1_001, budget_s=3_600, spent=lambda step: 1.8 * step)
    assert budget[1_000] == pytest.approx(0.5)  # 1,800 s of 3,600
    late = _learning_rates(100_000, 200, 1_001, budget_s=3_600, spent=lambda step: 9 * step)
    assert late[400] == pytest.approx(0.0, abs=1e-12) and late[1_000] == pytest.approx(0.0, abs=1e-12)
    ahead = _learning_rates(10_000, 200, 5_001, budget_s=3_600, spent=lambda step: 10.0)
    assert ahead[5_000] == pytest.approx(0.5)  # steps ahead of the clock


def _old_learning_rate(peak, step, steps, spent_s=0.0, budget_s=None, warmup=200):
    """The trainer's learning_rate before it moved to a LambdaLR (git show bfc1dab:lab/tinyworld/train.py)."""
    progress = step / steps
    if budget_s:
        progress = max(progress, spent_s / budget_s)
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def test_the_lr_schedule_is_the_old_formula_step_by_step():
    # The UNet (warm-up 200) and text (50) stages, with and without a time budget that runs out first.
    for steps, warmup, budget_s, spent in (
        (2_800, 200, None, lambda step: 0.0),
        (800, 50, None, lambda step: 0.0),
        (30_000, 200, 5_400, lambda step: 0.53 * step),  # v11: 10,199 steps fit in 90 minutes
    ):
        n = min(steps, 12_000)
        new = [6e-4 * rate for rate in _learning_rates(steps, warmup, n, budget_s, spent)]
        old = [_old_learning_rate(6e-4, step, steps, spent(step), budget_s, warmup) for step in range(n)]
        assert new == pytest.approx(old, rel=1e-12, abs=1e-20)
    # The VAE (warm-up 100) and decoder (50) stages wrote their formula inline.
    for steps, warmup in ((1_400, 100), (3_000, 50)):
        old = [min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)) for step in range(steps)]
        assert _learning_rates(steps, warmup, steps) == pytest.approx(old, rel=1e-12, abs=1e-20)


class _OldEMA:
    """The trainer's EMA before it moved to diffusers' EMAModel (git show bfc1dab:lab/tinyworld/train.py)."""

    def __init__(self, module, decay):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module, step):
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)


def test_emamodel_with_the_trainers_options_is_the_old_ema_rule():
    from diffusers.training_utils import EMAModel

    ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], **train.EMA_RULE)
    # EMAModel.step counts its updates from 1; the old rule took the loop's step from 0.
    for step in range(20_000):
        assert ema.get_decay(step + 1) == pytest.approx(min(0.999, (1 + step) / (10 + step)), rel=1e-12)
    assert ema.get_decay(1) == pytest.approx(0.1)  # the first update keeps a tenth of the starting weights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    old, new = _OldEMA(model, train.EMA_DECAY), EMAModel(model.parameters(), **train.EMA_RULE)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for step in range(300):
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
        old.update(model, step)
        new.step(model.parameters())
    averaged = copy.deepcopy(model)
    new.copy_to(averaged.parameters())
    for name, value in averaged.state_dict().items():
        assert torch.allclose(value, old.shadow[name], rtol=1e-5, atol=1e-7), name
        assert not torch.allclose(value, model.state_dict()[name])  # it is an average, not the last weights


def test_compute_snr_is_the_snr_the_loss_weight_was_computed_from():
    from diffusers.training_utils import compute_snr

    for scheduler in (train.tw_model.make_scheduler(), train.tw_model.make_scheduler("v_prediction", True)):
        t = torch.arange(1000)
        by_hand = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
        assert torch.allclose(compute_snr(scheduler, t), by_hand, rtol=1e-5, atol=0)
    assert compute_snr(scheduler, torch.tensor([999])).item() == 0  # zero terminal SNR: pure noise


def test_loss_weight_is_min_snr_with_a_floor_at_the_noisiest_steps():
    scheduler = train.tw_model.make_scheduler()
    snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    plain = train.loss_weight(snr, 5.0, 0.0)
    floored = train.loss_weight(snr, 5.0, 0.2)
    # In clean-latent terms (weight x SNR): min(SNR, 5) without a floor, max(that, 0.2) with one.
    assert torch.allclose(plain * snr, snr.clamp(max=5.0))
    assert torch.allclose(floored * snr, snr.clamp(min=0.2, max=5.0))
    assert (plain * snr)[-1] < 0.01  # Min-SNR alone all but ignores t = 999
    noisy = snr < 0.2
    assert noisy.any() and torch.all(floored[noisy] > plain[noisy])
    assert torch.equal(floored[~noisy], plain[~noisy])  # the rest of the schedule is untouched


def test_v_prediction_weight_stays_finite_on_a_zero_terminal_snr_schedule():
    scheduler = train.tw_model.make_scheduler("v_prediction", zero_terminal_snr=True)
    snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    assert snr[-1] == 0  # the last step is pure noise
    weight = train.loss_weight(snr, 5.0, 0.2, "v_prediction")
    assert torch.isfinite(weight).all()
    assert torch.allclose(weight * (snr + 1), snr.clamp(min=0.2, max=5.0))
    with pytest.raises(ValueError, match="needs prediction_type='v_prediction'"):
        train.tw_model.make_scheduler("epsilon", zero_terminal_snr=True)


def test_training_defaults_to_v_prediction_on_a_zero_terminal_snr_schedule(tmp_path):
    out = tmp_path / "run"
    train.main(["--out", str(out), *TOY])  # the defaults: v-prediction on a zero-terminal-SNR schedule
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "pipeline"))
    config = pipe.scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    assert config.timestep_spacing == "trailing"
    pipe.set_progress_bar_config(disable=True)
    assert np.isfinite(pipe("a red circle", num_inference_steps=2, output_type="np").images).all()
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path / "bad"), *TOY, "--prediction-type", "epsilon", "--zero-terminal-snr"])
    train.main(["--out", str(tmp_path / "eps"), *TOY, "--prediction-type", "epsilon"])  # SD 1.x's schedule
    config = StableDiffusionPipeline.from_pretrained(str(tmp_path / "eps" / "pipeline")).scheduler.config
    assert config.prediction_type == "epsilon" and not config.rescale_betas_zero_snr


def test_mirror_pairs_add_one_twin_per_two_object_scene_and_refresh_the_cache(tmp_path):
    plain_images, plain, _ = train.make_data(tmp_path, 40, workers=1)
    images, scenes, masks = train.make_data(tmp_path, 40, workers=1, mirror_pairs=True)  # a new config renders again
    pairs = [s for s in plain if s.relation is not None]
    assert len(scenes) == len(images) == 40 + len(pairs) and len(pairs) > 5
    assert np.array_equal(images[:40], plain_images)
    for scene, twin in zip(pairs, scenes[40:]):
        assert twin.seed == scene.seed and twin == mirror_scene(scene)
    again_images, again, again_masks = train.make_data(tmp_path, 40, workers=1, mirror_pairs=True)  # cached
    assert again == scenes and np.array_equal(again_images, images) and np.array_equal(again_masks, masks)


def test_make_data_keeps_each_objects_true_mask_at_the_latent_resolution(tmp_path):
    from lab.tinyworld.world import render

    images, scenes, masks = train.make_data(tmp_path, 24, workers=1, mirror_pairs=True)
    assert masks.shape == (len(scenes), 3, 16, 16) and masks.dtype == np.uint8
    for scene, image, mask in zip(scenes, images, masks):
        rendered = render(scene)
        assert np.array_equal(rendered.image, image)
        for k in range(3):
            if k >= len(scene.objects):
                assert not mask[k].any()  # no such object: an empty mask
                continue
            coverage = rendered.masks[k].reshape(16, 4, 16, 4).mean(axis=(1, 3))
            assert np.abs(mask[k] / 255 - coverage).max() <= 0.5 / 255 + 1e-6
            # the mask lies where the object is: its centre cell is covered
            assert mask[k][int(scene.objects[k].cy // 4), int(scene.objects[k].cx // 4)] > 0


def test_object_weights_raise_the_reconstruction_loss_on_object_pixels_only(tmp_path):
    images, scenes, masks = train.make_data(tmp_path, 8, workers=1)
    weights = train.object_weights(masks, "cpu", object_weight=4.0)
    assert weights.shape == (8, 1, 64, 64)
    cover = masks.max(axis=1).repeat(4, axis=1).repeat(4, axis=2) / 255  # each 16x16 cell is a 4x4 pixel block
    assert torch.allclose(weights[:, 0], torch.from_numpy(1 + 4 * cover).float())
    assert weights.min() == 1 and weights.max() == 5  # background cells 1, fully covered object cells 5

    x = train._to_tensor(images, "cpu")
    on_objects = torch.from_numpy(cover > 0.99)[:, None].expand_as(x)
    off_objects = torch.from_numpy(cover == 0)[:, None].expand_as(x)
    n = int(min(on_objects.sum(), off_objects.sum()))  # the same noise on as many pixels in each place
    noise = 0.3 * torch.randn(n, generator=torch.Generator().manual_seed(0))
    object_error, background_error = x.clone().flatten(), x.clone().flatten()
    object_error[on_objects.flatten().nonzero()[:n, 0]] += noise
    background_error[off_objects.flatten().nonzero()[:n, 0]] += noise
    object_error, background_error = object_error.view_as(x), background_error.view_as(x)
    ones = torch.ones_like(weights)
    # Unweighted, the two errors cost about the same (only the image-gradient term differs by where the noise lies);
    # weighted, the error on the objects costs several times more.
    plain_ratio = train.reconstruction_loss(object_error, x, ones) / train.reconstruction_loss(
        background_error, x, ones
    )
    weighted_ratio = train.reconstruction_loss(object_error, x, weights) / train.reconstruction_loss(
        background_error, x, weights
    )
    assert 0.8 < plain_ratio < 1.25
    assert weighted_ratio > 3 * plain_ratio
    # Unit weights give back the plain loss: L1 + MSE + half the L1 of the image gradients.
    (gy, gx), (ty, tx) = train._image_gradients(object_error), train._image_gradients(x)
    plain = (
        torch.nn.functional.l1_loss(object_error, x)
        + torch.nn.functional.mse_loss(object_error, x)
        + 0.5 * (torch.nn.functional.l1_loss(gy, ty) + torch.nn.functional.l1_loss(gx, tx))
    )
    assert torch.allclose(train.reconstruction_loss(object_error, x, ones), plain)


def test_denoising_loss_weighs_object_cells_up_without_changing_the_loss_scale(tmp_path):
    _, _, masks = train.make_data(tmp_path, 8, workers=1)
    cells = train.object_weights(masks, "cpu", object_weight=4.0, scale_factor=1)
    assert cells.shape == (8, 1, 16, 16)
    assert torch.allclose(cells[:, 0], torch.from_numpy(1 + 4 * (masks.max(axis=1) / 255)).float())
    target = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    timestep_weight = torch.rand(8, generator=torch.Generator().manual_seed(1)) + 0.5
    # No cell weights: the timestep-weighted MSE of before, exactly.
    pred = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(2))
    plain = (timestep_weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
    assert torch.allclose(train.denoising_loss(pred, target, timestep_weight), plain)
    # The same error on every cell costs the same weighted or not: the weights move the loss, not its scale.
    uniform = target + 0.1
    assert torch.allclose(
        train.denoising_loss(uniform, target, timestep_weight, cells),
        train.denoising_loss(uniform, target, timestep_weight),
    )
    # An error on fully covered object cells costs 5x the same error on as many background cells.
    on, off = masks.max(axis=1) == 255, masks.max(axis=1) == 0
    for row in range(8):
        keep = min(on[row].sum(), off[row].sum())
        on[row][tuple(np.argwhere(on[row])[keep:].T)] = False
        off[row][tuple(np.argwhere(off[row])[keep:].T)] = False
    assert on.sum() > 0
    on_objects = target + 0.5 * torch.from_numpy(on)[:, None].float()
    on_background = target + 0.5 * torch.from_numpy(off)[:, None].float()
    ratio = train.denoising_loss(on_objects, target, timestep_weight, cells) / train.denoising_loss(
        on_background, target, timestep_weight, cells
    )
    assert torch.isclose(ratio, torch.tensor(5.0), rtol=1e-4)


def test_object_nouns_finds_each_objects_shape_word_in_any_caption():
    from lab.tinyworld import model as tw_model
    from lab.tinyworld.world import caption, sample_scene

    tokenizer = tw_model.make_tokenizer()
    shape_ids = train.shape_token_ids(tokenizer)
    assert sorted(shape_ids.values()) == sorted(train.SHAPES)
    found = 0
    for seed in range(300):
        scene = sample_scene(seed)
        rng = np.random.default_rng(seed)
        for _ in range(3):  # several templates and attribute orders per scene
            ids = tokenizer(caption(scene, rng)).input_ids
            positions = train.object_nouns(ids, scene, shape_ids)
            assert positions is not None and len(positions) == len(scene.objects)
            assert positions == sorted(positions)
            for position, obj in zip(positions, scene.objects):
                assert tokenizer.decode([ids[position]]).strip() == obj.shape
            found += len(positions)
    assert found > 900
    assert train.object_nouns(tokenizer("").input_ids, sample_scene(0), shape_ids) is None  # CFG-dropped caption


def test_grounding_loss_is_zero_inside_the_mask_and_one_outside():
    masks = torch.zeros(2, 3, 16, 16)
    masks[0, 0, :8, :8] = 1  # object 0 of row 0: top-left quarter
    masks[1, 1, 8:, 8:] = 1  # object 1 of row 1: bottom-right quarter
    inside = torch.zeros(2, 256, 77)
    inside[0, :, 5] = masks[0, 0].flatten()  # token 5 of row 0 attends only inside its object
    inside[1, :, 9] = masks[1, 1].flatten()
    rows, tokens, objects = torch.tensor([0, 1]), torch.tensor([5, 9]), torch.tensor([0, 1])
    coarse = inside.view(2, 16, 16, 77).permute(0, 3, 1, 2)
    coarse = torch.nn.functional.avg_pool2d(coarse, 2).permute(0, 2, 3, 1).reshape(2, 64, 77)
    probs = {"a16": inside, "a8": coarse}
    assert train.grounding_loss(probs, rows, tokens, objects, masks).item() == pytest.approx(0.0, abs=1e-6)
    outside = {name: p.roll(shifts=p.shape[1] // 2, dims=1) for name, p in probs.items()}  # the other half
    assert train.grounding_loss(outside, rows, tokens, objects, masks).item() == pytest.approx(1.0, abs=1e-6)
    uniform = {"a16": torch.ones(2, 256, 77, requires_grad=True)}
    loss = train.grounding_loss(uniform, rows, tokens, objects, masks)
    assert loss.item() == pytest.approx(0.75**2, abs=1e-6)  # a quarter of uniform attention is inside
    loss.backward()
    assert uniform["a16"].grad[0, :, 5].abs().sum() > 0 and uniform["a16"].grad[0, :, 6].abs().sum() == 0


def test_training_with_the_grounding_loss_pulls_attention_into_the_masks_and_unhooks(tmp_path):
    """A few steps on the grounding loss alone raise the attention mass inside the true masks (the
    gradient reaches the model through lab's hooks), and the UNet ends with its own processors."""
    from lab import hooks
    from lab.tinyworld import model as tw_model

    images, scenes, masks = train.make_data(tmp_path, 16, workers=1)
    torch.manual_seed(0)
    latents = torch.randn(len(scenes), 4, 16, 16)
    out = tmp_path / "run"
    out.mkdir()
    processors_before = {name: type(p) for name, p in tw_model.make_unet().attn_processors.items()}

    def grounding_of(unet, text_encoder):
        tokenizer, shape_ids = tw_model.make_tokenizer(), train.shape_token_ids(tw_model.make_tokenizer())
        texts = [train.caption(s, 0) for s in scenes]
        ids = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        nouns = [
            (r, t, o)
            for r, s in enumerate(scenes)
            for o, t in enumerate(train.object_nouns(ids[r].tolist(), s, shape_ids))
        ]
        rows, tokens, objects = (torch.tensor(c) for c in zip(*nouns))
        with torch.no_grad(), hooks.trace(unet, guidance="none") as tr:
            attention = tr.capture(list(train.GROUNDING_SITES), "probs", reduce=hooks.Mean(over=("steps", "heads")))
            unet(latents, torch.full((len(scenes),), 500), encoder_hidden_states=text_encoder(ids)[0])
            return train.grounding_loss(
                attention.result(), rows, tokens, objects, torch.from_numpy(masks).float() / 255
            )

    unet, text_encoder = train.train_unet(
        out, latents, 1.0, scenes, steps=1, batch=8, lr=0.0, seed=0, device="cpu", masks=masks, grounding_weight=1.0
    )
    start = grounding_of(unet, text_encoder)
    trained = tmp_path / "trained"
    trained.mkdir()
    unet, text_encoder = train.train_unet(
        trained,
        latents,
        1.0,
        scenes,
        steps=30,
        batch=8,
        lr=3e-3,
        seed=0,
        device="cpu",
        cfg_dropout=0.0,
        masks=masks,
        grounding_weight=100.0,
    )
    state = json.loads((trained / "unet_final" / "state.json").read_text())
    assert len(state["grounding_losses"]) == 30 and state["grounding_weight"] == 100.0
    assert {name: type(p) for name, p in unet.attn_processors.items()} == processors_before
    assert not hooks.active_hooks(unet)
    assert grounding_of(unet, text_encoder) < start - 0.05
    with pytest.raises(ValueError, match="masks"):
        train.train_unet(
            tmp_path / "no_masks",
            latents,
            1.0,
            scenes,
            steps=1,
            batch=8,
            lr=0.0,
            seed=0,
            device="cpu",
            grounding_weight=1.0,
        )


def test_reinit_words_gives_only_those_words_fresh_distinct_embeddings():
    from lab.tinyworld import model as tw_model

    text_encoder, tokenizer = tw_model.make_text_encoder(), tw_model.make_tokenizer()
    table = text_encoder.get_input_embeddings().weight
    table.data[:] = 0.02 * torch.randn_like(table)
    ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("left", "right")]
    table.data[ids[1]] = table.data[ids[0]]  # two words that drifted together
    before = table.detach().clone()
    train.reinit_word_embeddings(text_encoder, tokenizer, ("left", "right"), seed=0)
    changed = (table != before).any(dim=1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(ids)
    assert torch.cosine_similarity(table[ids[0]], table[ids[1]], dim=0) < 0.5
    with pytest.raises(ValueError, match="single-token"):
        train.reinit_word_embeddings(text_encoder, tokenizer, ("to the left",), seed=0)


def _targets(text: str, scene) -> tuple:
    from lab.tinyworld import model as tw_model

    tokenizer = tw_model.make_tokenizer()
    ids = tokenizer(text, padding="max_length", max_length=77).input_ids
    targets = train.caption_targets(
        ids, scene, train.shape_token_ids(tokenizer), train.attribute_tokens(tokenizer), tokenizer.eos_token_id
    )
    if targets is None:
        return None
    nouns, eos, scene_targets = targets

    def names(values: dict, heads: dict) -> dict:
        return {h: None if v == train.IGNORE else heads[h][v] for h, v in values.items()}

    return (
        [names(t, train.NOUN_HEADS) for _, t in nouns],
        tokenizer.decode([ids[eos]]),
        names(scene_targets, train.SCENE_HEADS),
    )


def test_caption_targets_are_what_each_token_can_read_from_the_caption():
    from lab.tinyworld.world import Scene, WorldObject

    circle = WorldObject("circle", "red", 15.0, "plain", 16.0, 32.0)
    square = WorldObject("square", "blue", 26.0, "striped", 48.0, 32.0)
    scene = Scene([circle, square], "grass", relation="left of")
    nouns, eos, whole = _targets("a small red circle to the left of a striped blue square on the grass", scene)
    assert nouns[0] == {"shape": "circle", "color": "red", "texture": "unsaid", "size": "small", "side": None}
    # The second noun has seen the relation, so it knows its side; the first (causal attention) cannot.
    assert nouns[1] == {"shape": "square", "color": "blue", "texture": "striped", "size": "unsaid", "side": "right of"}
    assert eos == "<|endoftext|>"
    assert whole["count"] == "2" and whole["relation"] == "left of" and whole["background"] == "grass"
    assert whole["shape 1"] == "square" and whole["texture 1"] == "striped" and whole["shape 2"] is None
    # Unsaid is not guessed: no relation in "and", no background, no colour.
    nouns, _, whole = _targets("a plain circle and a square", scene)
    assert nouns[0]["texture"] == "plain" and nouns[0]["color"] == "unsaid" and nouns[1]["side"] == "unsaid"
    assert whole["relation"] == "unsaid" and whole["background"] == "unsaid"
    # "plain" after the last noun is the background, not a texture.
    _, _, whole = _targets("a red circle under a blue square on a plain background", scene)
    assert whole["relation"] == "below" and whole["background"] == "plain"
    assert _targets("", scene) is None  # a caption dropped for classifier-free guidance teaches nothing here


def test_pretraining_teaches_the_text_encoder_to_read_the_scene_from_captions(tmp_path):
    """150 small batches already read most attributes right (a fresh encoder reads a quarter: the
    commonest class of each head), and tell shapes apart in the noun tokens the UNet will attend to
    better than a fresh encoder does."""
    from lab.tinyworld import model as tw_model
    from lab.tinyworld.world import sample_scene

    scenes = [sample_scene(seed) for seed in range(400)]
    path, summary = train.pretrain_text_encoder(tmp_path, scenes, steps=150, batch=32, lr=2e-3, seed=0, device="cpu")
    history = json.loads((tmp_path / "text_encoder_losses.json").read_text())
    assert np.mean(history["accuracy"][:5]) < 0.35 and summary["accuracy"] > 0.6
    assert np.mean(history["losses"][-10:]) < 0.5 * np.mean(history["losses"][:5])

    def shape_similarity(text_encoder) -> float:  # mean cosine between the noun tokens of "a red <shape>"
        tokenizer = tw_model.make_tokenizer()
        ids = tokenizer(
            [f"a red {s}" for s in train.SHAPES], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            nouns = torch.nn.functional.normalize(text_encoder(ids)[0][:, 3], dim=-1)
        return float((nouns @ nouns.T)[~torch.eye(len(nouns), dtype=torch.bool)].mean())

    torch.manual_seed(0)
    fresh, trained = tw_model.make_text_encoder(), tw_model.make_text_encoder()
    trained.load_state_dict(load_file(str(path)))
    assert shape_similarity(trained) < shape_similarity(fresh) - 0.1
    # Done means done: a second call reads the result instead of training again.
    assert train.pretrain_text_encoder(tmp_path, scenes, steps=150, batch=32, lr=2e-3, seed=0, device="cpu") == (
        path,
        summary,
    )


def test_the_documented_command_still_parses_to_the_shipped_models_training_arguments():
    # The README's command is the embedded model's recipe: if a default changes, either the shipped
    # model or the documentation has to change with it.
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    command = re.search(r"^sdlab tinyworld train --out runs/v11 .*$", (root / "README.md").read_text(), re.M)
    assert command, "README.md no longer shows the embedded model's training command"
    argv = shlex.split(command.group(0))[3:] + ["--device", "cpu"]
    parsed = vars(train.parse_args(train.argument_parser(), argv))
    recorded = json.loads((root / "datasets/tinyworld/results/training_report_v11.json").read_text())["args"]
    assert {key: str(value) for key, value in parsed.items()} == recorded
