"""lab.sliders: training leaves the pipeline as it was, scale 0 is the base model bit for bit, a saved slider
loads in plain diffusers with the same image, the start-step switch, two sliders at once, and bad input."""

import pytest
import torch
from conftest import generate
from test_weights import differences, state

import lab
import lab.sliders

FAST = dict(iterations=2, lr=1e-2, num_steps=4, progress=False)


@pytest.fixture(scope="module")
def slider(sd1):
    return lab.sliders.train(sd1, target="", positive="large", negative="small", **FAST)


def test_training_leaves_the_pipeline_as_it_was(sd2, restored):
    before, check, base = state(sd2), restored(sd2), generate(sd2, "a star")
    trained = lab.sliders.train(
        sd2, target="star", positive="large star", attributes=["red", "blue"], symmetric=True, **FAST
    )
    assert differences(sd2, before) == [] and not hasattr(sd2.unet, "peft_config")
    check()
    assert torch.equal(generate(sd2, "a star"), base)
    assert len(trained.losses) == 2 and trained.settings["attributes"] == ["red", "blue"]
    assert any(k.endswith("lora_B.weight") and k for k in trained.tensors)


def test_the_reference_modules_get_lora(sd1, slider):
    modules = lab.sliders.target_modules(sd1.unet)
    assert not any("attn2" in m for m in modules) and any(".attn1.to_q" in m for m in modules)
    assert any(m.endswith("resnets.0.time_emb_proj") for m in modules) and any("downsamplers" in m for m in modules)
    assert not any("time_embedding" in m or "proj_in" in m or ".ff." in m for m in modules)
    layers = {k.removeprefix("unet.").split(".lora")[0] for k in slider.tensors}
    assert layers == set(modules)
    assert not any(m in modules for m in lab.sliders.target_modules(sd1.unet, conv=False) if "resnets" in m)


def test_scale_zero_is_the_base_model_bit_for_bit(sd1, slider, restored):
    before, check, base = state(sd1), restored(sd1), generate(sd1, "a star")
    with lab.sliders.apply(sd1, [slider], scales=[0.0]):
        assert torch.equal(generate(sd1, "a star"), base)
    with lab.sliders.apply(sd1, [slider], scales=[3.0]):
        assert not torch.equal(generate(sd1, "a star"), base)
    assert differences(sd1, before) == []
    check()


def test_saved_slider_loads_in_plain_diffusers_with_the_same_image(sd1, slider, tmp_path):
    folder = slider.save(tmp_path / "size")
    with lab.sliders.apply(sd1, [folder], scales=[-2.0]):
        ours = generate(sd1, "a star")
    with lab.sliders.apply(sd1, slider, scales=-2.0):
        assert torch.equal(generate(sd1, "a star"), ours)
    flags = {name: p.requires_grad for name, p in sd1.unet.named_parameters()}
    sd1.load_lora_weights(str(folder), adapter_name="plain")
    try:
        sd1.set_adapters(["plain"], adapter_weights=[-2.0])
        assert torch.equal(generate(sd1, "a star"), ours)
    finally:
        sd1.unload_lora_weights()  # plain diffusers leaves peft's frozen flags: put them back for the other tests
        for name, p in sd1.unet.named_parameters():
            p.requires_grad_(flags[name])
    assert lab.sliders.Slider.load(folder).settings["positive"] == "large"


def test_start_step_switch(sd1, slider):
    def run(**kwargs):
        seen = []
        record = lambda pipe, i, t, kw: seen.append(kw["latents"].clone()) or kw  # noqa: E731
        generate(sd1, "a star", steps=4, callback_on_step_end=record, **kwargs)
        return seen

    base = run()
    with lab.sliders.apply(sd1, [slider], scales=[3.0], start_step=2) as applied:
        late = run()
        assert len(applied.names) == 1
    with lab.sliders.apply(sd1, [slider], scales=[3.0]):
        always = run()
    assert torch.equal(late[0], base[0]) and torch.equal(late[1], base[1])  # steps 0, 1: off
    assert not torch.equal(late[2], base[2]) and not torch.equal(late[3], always[3])
    threshold = float(sd1.scheduler.timesteps[1])  # on for t <= timesteps[1]: from step 1 on
    with lab.sliders.apply(sd1, [slider], scales=[3.0], start_noise=threshold):
        noisy = run()
    assert torch.equal(noisy[0], base[0]) and not torch.equal(noisy[1], base[1])


