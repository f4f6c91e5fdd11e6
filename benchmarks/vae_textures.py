"""What a TinyWorld VAE keeps: rendered single-object scenes, encoded and decoded, read by the judge.
The fraction of striped and dotted objects whose texture (and shape + colour) the judge still reads right, by texture and size; a
UNet trained on that latent space cannot draw better than its decoder can.

    python benchmarks/vae_textures.py lab/models/tinyworld-sd runs/tp [--n 30]

Each argument is a pipeline folder or a `sdlab tinyworld train --out` folder (its VAE and fine-tuned
decoder). Scenes are drawn from seeds no training or evaluation split uses. Prints a markdown table.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from lab.tinyworld.judge import score_prompt
from lab.tinyworld.train import load_trained_vae
from lab.tinyworld.world import SIZES, TEXTURES, fixed_caption, render, sample_scene

SEED = 30_000_000  # training scenes use seeds [0, n), evaluation splits 10_000_000 + ...


def load_vae(source: str):
    path = Path(source)
    if (path / "model_index.json").exists():
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(str(path), subfolder="vae").eval()
    return load_trained_vae(path)


@torch.no_grad()
def round_trip(vae, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+")
    p.add_argument("--n", type=int, default=30, help="scenes per texture and size")
    args = p.parse_args()
    cases = [
        (texture, size) for texture in TEXTURES if texture != "plain" for size in SIZES
    ]  # prompts leave "plain" unsaid
    print("| VAE | " + " | ".join(f"{t}, {s}" for t, s in cases) + " |")
    print("|---|" + "---:|" * len(cases))
    rows = {"rendered (no VAE)": None, **{source: load_vae(source) for source in args.sources}}
    for name, vae in rows.items():
        cells = []
        for k, (texture, size) in enumerate(cases):
            scenes = [
                sample_scene(SEED + 1000 * k + i, n_objects=1, texture=texture, size_label=size) for i in range(args.n)
            ]
            images = np.stack([render(scene).image for scene in scenes])
            images = images if vae is None else round_trip(vae, images)
            scores = [score_prompt(fixed_caption(scene), image)["objects"][0] for scene, image in zip(scenes, images)]
            cells.append(
                f"{np.mean([s['texture'] for s in scores]):.0%} ({np.mean([s['present'] for s in scores]):.0%})"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nEach cell: texture read right (shape and colour read right).")


if __name__ == "__main__":
    main()
