"""Sheets for checking the judge against a person's reading of the model's own generations.

    python benchmarks/judge_vs_reading.py [--model PATH] [--seed 7] [--threads 2]

Generates every other held-out prompt of each set (12 single, 12 pairs, 12 attributes; 20 DDIM steps,
guidance 5, one seed) and writes, under benchmarks/results/:
  judge_vs_reading_sheet.png   the 36 images without labels, four times enlarged, in prompt order
                               (rows of six: singles, pairs, attributes), to be read by eye first;
  judge_vs_reading.json        each image's prompt, the judge's reading and its score, with an empty
                               "reading" field for what the person saw (shape, colour, texture per object).
The person's readings and the comparison are written into that file by hand (the data card reports them),
so the script will not replace a file holding readings unless given --overwrite.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import lab
from lab.tinyworld import judge
from lab.tinyworld.evaluate import prompt_split

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--overwrite", action="store_true", help="replace a results file that holds a person's readings")
    args = p.parse_args()
    results = RESULTS / "judge_vs_reading.json"
    if (
        results.exists()
        and not args.overwrite
        and any(r.get("reading") is not None for r in json.loads(results.read_text())["images"])
    ):
        p.error(f"{results} holds readings made by eye; pass --overwrite to replace them with a new, unread sheet")
    torch.set_num_threads(args.threads)
    pipe = lab.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    split = prompt_split()
    items = [(name, prompt) for name in ("single", "pairs", "attributes") for prompt in split[name][::2]]
    records, tiles = [], []
    for i, (name, prompt) in enumerate(items):
        generator = torch.Generator().manual_seed(args.seed)
        image = pipe(prompt, num_inference_steps=20, guidance_scale=5.0, generator=generator, output_type="np").images[
            0
        ]
        image = (image * 255).round().astype(np.uint8)
        tiles.append(np.pad(image, ((2, 2), (2, 2), (0, 0))))
        score = judge.score_prompt(prompt, image)
        records.append(
            {
                "image": i,
                "set": name,
                "prompt": prompt,
                "judge": [f"{d.texture} {d.color} {d.shape}" for d in judge.read_image(image).objects],
                "judge_all_present": bool(score["all_present"]),
                "reading": None,
            }
        )
    rows = [np.concatenate(tiles[k : k + 6], 1) for k in range(0, len(tiles), 6)]
    sheet = np.concatenate(rows, 0)
    RESULTS.mkdir(exist_ok=True)
    Image.fromarray(sheet).resize((sheet.shape[1] * 4, sheet.shape[0] * 4), Image.NEAREST).save(
        RESULTS / "judge_vs_reading_sheet.png"
    )
    results.write_text(
        json.dumps(
            {"model": args.model or "embedded", "seed": args.seed, "steps": 20, "guidance": 5.0, "images": records},
            indent=1,
        )
    )
    print(f"wrote {RESULTS / 'judge_vs_reading_sheet.png'} and judge_vs_reading.json ({len(records)} images)")


if __name__ == "__main__":
    main()
