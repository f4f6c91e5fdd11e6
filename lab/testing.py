"""Tiny random-weight Stable Diffusion pipelines, built locally (no downloads), for tests and demos.

One builder per family, each seeded and fast on a CPU:

    tiny_sd1_pipeline()    StableDiffusionPipeline: epsilon prediction, DDIM, SD-1 style UNet.
    tiny_sd2_pipeline()    StableDiffusionPipeline: v-prediction, linear projections, per-block head
                           counts, upcast attention, pad token "!" (like SD 2.x).
    tiny_sdxl_pipeline()   StableDiffusionXLPipeline: two text encoders and tokenizers, "text_time"
                           added conditioning, Euler scheduler.
    tiny_img2img_pipeline(pipe)  the same components as a StableDiffusionImg2ImgPipeline.
    sd15_sized_unet()      a random UNet with the shape of SD-1.5's (860M parameters), for benchmarks.

The text encoders keep CLIP's real vocabulary (49408 tokens) and use the real CLIP tokenizer in
`lab/tokenizer`, so prompts tokenize exactly as in the real models; only the widths are tiny. The
VAEs have four blocks, so the latent is 1/8 of the image in each direction, as in the real models:
a 64x64 image has an 8x8 latent.

The weights are random: images are noise. These pipelines exist to exercise code paths and shapes.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lab.tokens import TOKENIZER_DIR, clip_tokenizer

CLIP_VOCAB_SIZE = 49408
# Image size that gives the tiny UNets their native 8x8 latent.
TINY_IMAGE_SIZE = 64

__all__ = [
    "TOKENIZER_DIR",
    "TINY_IMAGE_SIZE",
    "clip_tokenizer",
    "tiny_sd1_pipeline",
    "tiny_sd2_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_img2img_pipeline",
    "sd15_sized_unet",
]


def _tiny_text_encoder(hidden_size: int = 32, with_projection: bool = False, projection_dim: int = 32):
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
        # CLIP pools the text at the end-of-text token; the real ids make that work like the real model.
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def _tiny_vae() -> AutoencoderKL:
    # Four blocks: the latent is 1/8 of the image, as in the real SD VAEs.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=TINY_IMAGE_SIZE,
    ).eval()


def _sd_scheduler_config(prediction_type: str) -> dict:
    return dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_sd1_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD-1 style: epsilon prediction, DDIM, cross-attention in two down blocks, the mid block and two up blocks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=2,  # diffusers' name for the number of heads in SD-1 configs
            norm_num_groups=16,
        ).eval()
        vae = _tiny_vae()
        text_encoder = _tiny_text_encoder()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**_sd_scheduler_config("epsilon")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sd2_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD-2 style: v-prediction, linear projections, a head count per block, upcast attention, pad token "!"."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            upcast_attention=True,
            norm_num_groups=16,
        ).eval()
        vae = _tiny_vae()
        text_encoder = _tiny_text_encoder()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=DDIMScheduler(**_sd_scheduler_config("v_prediction")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL style: two text encoders (their hidden states concatenated: 32 + 32 = 64), "text_time" conditioning."""
    addition_time_embed_dim = 8
    pooled_text_dim = 32  # text_encoder_2's projection_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            # six micro-conditioning numbers (original size, crop, target size) plus the pooled text embedding
            projection_class_embeddings_input_dim=6 * addition_time_embed_dim + pooled_text_dim,
            norm_num_groups=16,
        ).eval()
        vae = _tiny_vae()
        text_encoder = _tiny_text_encoder()
        text_encoder_2 = _tiny_text_encoder(with_projection=True, projection_dim=pooled_text_dim)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def tiny_img2img_pipeline(pipe: StableDiffusionPipeline) -> StableDiffusionImg2ImgPipeline:
    """The same components (same objects, same UNet) as an image-to-image pipeline."""
    return StableDiffusionImg2ImgPipeline(**pipe.components)


def sd15_sized_unet(seed: int = 0, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """A random UNet with SD-1.5's architecture: diffusers' default config with 768-d cross-attention."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
    return unet.to(dtype).eval()


def sd15_sized_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """`sd15_sized_unet` in a pipeline: the tiny VAE and a one-layer text encoder with SD-1.5's 768-d
    output keep set-up cheap (benchmarks: the UNet is what costs)."""

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=256,
                num_hidden_layers=1,
                num_attention_heads=12,
                max_position_embeddings=77,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        ).eval()
    tiny = tiny_sd1_pipeline(seed)
    return StableDiffusionPipeline(
        vae=tiny.vae,
        text_encoder=text_encoder,
        tokenizer=tiny.tokenizer,
        unet=sd15_sized_unet(seed),
        scheduler=DDIMScheduler.from_config(tiny.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
