"""lab.testing: the tiny random pipelines are what they claim to be, and deterministic."""

import pytest
import torch
from conftest import generate
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

import lab


def test_sd1_family(sd1):
    assert isinstance(sd1, StableDiffusionPipeline)
    assert sd1.scheduler.config.prediction_type == "epsilon"
    assert sd1.vae_scale_factor == 8
    assert sd1.text_encoder.config.vocab_size == 49408
    assert sd1.unet.config.cross_attention_dim == sd1.text_encoder.config.hidden_size
    assert sd1.tokenizer.pad_token == "<|endoftext|>"


def test_sd2_family(sd2):
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert sd2.unet.config.use_linear_projection is True
    assert tuple(sd2.unet.config.attention_head_dim) == (2, 4)
    assert sd2.tokenizer.pad_token == "!"
    heads = {s.module.heads for s in lab.sites(sd2) if s.is_attention}
    assert heads == {2, 4}


def test_sdxl_family(sdxl):
    assert isinstance(sdxl, StableDiffusionXLPipeline)
    config = sdxl.unet.config
    assert config.addition_embed_type == "text_time"
    pooled = sdxl.text_encoder_2.config.projection_dim
    assert config.projection_class_embeddings_input_dim == 6 * config.addition_time_embed_dim + pooled
    assert config.cross_attention_dim == sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    assert sdxl.tokenizer_2.pad_token == "!"


def test_pipelines_run_and_are_seeded(any_pipe):
    first = generate(any_pipe, steps=2)
    again = generate(any_pipe, steps=2)
    assert first.shape == (1, 4, 8, 8)
    assert torch.equal(first, again)
    images = any_pipe("a horse", num_inference_steps=1, height=64, width=96, output_type="pt").images
    assert images.shape == (1, 3, 64, 96)


def test_builders_are_deterministic_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = lab.testing.tiny_sd1_pipeline(seed=7)
    assert torch.equal(torch.rand(1), expected)
    b = lab.testing.tiny_sd1_pipeline(seed=7)
    c = lab.testing.tiny_sd1_pipeline(seed=8)
    weight = lambda p: p.unet.conv_in.weight  # noqa: E731
    assert torch.equal(weight(a), weight(b)) and not torch.equal(weight(a), weight(c))


def test_img2img_shares_components(sd1):
    img2img = lab.testing.tiny_img2img_pipeline(sd1)
    assert isinstance(img2img, StableDiffusionImg2ImgPipeline)
    assert img2img.unet is sd1.unet


def test_sd15_sized_unet_has_sd15_shape():
    with torch.device("meta"):  # shapes only: no 3.4 GB of random weights
        unet = lab.testing.sd15_sized_unet()
    assert unet.config.cross_attention_dim == 768
    assert tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert 855e6 < sum(p.numel() for p in unet.parameters()) < 865e6
    assert len([s for s in lab.sites(unet) if s.kind == "cross"]) == 16


def test_load_pipeline_reads_any_saved_family_folder(sd2, sdxl, tmp_path):
    for pipe, cls in ((sd2, StableDiffusionPipeline), (sdxl, StableDiffusionXLPipeline)):
        folder = tmp_path / cls.__name__
        pipe.save_pretrained(str(folder))
        loaded = lab.load_pipeline(folder, dtype=torch.bfloat16)
        assert type(loaded) is cls
        assert loaded.unet.dtype == torch.bfloat16
        assert loaded.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type


def test_load_pipeline_rejects_an_empty_name_and_a_folder_without_a_pipeline(tmp_path):
    with pytest.raises(ValueError, match="leave it out for the embedded"):
        lab.load_pipeline("")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        lab.load_pipeline(tmp_path)
