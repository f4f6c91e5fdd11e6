"""Seconds per UNet training step of a `sdlab tinyworld train --out` folder's recipe, with and without
the object-weighted denoising loss, in alternating rounds on this machine.

    python benchmarks/unet_step_time.py runs/v9 [--steps 40] [--rounds 2] [--threads 2]

Each measurement trains a fresh UNet for --steps steps of batch 32 (grounding loss on, frozen
pre-trained text encoder, as the CLI's defaults) in a temporary folder, from the run's cached latents,
scenes and masks, and divides the wall time by the steps (set-up included, so it reads a little high).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from lab.tinyworld import train
from lab.tinyworld.world import Scene


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="a `sdlab tinyworld train --out` folder past its decoder stage")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cached = load_file(str(args.out / "latents.safetensors"))
    scenes = [Scene.from_dict(d) for d in json.loads((args.out / "data_scenes.json").read_text())]
    masks = np.load(args.out / "data_masks.npy")
    for _ in range(args.rounds):
        for weight in (0.0, 4.0):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.time()
                train.train_unet(
                    Path(tmp),
                    cached["latents"],
                    float(cached["scaling_factor"]),
                    scenes,
                    args.steps,
                    32,
                    6e-4,
                    0,
                    "cpu",
                    layout_weight=1.0,
                    masks=masks,
                    grounding_weight=0.1,
                    frozen_text_encoder=args.out / "text_encoder_pretrained.safetensors",
                    object_weight=weight,
                )
                print(f"--unet-object-weight {weight:g}: {(time.time() - started) / args.steps:.3f} s/step")


if __name__ == "__main__":
    main()
