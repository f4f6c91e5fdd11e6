"""lab.esd: ESD-x / ESD-u change exactly their parameters, are undone bit for bit (also when training fails),
save and load as lab.weights edits, resume from accelerate checkpoints exactly, and refuse bad input."""

import pytest
import torch
from conftest import generate
from test_weights import differences, state

import lab
import lab.concept_training
import lab.esd
import lab.weights

FAST = dict(iterations=2, lr=1e-3, num_steps=4, progress=False)


def changed(pipe, before):
    return {n for n, p in lab.weights.named_parameters(pipe).items() if not torch.equal(p, before[0][n])}


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_esd_x_changes_only_cross_attention_and_is_restored(kind, request, restored):
    pipe = request.getfixturevalue(kind)
    before, check, base = state(pipe), restored(pipe), generate(pipe, "a red star")
    with lab.esd.erase(pipe, "star", method="x", **FAST) as edit:
        touched = changed(pipe, before)
        assert touched and all(n.startswith("unet.") and ".attn2." in n for n in touched)
        assert set(edit.changed()) == touched
        assert len(edit.losses) == 2 and all(loss >= 0 for loss in edit.losses)
        assert not torch.equal(generate(pipe, "a red star"), base)
    assert differences(pipe, before) == []
    check()
    assert torch.equal(generate(pipe, "a red star"), base)


def test_esd_u_is_everything_but_attn2_out_and_time_embedding(sd1, sdxl):
    for pipe in (sd1, sdxl):
        chosen = lab.weights.select_parameters(pipe, lab.esd.parameter_selector("u"))
        unet = {n for n in lab.weights.named_parameters(pipe) if n.startswith("unet.")}
        skipped = unet - set(chosen)
        assert all(
            ".attn2." in n or n.split(".")[1] in ("time_embedding", "add_embedding", "conv_norm_out", "conv_out")
            for n in skipped
        )
        assert "unet.conv_in.weight" in chosen and not any(".attn2." in n for n in chosen)
        assert any(".attn1." in n for n in chosen) and any("time_emb_proj" in n for n in chosen)
    before = state(sd1)
    with lab.esd.erase(sd1, "star", method="u", **FAST):
        touched = changed(sd1, before)
        allowed = set(lab.weights.select_parameters(sd1, lab.esd.parameter_selector("u")))
        assert touched and touched <= allowed
    assert differences(sd1, before) == []


def test_x_strict_is_to_k_and_to_v(sd1):
    chosen = lab.weights.select_parameters(sd1, lab.esd.parameter_selector("x-strict"))
    assert chosen and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in chosen)


def test_save_and_load_reproduce_the_edit(sd2, tmp_path):
    before = state(sd2)
    with lab.esd.erase(sd2, "star", **FAST) as edit:
        names = edit.save(tmp_path / "esd.safetensors")
        trained = {n: p.detach().clone() for n, p in lab.weights.named_parameters(sd2).items() if n in names}
        latents = generate(sd2, "a star")
    assert all(".attn2." in n for n in names)
    with lab.weights.load(tmp_path / "esd.safetensors").apply(sd2):
        live = lab.weights.named_parameters(sd2)
        assert all(torch.equal(live[n], trained[n]) for n in names)
        assert torch.equal(generate(sd2, "a star"), latents)
    assert differences(sd2, before) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_mid_training_restores_everything(sd1, restored, monkeypatch, error):
    before, check, calls = state(sd1), restored(sd1), []
    sample = lab.concept_training.sample_xt

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise error("interrupted")
        return sample(*args, **kwargs)

    monkeypatch.setattr(lab.concept_training, "sample_xt", failing)
    with pytest.raises(error):
        with lab.esd.erase(sd1, "star", method="u", **{**FAST, "iterations": 5}):
            pytest.fail("erase must not return")
    assert len(calls) == 3
    assert differences(sd1, before) == []  # values, requires_grad flags and grads
    check()


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(sd1, tmp_path):
    settings = dict(FAST, iterations=4, lr_scheduler="linear", seed=3)
    with lab.esd.erase(sd1, "star", checkpoint_dir=tmp_path, checkpoint_every=2, **settings) as whole:
        uninterrupted = {n: p.detach().clone() for n, p in whole.parameters.items()}
        losses = whole.losses
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-2" / lab.concept_training.TRAINED_FILE).is_file()
    with lab.esd.erase(sd1, "star", resume_from=tmp_path / "checkpoint-2", **settings) as resumed:
        assert resumed.losses == losses[2:]  # continued at step 2 with the same random draws
        assert all(torch.equal(p, uninterrupted[n]) for n, p in resumed.parameters.items())
    with pytest.raises(ValueError, match="not a checkpoint"):
        lab.esd.erase(sd1, "star", resume_from=tmp_path, **settings)


def test_sample_xt_is_the_pipelines_own_ddim_run(sd1):
    g = torch.Generator().manual_seed(0)
    x_t, t, scheduler = lab.concept_training.sample_xt(sd1, "a star", generator=g, num_steps=4, steps=range(2, 3))
    assert t == scheduler.timesteps[2]
    g = torch.Generator().manual_seed(0)  # the same draws: the step, then the noise
    torch.randint(1, (1,), generator=g)
    noise = torch.randn((1, 4, 8, 8), generator=g)
    seen = {}

    def record(pipe, i, step, kwargs):
        seen[i] = kwargs["latents"].clone()
        return kwargs

    own = sd1.scheduler
    sd1.scheduler = type(scheduler).from_config(own.config)
    try:
        sd1("a star", num_inference_steps=4, guidance_scale=3.0, latents=noise, output_type="latent",
            height=64, width=64, callback_on_step_end=record)  # fmt: skip
    finally:
        sd1.scheduler = own
    assert torch.equal(x_t, seen[1])  # after two DDIM steps: the latent at timesteps[2]


def test_bad_input_is_refused_and_changes_nothing(sd1):
    before = state(sd1)
    with pytest.raises(ValueError, match="non-empty"):
        lab.esd.erase(sd1, "  ", **FAST)
    for iterations in (0, -3):
        with pytest.raises(ValueError, match="iterations"):
            lab.esd.erase(sd1, "star", **{**FAST, "iterations": iterations})
    with pytest.raises(ValueError, match="method"):
        lab.esd.erase(sd1, "star", method="xattn", **FAST)
    with pytest.raises(ValueError, match="eta"):
        lab.esd.erase(sd1, "star", eta=float("nan"), **FAST)
    assert differences(sd1, before) == []
