"""Shared fixtures: tiny random pipelines (built once per session) and restoration checks."""

import pytest
import torch

import lab

torch.set_num_threads(1)  # the CI box has 2 busy cores; tiny models gain nothing from more


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sd1():
    return _quiet(lab.testing.tiny_sd1_pipeline())


@pytest.fixture(scope="session")
def sd2():
    return _quiet(lab.testing.tiny_sd2_pipeline())


@pytest.fixture(scope="session")
def sdxl():
    return _quiet(lab.testing.tiny_sdxl_pipeline())


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def any_pipe(request):
    return request.getfixturevalue(request.param)


def snapshot(unet):
    """What a trace must leave exactly as it found: processor objects and every module's torch hooks."""
    processors = {name: module.processor for name, module in unet.named_modules() if hasattr(module, "processor")}
    hooks = {
        name: (dict(module._forward_hooks), dict(module._forward_pre_hooks)) for name, module in unet.named_modules()
    }
    return processors, hooks


def assert_restored(unet, before):
    processors, hooks = snapshot(unet)
    assert processors.keys() == before[0].keys()
    for name, processor in processors.items():
        assert processor is before[0][name], f"processor of {name} was not restored"
    assert hooks == before[1], "torch hooks were left behind"
    assert lab.active_hooks(unet) == []


@pytest.fixture
def restored(request):
    """Use as `check = restored(pipe)` ... `check()`: asserts the UNet is as it was."""

    def start(pipe):
        before = snapshot(pipe.unet)
        return lambda: assert_restored(pipe.unet, before)

    return start


def generate(pipe, prompt="a photograph of an astronaut riding a horse", steps=3, **kwargs):
    kwargs.setdefault("height", 64)
    kwargs.setdefault("width", 64)
    kwargs.setdefault("output_type", "latent")
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(prompt, num_inference_steps=steps, **kwargs).images
