"""How well a text encoder tells TinyWorld's words apart where the UNet reads them: the mean cosine
similarity between the output tokens of prompts that differ in one word (lower: more distinct).

    python benchmarks/text_encoder_words.py lab/models/tinyworld-sd runs/scratch runs/tp/text_encoder_pretrained.safetensors

Each argument is a pipeline folder, a `sdlab tinyworld train --out` folder (its latest text encoder:
the finished run's EMA weights, else the checkpoint's EMA weights) or a text encoder .safetensors
file; "fresh" is a newly initialised encoder (seed 0). Rows: the noun of "a red <shape>" for the six
shapes; the colour word of "a <colour> circle" for the eight colours; the end-of-text token of
"a red circle <relation> a blue square" for the four relations. Prints a markdown table.
"""

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from lab.tinyworld import model as tw_model
from lab.tinyworld.train import unet_checkpoint
from lab.tinyworld.world import COLORS, RELATIONS, SHAPES


def load_text_encoder(source: str):
    if source == "fresh":
        torch.manual_seed(0)
        return tw_model.make_text_encoder()
    path = Path(source)
    if (path / "model_index.json").exists():
        from transformers import CLIPTextModel

        return CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder")
    if path.is_dir():
        if not (path / "unet_final").exists() and (path / "unet_ckpt").exists():
            return unet_checkpoint(path)[2]  # the checkpoint's EMA weights
        path = path / "unet_final" / "text_encoder_ema.safetensors"
        if not path.exists():
            raise SystemExit(
                f"{source}: no text encoder found (a pipeline folder, a training folder or a .safetensors file)"
            )
    text_encoder = tw_model.make_text_encoder()
    text_encoder.load_state_dict(load_file(str(path)))
    return text_encoder


@torch.no_grad()
def mean_similarity(text_encoder, prompts: list[str], position) -> float:
    """Mean pairwise cosine similarity of the output token at `position` (an index, or "eos")."""
    tokenizer = tw_model.make_tokenizer()
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = text_encoder.eval()(ids)[0]
    rows = torch.arange(len(prompts))
    columns = (
        (ids == tokenizer.eos_token_id).int().argmax(1) if position == "eos" else torch.full((len(prompts),), position)
    )
    vectors = torch.nn.functional.normalize(hidden[rows, columns], dim=-1)
    similarity = vectors @ vectors.T
    return float(similarity[~torch.eye(len(prompts), dtype=torch.bool)].mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+")
    args = p.parse_args()
    probes = {
        "shape nouns": ([f"a red {s}" for s in SHAPES], 3),
        "colour words": ([f"a {c} circle" for c in COLORS], 2),
        "end of text, relations": ([f"a red circle {r} a blue square" for r in RELATIONS], "eos"),
    }
    print("| text encoder | " + " | ".join(probes) + " |")
    print("|---|" + "---:|" * len(probes))
    for source in args.sources:
        text_encoder = load_text_encoder(source)
        cells = [f"{mean_similarity(text_encoder, prompts, position):.3f}" for prompts, position in probes.values()]
        print(f"| {source} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
