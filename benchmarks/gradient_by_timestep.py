"""Which timesteps drive a training run's updates: the weighted loss and the UNet's gradient norm per
band of 100 timesteps, at a run's latest checkpoint, with the loss weighting it was trained with.

    python benchmarks/gradient_by_timestep.py runs/scratch [--batches 4]

Reads OUT/unet_ckpt (the raw, not the EMA, weights), OUT/latents.safetensors, OUT/data_*.json and the
run's arguments from OUT/training_report.json when present (else the CLI's defaults; override with
--prediction-type / --layout-weight). Training averages the bands in every batch and clips the
result to norm 1, so the bands with the larger gradients weigh most in each update. Prints a
markdown table.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lab.tinyworld import model as tw_model
from lab.tinyworld import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="a `sdlab tinyworld train --out` folder with a UNet checkpoint")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None)
    p.add_argument("--layout-weight", type=float, default=None)
    p.add_argument("--batches", type=int, default=4, help="batches of 32 per band")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    report = args.out / "training_report.json"
    trained_with = json.loads(report.read_text())["args"] if report.exists() else {}
    prediction = args.prediction_type or trained_with.get("prediction_type", "v_prediction")
    layout_weight = (
        args.layout_weight if args.layout_weight is not None else float(trained_with.get("layout_weight", 1.0))
    )
    zero_terminal_snr = trained_with.get("zero_terminal_snr", str(prediction == "v_prediction")) == "True"
    scheduler = tw_model.make_scheduler(prediction, zero_terminal_snr=zero_terminal_snr)
    step, unet, text_encoder = train.unet_checkpoint(args.out, ema=False)
    cached = load_file(str(args.out / "latents.safetensors"))
    latents, scaling = cached["latents"], cached["scaling_factor"].item()
    config = json.loads((args.out / "data_config.json").read_text())
    _, scenes, _ = train.make_data(args.out, config["n"], mirror_pairs=config["mirror_pairs"])
    tokenizer = tw_model.make_tokenizer()
    snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    rng = np.random.default_rng(0)
    print(
        f"{args.out} at step {step}: {prediction}, zero-terminal SNR {zero_terminal_snr}, layout weight {layout_weight}\n"
    )
    print("| timesteps | weighted loss | UNet gradient norm |\n|---|---|---|")
    for low in range(0, 1000, 100):
        losses, norms = [], []
        for _ in range(args.batches):
            idx = rng.choice(len(latents), 32, replace=False)
            ids = tokenizer(
                [train.caption(scenes[i], rng) for i in idx],
                padding="max_length",
                max_length=77,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            x0 = latents[idx].float() * scaling
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
            t = torch.from_numpy(rng.integers(low, low + 100, 32))
            pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=text_encoder(ids)[0]).sample
            target = noise if prediction == "epsilon" else scheduler.get_velocity(x0, noise, t)
            weight = train.loss_weight(snr[t], 5.0, layout_weight, prediction)
            loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
            unet.zero_grad()
            loss.backward()
            losses.append(loss.item())
            norms.append(torch.sqrt(sum((q.grad**2).sum() for q in unet.parameters())).item())
        print(f"| {low}–{low + 99} | {np.mean(losses):.4f} | {np.mean(norms):.3f} |")


if __name__ == "__main__":
    main()
