"""Judge a training run part-way: the EMA weights of a `sdlab tinyworld train --out` folder's latest
UNet checkpoint, with its VAE and text encoder, on the held-out prompts.

    python benchmarks/eval_checkpoint.py runs/tp --sets single,pairs --seeds 1 [--threads 1]

The run goes on while this reads its checkpoint (written every 250 steps). Prints the step and the
judge's summary per prompt set (20 DDIM steps, guidance 5, as `sdlab tinyworld eval`). The scheduler
is the CLI's default (v-prediction on a zero-terminal-SNR schedule) unless --prediction-type epsilon.
"""

import argparse
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from lab.tinyworld import model as tw_model
from lab.tinyworld.evaluate import evaluate_model, prompt_split
from lab.tinyworld.train import assemble_pipeline, load_trained_vae, unet_checkpoint


def checkpoint_pipeline(out: Path, prediction_type: str = "v_prediction") -> tuple[StableDiffusionPipeline, int]:
    step, unet, text_encoder = unet_checkpoint(out)  # the EMA weights
    scaling = float(load_file(str(out / "latents.safetensors"))["scaling_factor"])
    scheduler = tw_model.make_scheduler(prediction_type, zero_terminal_snr=prediction_type == "v_prediction")
    pipe = assemble_pipeline(load_trained_vae(out), unet, text_encoder, scaling, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe, step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="a `sdlab tinyworld train --out` folder with a UNet checkpoint")
    p.add_argument("--sets", default="single", help="comma-separated prompt sets of prompt_split()")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="v_prediction")
    p.add_argument("--threads", type=int, default=1, help="leave the training run its cores")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe, step = checkpoint_pipeline(args.out, args.prediction_type)
    split = prompt_split()
    results = evaluate_model(
        pipe, seeds=tuple(range(args.seeds)), sets={name: split[name] for name in args.sets.split(",")}
    )
    print(json.dumps({"step": step, **results}, indent=1))


if __name__ == "__main__":
    main()
