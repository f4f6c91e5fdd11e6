"""Write tests/data/daam_reference.safetensors: DAAM, OVAM, self-attention maps and the x0 trajectory of the
embedded model, computed by the code at the commit named in the file's metadata. tests/test_daam_reference.py
checks that today's code gives the same maps (float32 round-off on CPU). Rerun only on purpose:

    python tests/data/make_daam_reference.py
"""

import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

import lab

PROMPTS = ["a red circle left of a blue square", "a large striped star"]
STEPS = 8
OUT = Path(__file__).with_name("daam_reference.safetensors")


def reference_maps(pipe) -> dict[str, torch.Tensor]:
    maps = {}
    for index, prompt in enumerate(PROMPTS):
        run = lab.daam.trace_generation(
            pipe, prompt, seed=index, num_inference_steps=STEPS, guidance_scale=5.0, per_step=True
        )
        means = lab.daam.trace_generation(pipe, prompt, seed=index, num_inference_steps=STEPS, guidance_scale=5.0)
        for word in run.words():
            maps[f"{index}/daam/{word}"] = torch.from_numpy(run.heat_map(word).values)
            maps[f"{index}/daam_means/{word}"] = torch.from_numpy(means.heat_map(word).values)
        first = run.words()[1]
        maps[f"{index}/daam_sliced/{first}"] = torch.from_numpy(
            run.heat_map(first, steps=range(2, 6), sites="16x16", heads=[0]).values
        )
        maps[f"{index}/ovam/heart"] = torch.from_numpy(run.open_vocab_map("heart", "a heart").values)
        maps[f"{index}/self/20_40"] = torch.from_numpy(run.self_attention_map(20, 40).values)
        maps[f"{index}/self_means/20_40"] = torch.from_numpy(means.self_attention_map(20, 40).values)
        maps[f"{index}/x0"] = torch.from_numpy(run.x0_images[:, 0].copy())
        maps[f"{index}/image"] = torch.from_numpy(run.image_arrays[0].copy())
    return maps


if __name__ == "__main__":
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    pipe = lab.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    save_file(
        {k: v.contiguous() for k, v in reference_maps(pipe).items()},
        str(OUT),
        metadata={"commit": commit, "prompts": "|".join(PROMPTS), "steps": str(STEPS)},
    )
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB) from commit {commit}")