def test_two_sliders_at_once(sd1, slider):
    with lab.sliders.apply(sd1, [slider], scales=[2.0]):
        double = generate(sd1, "a star")
    with lab.sliders.apply(sd1, [slider, slider], scales=[1.0, 1.0]) as applied:
        both = generate(sd1, "a star")
        assert len(set(applied.names)) == 2
    with lab.sliders.apply(sd1, [slider, slider], scales=[1.5, -1.5]):
        cancelled = generate(sd1, "a star")
    torch.testing.assert_close(both, double, rtol=1e-4, atol=1e-4)  # one LoRA, applied twice = scale 2
    torch.testing.assert_close(cancelled, generate(sd1, "a star"), rtol=1e-4, atol=1e-4)
    assert not hasattr(sd1.unet, "peft_config")


def test_bad_input_is_refused_and_changes_nothing(sd1, sdxl, slider, tmp_path):
    folder = slider.save(tmp_path / "sd1_slider")
    for pipe in (sd1, sdxl):
        before = state(pipe)
        with pytest.raises(ValueError, match="finite"):
            lab.sliders.apply(pipe, [slider], scales=[float("nan")])
        with pytest.raises(ValueError, match="one scale per slider"):
            lab.sliders.apply(pipe, [slider], scales=[1.0, 2.0])
        with pytest.raises(ValueError, match="non-empty"):
            lab.sliders.train(pipe, target="", positive="", **FAST)
        for iterations in (0, -1):
            with pytest.raises(ValueError, match="iterations"):
                lab.sliders.train(pipe, positive="large", **{**FAST, "iterations": iterations})
        with pytest.raises(ValueError, match="holds no"):
            lab.sliders.apply(pipe, [tmp_path], scales=[1.0])
        assert differences(pipe, before) == [] and not hasattr(pipe.unet, "peft_config")
    before = state(sdxl)
    lab.sliders.check_fits(sd1, folder)  # its own architecture: no error
    for check in (lambda: lab.sliders.check_fits(sdxl, folder), lambda: lab.sliders.check_fits(sdxl, slider)):
        with pytest.raises(ValueError, match="does not fit this UNet"):
            check()
    with pytest.raises(ValueError, match="does not fit this UNet"):
        lab.sliders.apply(sdxl, [folder], scales=[1.0])
    assert differences(sdxl, before) == [] and not hasattr(sdxl.unet, "peft_config")


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_sd2_and_sdxl_train_apply_save_and_load_in_plain_diffusers(name, request, restored, tmp_path):
    pipe = request.getfixturevalue(name)
    before, check, base = state(pipe), restored(pipe), generate(pipe, "a star")
    slider = lab.sliders.train(pipe, target="", positive="large", negative="small", **FAST)
    folder = slider.save(tmp_path / name)
    with lab.sliders.apply(pipe, [folder], scales=[0.0]):
        assert torch.equal(generate(pipe, "a star"), base)
    with lab.sliders.apply(pipe, [folder], scales=[2.0]):
        ours = generate(pipe, "a star")
    assert not torch.equal(ours, base)
    flags = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    pipe.load_lora_weights(str(folder), adapter_name="plain")
    try:
        pipe.set_adapters(["plain"], adapter_weights=[2.0])
        assert torch.equal(generate(pipe, "a star"), ours)
    finally:
        pipe.unload_lora_weights()
        for n, p in pipe.unet.named_parameters():
            p.requires_grad_(flags[n])
    assert differences(pipe, before) == [] and not hasattr(pipe.unet, "peft_config")
    check()
