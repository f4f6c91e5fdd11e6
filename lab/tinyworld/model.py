"""The embedded TinyWorld model: Stable Diffusion's architecture at a size a laptop CPU runs in seconds.

Every component is the stock diffusers / transformers class that real SD 1.x uses
(AutoencoderKL, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer with CLIP's real BPE
vocabulary, DDIMScheduler), only narrower: 64x64 images, 16x16 latents, cross-attention
at 16x16, 8x8 and 4x4.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lab.tokens import clip_tokenizer

TEXT_WIDTH = 64


def make_tokenizer() -> CLIPTokenizer:
    return clip_tokenizer()


def make_text_encoder() -> CLIPTextModel:
    # Narrow (64 wide): CLIP's 49,408-token embedding table dominates the size of the whole model.
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_WIDTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="quick_gelu",
    )
    return CLIPTextModel(config)


def make_vae() -> AutoencoderKL:
    # Downsamples 4x (three blocks): 64x64 RGB <-> 4x16x16 latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        norm_num_groups=16,
    )


def make_unet() -> UNet2DConditionModel:
    # SD 1.x's block layout, narrowed: cross-attention at 16x16 and 8x8 on the way down and up, and 4x4 mid.
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(48, 96, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def make_scheduler(prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> DDIMScheduler:
    """SD 1.x's noise schedule and DDIM settings; or, with `zero_terminal_snr`, the same betas rescaled
    so the last step is pure noise and sampling starts there ("trailing" spacing), as Lin et al. 2024
    ("Common Diffusion Noise Schedules and Sample Steps are Flawed") prescribe. Pure noise has no
    epsilon to predict from, so that schedule needs v-prediction (as SD 2.x uses)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if zero_terminal_snr and prediction_type == "epsilon":
        raise ValueError("a zero-terminal-SNR schedule needs prediction_type='v_prediction'")
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_terminal_snr,
        timestep_spacing="trailing" if zero_terminal_snr else "leading",
    )  # (steps_offset only shifts "leading" timesteps; StableDiffusionPipeline expects it to be 1)
