"""Loading pipelines: the embedded TinyWorld model by default, any SD 1.x / 2.x / XL through diffusers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

EMBEDDED_MODEL = Path(__file__).resolve().parent / "models" / "tinyworld-sd"


def load_pipeline(
    name_or_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **kwargs,
):
    """Return a ready-to-use diffusers pipeline.

    - no argument: the embedded TinyWorld model (64x64 images, runs in seconds on a CPU);
    - a hub id or a local folder: any Stable Diffusion 1.x / 2.x / XL pipeline, e.g.
      `load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda", dtype=torch.float16)`.
      The class (StableDiffusionPipeline or StableDiffusionXLPipeline) is read from the folder's
      model_index.json, as `DiffusionPipeline.from_pretrained` does. Extra keyword arguments go to
      `from_pretrained` (e.g. `variant="fp16"`).
    """
    from diffusers import DiffusionPipeline
    from diffusers.pipelines import pipeline_utils

    source = EMBEDDED_MODEL if name_or_path is None else name_or_path
    if name_or_path is None and not (EMBEDDED_MODEL / "model_index.json").exists():
        raise FileNotFoundError(
            f"the embedded TinyWorld model is missing from {EMBEDDED_MODEL}; train it with "
            "`sdlab tinyworld train` or pass a hub id / local folder of a Stable Diffusion pipeline"
        )
    if not str(source).strip():
        raise ValueError(
            "load_pipeline() got an empty name: leave it out for the embedded TinyWorld model, "
            "or pass a hub id / local folder of a Stable Diffusion pipeline"
        )
    if Path(source).is_dir() and not (Path(source) / "model_index.json").exists():
        raise FileNotFoundError(
            f"{source} is a folder but not a diffusers pipeline (no model_index.json); pass the folder that "
            "`pipe.save_pretrained(...)` wrote, or a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'"
        )
    if Path(source).is_dir() and (Path(source) / "model_index.json").exists():
        index = json.loads((Path(source) / "model_index.json").read_text())
        if "safety_checker" in index:  # the embedded model and many local copies have none
            kwargs.setdefault("safety_checker", None)
            kwargs.setdefault("requires_safety_checker", False)
    # Newer diffusers call the argument `dtype` and warn about `torch_dtype`; older ones know only the latter.
    dtype_argument = "dtype" if "_resolve_dtype" in vars(pipeline_utils) else "torch_dtype"
    kwargs.setdefault(dtype_argument, dtype)
    if importlib.util.find_spec("accelerate") is None:
        kwargs.setdefault("low_cpu_mem_usage", False)  # what diffusers falls back to anyway, without the warning
    pipe = DiffusionPipeline.from_pretrained(str(source), **kwargs)
    if not hasattr(pipe, "unet") or not hasattr(pipe, "text_encoder"):
        raise ValueError(
            f"{source} loads as {type(pipe).__name__}, which has no UNet + text encoder: sdlab's hooks work on "
            "Stable Diffusion 1.x / 2.x / XL pipelines (UNet2DConditionModel with cross-attention)"
        )
    pipe.to(device)
    if name_or_path is None:
        pipe.set_progress_bar_config(leave=False)
    return pipe
