"""sdlab's inversion and Prompt-to-Prompt side by side with diffusers' community scripts.

The community scripts are run from a folder outside the repository, never vendored or patched:

    git -C /work/.mirror/huggingface+diffusers/repo show HEAD:examples/community/pipeline_null_text_inversion.py \\
        > /tmp/community/pipeline_null_text_inversion.py      # likewise edict_pipeline.py, pipeline_prompt2prompt.py
    python benchmarks/inversion_community.py --community /tmp/community          # everything (17 min on a busy 2-core box)
    python benchmarks/inversion_community.py --community /tmp/community --quick  # 2 images, 6 steps, to /tmp

They are imported with importlib from --community (the commit they came from: --community-commit, recorded).
Where one fails with the installed diffusers, the error is recorded in the results and nothing in it is changed.

What the scripts assume. NullTextPipeline and EDICTPipeline treat the UNet output as epsilon and step DDIM by
t - 1000 / steps (SD 1.x's "leading" spacing); NullTextPipeline encodes at SD 1.x's latent scale 0.18215
(hard-coded; it decodes with the VAE's own scaling_factor) and optimises at w = 7.5 (hard-coded).

Parts.
  sd1        the tiny SD1 pipeline (lab.testing.tiny_sd1_pipeline(seed=0): random weights, epsilon prediction,
             DDIMScheduler with timestep_spacing "leading", steps_offset 1, set_alpha_to_one False, VAE
             scaling_factor 0.18215: SD 1.x's settings, so the scripts' assumptions hold). Rendered TinyWorld
             scenes (64 x 64, the tiny config's native size). Methods, each timed invert + regenerate:
               nt_community         NullTextPipeline.invert (num_inner_steps 10, early_stop_epsilon 1e-5) then
                                    its __call__ (guidance 7.5), as the script's README uses it (UNet weights
                                    requiring gradients, as from_pretrained leaves them)
               nt_community_frozen  the same with pipe.unet.requires_grad_(False) set by the caller
               nt_sdlab             lab.inversion.null_text_inversion (w 7.5, inner_steps 10, epsilon 1e-5) +
                                    reconstruct
               npi_sdlab            lab.inversion.negative_prompt_inversion (w 7.5) + reconstruct
               edict_community      EDICTPipeline(base_prompt = target_prompt = caption, strength 1.0,
                                    guidance 3, mixing 0.93, leapfrog): inversion then regeneration in one call
               edict_sdlab          lab.inversion.edict_inversion (w 3, p 0.93, leapfrog) + reconstruct
  tinyworld  the embedded TinyWorld model (lab.load_pipeline(): v-prediction, zero terminal SNR, "trailing"
             DDIM, scaling_factor 0.421): the same methods (without the frozen variant), to show what the
             scripts produce where their assumptions fail.
  p2p        TinyWorld, generated images: Prompt2PromptPipeline (edit_type "replace", n_cross_replace 0.8,
             n_self_replace 0.4, no local blend) against lab.prompt_to_prompt (edit "replace", cross_steps 0.8,
             self_steps 0.4, self_max_fraction 1.0: the script injects self-attention at every map of at most
             16 x 16 queries, which on TinyWorld's 16 x 16 latent is every map), same seed, steps and guidance 7.5.
             The script draws a separate x_T for each prompt from the generator (batch of 2); it is run that way
             ("documented") and with latents= one x_T shared by both rows ("shared x_T", the reference's way).
             Its pipeline gets its own copy of the model: the script replaces the UNet's attention processors.

Images: rendered TinyWorld scenes (lab.tinyworld.world: sample_scene(seed), render, fixed_caption as the
prompt), seeds 44,000,000 + k (other benchmarks use 10M+, 30M+, 40M+, 41M+, 43M+). Scores of a regenerated
image (uint8 RGB, decoded by lab.diffusion.decode_latents from the method's final latent, which is how both
pipelines decode) against the source render ("vs source") and against the VAE round trip of the latent the
method started from ("vs start": decode(x_0); EDICTPipeline samples its x_0 from the VAE posterior with the
generator, so its own start is that sample, re-drawn here with the same seed): PSNR and SSIM
(skimage.metrics, data_range 255, channel_axis -1), and the latent's mean squared error against that x_0.
On the random tiny SD1 VAE "vs source" is capped by the VAE; "vs start" is the inversion's own error.

Timing: one image at a time, torch.set_num_threads(--threads), wall seconds (time.perf_counter) of the
inversion and of the regeneration; a 2-step warm-up of every method first; the order of the methods is reversed
on every other image. os.getloadavg() is recorded at the start and end of each part. Reported: mean ± standard
deviation over the n images (n with every figure).

Writes <out>/inversion_community.json (every image's numbers), inversion_community.md and
inversion_community.png (TinyWorld reconstructions and the Prompt-to-Prompt edits).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # the scripts' own tqdm bars (sdlab's: progress=False)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from skimage.metrics import peak_signal_noise_ratio, structural_similarity  # noqa: E402

import lab  # noqa: E402
from lab import diffusion, inversion  # noqa: E402
from lab.testing import tiny_sd1_pipeline  # noqa: E402
from lab.tinyworld.world import SHAPES, fixed_caption, render, sample_scene  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEED_BASE = 44_000_000
SCRIPTS = {
    "null_text": "pipeline_null_text_inversion",
    "edict": "edict_pipeline",
    "p2p": "pipeline_prompt2prompt",
}
NT_GUIDANCE = 7.5  # NullTextPipeline's hard-coded w
EDICT_GUIDANCE = 3.0  # EDICTPipeline's default, lab.inversion.edict_inversion's too
EPSILON = 1e-5  # null-text early stop (the paper's notebook; lab's default; the script's default is 1e-6)
INNER_STEPS = 10


# -- helpers ----------------------------------------------------------------------------------


def load_community(folder: Path) -> dict:
    modules = {}
    for key, name in SCRIPTS.items():
        try:
            spec = importlib.util.spec_from_file_location(f"community_{name}", folder / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            modules[key] = module
        except Exception as error:  # recorded, never patched
            modules[key] = error_record(error)
    return modules


def error_record(error: BaseException) -> dict:
    return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=-3)}


def scene(k: int) -> tuple[np.ndarray, str]:
    s = sample_scene(SEED_BASE + k)
    return render(s).image, fixed_caption(s)


def decode(pipe, latent: torch.Tensor) -> np.ndarray:
    return diffusion.decode_latents(pipe, latent.float(), "np")[0]


def image_scores(reference: np.ndarray, image: np.ndarray) -> dict:
    return {
        "psnr": float(peak_signal_noise_ratio(reference, image, data_range=255)),
        "ssim": float(structural_similarity(reference, image, data_range=255, channel_axis=-1)),
    }


def score(pipe, source, start_latent, latent) -> tuple[dict, np.ndarray]:
    image = decode(pipe, latent)
    start = decode(pipe, start_latent)
    out = {
        "vs_source": image_scores(source, image),
        "vs_start": image_scores(start, image),
        "latent_mse": float(((latent.double().cpu() - start_latent.double().cpu()) ** 2).mean()),
        "finite": bool(torch.isfinite(latent).all()),
    }
    return out, image


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    return f"{model}, {os.cpu_count()} cores"


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


# -- the methods ------------------------------------------------------------------------------


class Methods:
    """Every method on one pipeline; each call returns (record, regenerated uint8 image)."""

    def __init__(self, pipe, community: dict, steps: int, workdir: Path):
        self.pipe, self.steps, self.workdir = pipe, steps, workdir
        self.community = community
        components = {k: v for k, v in pipe.components.items()}
        self.nt = self.edict = None
        self.errors = {}
        try:
            module = community["null_text"]
            if isinstance(module, dict):
                raise ImportError(module["error"])
            self.nt = module.NullTextPipeline(**components, requires_safety_checker=False)
            self.nt.set_progress_bar_config(disable=True)
        except Exception as error:
            self.errors["null_text_construct"] = error_record(error)
        try:
            module = community["edict"]
            if isinstance(module, dict):
                raise ImportError(module["error"])
            self.edict = module.EDICTPipeline(
                vae=pipe.vae,
                text_encoder=pipe.text_encoder,
                tokenizer=pipe.tokenizer,
                unet=pipe.unet,
                scheduler=pipe.scheduler,
            )
        except Exception as error:
            self.errors["edict_construct"] = error_record(error)

    def x0(self, image):
        return diffusion.encode_image(self.pipe, image[None]).float()

    # sdlab
    def sdlab(self, function, image, prompt, steps, w, **kwargs):
        start = time.perf_counter()
        inv = function(self.pipe, image, prompt, num_inference_steps=steps, guidance_scale=w, progress=False, **kwargs)
        middle = time.perf_counter()
        _, latent = inv.reconstruct(self.pipe, output_type=None, progress=False)
        end = time.perf_counter()
        record, regenerated = score(self.pipe, image, inv.source_latents, latent)
        record.update(invert_s=middle - start, regenerate_s=end - middle)
        if "inner_steps_taken" in inv.settings:
            record["inner_steps_mean"] = statistics.fmean(inv.settings["inner_steps_taken"])
        return record, regenerated

    def nt_sdlab(self, image, prompt, steps):
        return self.sdlab(
            inversion.null_text_inversion, image, prompt, steps, NT_GUIDANCE, inner_steps=INNER_STEPS, epsilon=EPSILON
        )

    def npi_sdlab(self, image, prompt, steps):
        return self.sdlab(inversion.negative_prompt_inversion, image, prompt, steps, NT_GUIDANCE)

    def edict_sdlab(self, image, prompt, steps):
        return self.sdlab(inversion.edict_inversion, image, prompt, steps, EDICT_GUIDANCE)

    # community
    def nt_community(self, image, prompt, steps, frozen=False):
        if self.nt is None:
            raise RuntimeError(self.errors["null_text_construct"]["error"])
        path = self.workdir / f"source_{time.monotonic_ns()}.png"
        Image.fromarray(image).save(path)
        # the script caches its embeddings at image_path + ".pt" and loads them if present: a fresh path each run
        unet = self.pipe.unet
        was = [p.requires_grad for p in unet.parameters()]
        for p in unet.parameters():
            p.grad = None
        if frozen:
            unet.requires_grad_(False)
        try:
            start = time.perf_counter()
            x_T, uncond = self.nt.invert(
                str(path), prompt, num_inner_steps=INNER_STEPS, early_stop_epsilon=EPSILON, num_inference_steps=steps
            )
            middle = time.perf_counter()
            latent = self.nt(
                prompt, uncond, x_T, num_inference_steps=steps, guidance_scale=NT_GUIDANCE, output_type="latent"
            ).images
            end = time.perf_counter()
        finally:
            for p, flag in zip(unet.parameters(), was):
                p.requires_grad_(flag)
                p.grad = None
            for leftover in (path, Path(str(path) + ".pt")):
                leftover.unlink(missing_ok=True)
        # the script's x_0 is the posterior mean at 0.18215, lab's the mean at the VAE's scaling_factor
        start_latent = self.x0(image) * (0.18215 / self.pipe.vae.config.scaling_factor)
        record, regenerated = score(self.pipe, image, self.x0(image), latent.detach())
        record["vs_own_x0_latent_mse"] = float(((latent.double() - start_latent.double()) ** 2).mean())
        record.update(invert_s=middle - start, regenerate_s=end - middle)
        return record, regenerated

    def nt_community_frozen(self, image, prompt, steps):
        return self.nt_community(image, prompt, steps, frozen=True)

    def edict_community(self, image, prompt, steps, seed):
        if self.edict is None:
            raise RuntimeError(self.errors["edict_construct"]["error"])
        timing = {}
        original = self.edict.prepare_latents  # instrumented on the instance, the script unchanged

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            timing["invert_s"] = time.perf_counter() - t0
            return out

        self.edict.prepare_latents = timed
        try:
            start = time.perf_counter()
            latent = self.edict(
                prompt,
                prompt,
                Image.fromarray(image),
                guidance_scale=EDICT_GUIDANCE,
                num_inference_steps=steps,
                strength=1.0,
                generator=torch.Generator().manual_seed(seed),
                output_type="latent",
            )
            total = time.perf_counter() - start
        finally:
            del self.edict.prepare_latents
        # its x_0: a posterior sample drawn with the generator, re-drawn here the same way
        with torch.no_grad():
            pixels = self.edict.image_processor.preprocess(Image.fromarray(image))
            sample = self.pipe.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(seed))
            own_x0 = sample * self.pipe.vae.config.scaling_factor
        record, regenerated = score(self.pipe, image, own_x0, latent.detach())
        mean_record, _ = score(self.pipe, image, self.x0(image), latent.detach())
        record["vs_posterior_mean"] = mean_record["vs_start"]
        record["vae_sample_vs_mean"] = image_scores(decode(self.pipe, self.x0(image)), decode(self.pipe, own_x0))
        record.update(invert_s=timing.get("invert_s", float("nan")), regenerate_s=total - timing.get("invert_s", 0))
        return record, regenerated

    def vae(self, image, prompt, steps):
        start = time.perf_counter()
        x0 = self.x0(image)
        record, regenerated = score(self.pipe, image, x0, x0)
        record.update(invert_s=time.perf_counter() - start, regenerate_s=0.0)
        return record, regenerated


def run_part(name, pipe, community, images, steps, workdir, frozen_variant, log) -> dict:
    methods = Methods(pipe, community, steps, workdir)
    names = ["nt_community"] + (["nt_community_frozen"] if frozen_variant else [])
    names += ["nt_sdlab", "npi_sdlab", "edict_community", "edict_sdlab"]

    def call(method, k, image, prompt, steps):
        if method == "edict_community":
            return methods.edict_community(image, prompt, steps, SEED_BASE + k)
        return getattr(methods, method)(image, prompt, steps)

    warm_image, warm_prompt = scene(images[0])
    for method in names:  # warm-up, discarded
        try:
            call(method, images[0], warm_image, warm_prompt, 2)
        except Exception:
            pass
    part = {"load_start": load(), "errors": dict(methods.errors), "images": [], "pictures": []}
    for position, k in enumerate(images):
        image, prompt = scene(k)
        record = {"seed": SEED_BASE + k, "prompt": prompt, "methods": {}}
        vae_record, vae_image = methods.vae(image, prompt, steps)
        record["methods"]["vae"] = vae_record
        pictures = {"source": image, "vae": vae_image}
        order = names if position % 2 == 0 else names[::-1]
        for method in order:
            try:
                result, picture = call(method, k, image, prompt, steps)
                record["methods"][method] = result
                pictures[method] = picture
            except Exception as error:
                record["methods"][method] = error_record(error)
                part["errors"].setdefault(method, record["methods"][method])
        part["images"].append(record)
        part["pictures"].append(pictures)
        log(
            f"{name} image {position + 1}/{len(images)}: "
            + ", ".join(
                f"{m} {r['vs_start']['psnr']:.1f} dB {r['invert_s'] + r['regenerate_s']:.1f} s"
                if "vs_start" in r
                else f"{m} ERROR"
                for m, r in record["methods"].items()
            )
        )
    part["load_end"] = load()
    part["methods"] = ["vae", *names]
    return part


def summarise_part(part: dict) -> dict:
    table = {}
    for method in part["methods"]:
        rows = [r["methods"].get(method, {}) for r in part["images"]]
        ok = [row for row in rows if "vs_start" in row]
        if not ok:
            table[method] = {"n": 0}
            continue
        entry = {
            "n": len(ok),
            "finite": sum(row["finite"] for row in ok),
            "psnr_vs_start": summary([row["vs_start"]["psnr"] for row in ok]),
            "ssim_vs_start": summary([row["vs_start"]["ssim"] for row in ok]),
            "psnr_vs_source": summary([row["vs_source"]["psnr"] for row in ok]),
            "ssim_vs_source": summary([row["vs_source"]["ssim"] for row in ok]),
            "latent_mse": summary([row["latent_mse"] for row in ok]),
            "invert_s": summary([row["invert_s"] for row in ok]),
            "regenerate_s": summary([row["regenerate_s"] for row in ok]),
            "total_s": summary([row["invert_s"] + row["regenerate_s"] for row in ok]),
        }
        if "vs_posterior_mean" in ok[0]:
            entry["psnr_vs_posterior_mean"] = summary([row["vs_posterior_mean"]["psnr"] for row in ok])
            entry["vae_sample_vs_mean_psnr"] = summary([row["vae_sample_vs_mean"]["psnr"] for row in ok])
        if "inner_steps_mean" in ok[0]:
            entry["inner_steps_mean"] = summary([row["inner_steps_mean"] for row in ok])
        table[method] = entry
    # per-image time ratios sdlab / community
    ratios = {}
    for sd, cm in (
        ("nt_sdlab", "nt_community"),
        ("nt_sdlab", "nt_community_frozen"),
        ("npi_sdlab", "nt_community"),
        ("npi_sdlab", "nt_sdlab"),
        ("edict_sdlab", "edict_community"),
    ):
        pairs = [
            (r["methods"].get(sd, {}), r["methods"].get(cm, {}))
            for r in part["images"]
            if "invert_s" in r["methods"].get(sd, {}) and "invert_s" in r["methods"].get(cm, {})
        ]
        if pairs:
            ratios[f"{sd}/{cm}"] = {
                "invert": summary([a["invert_s"] / b["invert_s"] for a, b in pairs]),
                "total": summary(
                    [(a["invert_s"] + a["regenerate_s"]) / (b["invert_s"] + b["regenerate_s"]) for a, b in pairs]
                ),
                "psnr_difference_db": summary([a["vs_start"]["psnr"] - b["vs_start"]["psnr"] for a, b in pairs]),
            }
    return {"methods": table, "ratios": ratios}


# -- Prompt-to-Prompt -------------------------------------------------------------------------


def swap_shape(prompt: str) -> tuple[str, str]:
    words = prompt.split()
    for i, word in enumerate(words):
        if word in SHAPES:
            other = next(s for s in ("star", "heart", "circle", "square", "triangle", "cross") if s != word)
            target = words.copy()
            target[i] = other
            return prompt, " ".join(target)
    raise ValueError(prompt)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


def run_p2p(pipe, community, edits, steps, log) -> dict:
    part = {"load_start": load(), "edits": [], "pictures": [], "errors": {}}
    module = community["p2p"]
    p2p_pipe = None
    try:
        if isinstance(module, dict):
            raise ImportError(module["error"])
        own = lab.load_pipeline()  # its own UNet: the script replaces the attention processors
        p2p_pipe = module.Prompt2PromptPipeline(**own.components, requires_safety_checker=False)
        p2p_pipe.set_progress_bar_config(disable=True)
    except Exception as error:
        part["errors"]["construct"] = error_record(error)
    kwargs = {"edit_type": "replace", "n_cross_replace": 0.8, "n_self_replace": 0.4}
    common = {"num_inference_steps": steps, "guidance_scale": NT_GUIDANCE}

    def lab_edit(source, target, seed):
        return lab.prompt_to_prompt(
            pipe,
            source,
            target,
            edit="replace",
            cross_steps=0.8,
            self_steps=0.4,
            self_max_fraction=1.0,
            progress=False,
            generator=torch.Generator().manual_seed(seed),
            **common,
        ).image_arrays

    def community_edit(source, target, seed, shared):
        latents = None
        if shared:
            x_T = pipe.prepare_latents(1, 4, 64, 64, torch.float32, "cpu", torch.Generator().manual_seed(seed))
            latents = x_T.expand(2, -1, -1, -1).clone()
        out = p2p_pipe(
            [source, target],
            generator=torch.Generator().manual_seed(seed),
            latents=latents,
            output_type="np",
            cross_attention_kwargs=dict(kwargs),
            **common,
        )
        return to_uint8(out.images)

    if p2p_pipe is not None:  # warm-up
        for fn in (
            lambda: lab_edit("a red circle", "a red star", 0),
            lambda: community_edit("a red circle", "a red star", 0, True),
        ):
            try:
                fn()
            except Exception:
                pass
    for j in range(edits):
        source, target = swap_shape(scene(j)[1])
        seed = j
        record = {"source_prompt": source, "target_prompt": target, "seed": seed}
        plain = pipe(source, generator=torch.Generator().manual_seed(seed), output_type="np", **common).images
        plain = to_uint8(plain)[0]
        pictures = {"plain": plain}
        runs = [("sdlab", lambda s=source, t=target, n=seed: lab_edit(s, t, n))]
        if p2p_pipe is not None:
            runs += [
                ("community_documented", lambda s=source, t=target, n=seed: community_edit(s, t, n, False)),
                ("community_shared", lambda s=source, t=target, n=seed: community_edit(s, t, n, True)),
            ]
        for name, fn in runs if j % 2 == 0 else runs[::-1]:
            try:
                start = time.perf_counter()
                images = fn()
                seconds = time.perf_counter() - start
                record[name] = {
                    "seconds": seconds,
                    "source_max_abs_vs_plain": int(np.abs(images[0].astype(int) - plain.astype(int)).max()),
                    "source_psnr_vs_plain": image_scores(plain, images[0])["psnr"],
                    "edit_vs_own_source": image_scores(images[0], images[1]),
                }
                pictures[name] = images
            except Exception as error:
                record[name] = error_record(error)
                part["errors"].setdefault(name, record[name])
        if "sdlab" in pictures and "community_shared" in pictures:
            record["edit_sdlab_vs_community_shared"] = image_scores(
                pictures["sdlab"][1], pictures["community_shared"][1]
            )
            record["edit_sdlab_vs_community_shared"]["max_abs"] = int(
                np.abs(pictures["sdlab"][1].astype(int) - pictures["community_shared"][1].astype(int)).max()
            )
        part["edits"].append(record)
        part["pictures"].append(pictures)
        log(
            f"p2p edit {j + 1}/{edits}: {source!r} -> {target!r}: "
            + json.dumps(
                {
                    k: (v.get("seconds"), v.get("source_max_abs_vs_plain"))
                    for k, v in record.items()
                    if isinstance(v, dict) and "seconds" in v
                }
            )
        )
    part["load_end"] = load()
    summary_ = {}
    for name in ("sdlab", "community_documented", "community_shared"):
        rows = [r[name] for r in part["edits"] if "seconds" in r.get(name, {})]
        if rows:
            summary_[name] = {
                "seconds": summary([r["seconds"] for r in rows]),
                "source_max_abs_vs_plain": summary([r["source_max_abs_vs_plain"] for r in rows]),
                "edit_psnr_vs_own_source": summary([r["edit_vs_own_source"]["psnr"] for r in rows]),
            }
    rows = [r["edit_sdlab_vs_community_shared"] for r in part["edits"] if "edit_sdlab_vs_community_shared" in r]
    if rows:
        summary_["edit_sdlab_vs_community_shared"] = {
            "psnr": summary([r["psnr"] for r in rows]),
            "ssim": summary([r["ssim"] for r in rows]),
            "max_abs": summary([r["max_abs"] for r in rows]),
        }
    part["summary"] = summary_
    return part


# -- figure and markdown ----------------------------------------------------------------------


def figure(tinyworld: dict | None, p2p: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    if tinyworld:
        columns = ["source", "vae", "nt_sdlab", "nt_community", "npi_sdlab", "edict_sdlab", "edict_community"]
        for record, pictures in zip(tinyworld["images"], tinyworld["pictures"]):
            cells = []
            for c in columns:
                m = record["methods"].get(c, {})
                label = c if "vs_source" not in m or c == "source" else f"{c}\n{m['vs_source']['psnr']:.1f} dB"
                cells.append((pictures.get(c), label))
            rows.append(cells)
    if p2p:
        for pictures in p2p["pictures"]:
            cells = [(pictures["plain"], "pipe(source)")]
            for name in ("sdlab", "community_shared", "community_documented"):
                if name in pictures:
                    cells += [(pictures[name][0], f"{name}\nsource"), (pictures[name][1], f"{name}\n→ target")]
            rows.append(cells)
    if not rows:
        return
    width = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(1.6 * width, 1.75 * len(rows)), squeeze=False)
    for i, cells in enumerate(rows):
        for j in range(width):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(cells) and cells[j][0] is not None:
                ax.imshow(cells[j][0])
                ax.set_title(cells[j][1], fontsize=6)
    fig.suptitle(
        "TinyWorld: reconstructions (PSNR vs source) and Prompt-to-Prompt replace edits (last rows)", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cell(stats: dict, digits: int = 2) -> str:
    if not stats or stats.get("n", 0) == 0:
        return "—"
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"


def mse(stats: dict) -> str:
    return f"{stats['mean']:.3g}" if stats.get("n") else "not finite"


def part_table(name: str, part: dict) -> list[str]:
    table = part["summary"]["methods"]
    lines = [
        "| method | n | finite | PSNR vs start (dB) | SSIM vs start | PSNR vs source (dB) | latent MSE | "
        "invert (s) | regenerate (s) | total (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in part["methods"]:
        row = table.get(method, {"n": 0})
        if row["n"] == 0:
            error = next(
                (r["methods"][method]["error"] for r in part["images"] if "error" in r["methods"].get(method, {})), ""
            )
            lines.append(f"| `{method}` | 0 | | failed: {error[:200]} | | | | | | |")
            continue
        psnr = "∞ (x_0 itself)" if method == "vae" else cell(row["psnr_vs_start"])
        lines.append(
            f"| `{method}` | {row['n']} | {row['finite']}/{row['n']} | {psnr} | "
            f"{cell(row['ssim_vs_start'], 4)} | {cell(row['psnr_vs_source'])} | {mse(row['latent_mse'])} | "
            f"{cell(row['invert_s'])} | {cell(row['regenerate_s'])} | {cell(row['total_s'])} |"
        )
    return lines


def ratio_lines(part: dict) -> list[str]:
    lines = [
        "| sdlab / community, per image | n | invert time ratio | total time ratio | PSNR difference (dB) |",
        "|---|---|---|---|---|",
    ]
    for key, r in part["summary"]["ratios"].items():
        lines.append(
            f"| `{key}` | {r['total']['n']} | {cell(r['invert'], 3)} | {cell(r['total'], 3)} | "
            f"{cell(r['psnr_difference_db'])} |"
        )
    return lines


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    lines = [
        "# Inversion and Prompt-to-Prompt: sdlab against diffusers' community scripts\n",
        f"Written by `benchmarks/inversion_community.py` (protocol in its docstring): `{meta['command']}`, "
        f"{meta['date']}, {meta['wall_s']:.0f} s. {meta['machine']}, {meta['threads']} torch thread(s), torch "
        f"{meta['torch']}, diffusers {meta['diffusers']}; community scripts from huggingface/diffusers "
        f"{meta['community_commit']} (examples/community, run unchanged from `--community`). "
        f"{meta['steps']} DDIM steps everywhere; null-text and negative-prompt at w = {NT_GUIDANCE:g} "
        f"(the null-text script's hard-coded w), {INNER_STEPS} inner steps, early stop {EPSILON:g} + i 2e-5 on both "
        f"sides; EDICT at w = {EDICT_GUIDANCE:g}, p = 0.93, leapfrog. Mean ± sd over n images.\n",
        'PSNR / SSIM "vs start": the regenerated image against the decoded latent the method started from '
        '(its VAE round trip: the inversion\'s own error); "vs source": against the rendered image. '
        "Latent MSE: the regenerated latent against that start latent.\n",
    ]
    for key, title in (
        ("sd1", 'Tiny SD1 (epsilon, DDIM "leading", scaling 0.18215): the scripts\' home ground'),
        ("tinyworld", 'TinyWorld (v-prediction, zero terminal SNR, "trailing", scaling 0.421)'),
    ):
        part = results.get(key)
        if not part:
            continue
        n = len(part["images"])
        lines += [
            f"## {title}\n",
            f"{n} rendered images, seeds {SEED_BASE + part['first']:,} to {SEED_BASE + part['first'] + n - 1:,}; "
            f"load average {part['load_start']} at the start, {part['load_end']} at the end.\n",
            *part_table(key, part),
            "",
            *ratio_lines(part),
            "",
        ]
        extra = part["summary"]["methods"]
        if extra.get("edict_community", {}).get("n"):
            e = extra["edict_community"]
            lines.append(
                f"`edict_community` starts from a VAE posterior *sample* (its generator), not the mean: against the "
                f"posterior mean's round trip it scores {cell(e['psnr_vs_posterior_mean'])} dB; the sample's own "
                f"decode differs from the mean's by {cell(e['vae_sample_vs_mean_psnr'])} dB PSNR.\n"
            )
        for method in ("nt_sdlab",):
            if extra.get(method, {}).get("n"):
                lines.append(
                    f"`nt_sdlab` took {cell(extra[method]['inner_steps_mean'])} inner Adam steps per denoising "
                    "step on average (at most 10).\n"
                )
        if part["errors"]:
            lines.append("Errors: " + "; ".join(f"`{k}`: {v['error'][:300]}" for k, v in part["errors"].items()) + "\n")
    p2p = results.get("p2p")
    if p2p:
        lines += [
            "## Prompt-to-Prompt on TinyWorld (generated images)\n",
            f"{len(p2p['edits'])} edits (a shape word of a TinyWorld caption swapped), seeds 0 to "
            f"{len(p2p['edits']) - 1}, load average {p2p['load_start']} → {p2p['load_end']}. "
            "`source max |Δ|`: the edit's source row against `pipe(source, generator=seed)` (uint8).\n",
            "| run | n | time (s) | source max \\|Δ\\| vs plain | edit PSNR vs its own source (dB) |",
            "|---|---|---|---|---|",
        ]
        for name, row in p2p["summary"].items():
            if name.startswith("edit_"):
                continue
            lines.append(
                f"| `{name}` | {row['seconds']['n']} | {cell(row['seconds'])} | "
                f"{cell(row['source_max_abs_vs_plain'], 1)} | {cell(row['edit_psnr_vs_own_source'])} |"
            )
        both = p2p["summary"].get("edit_sdlab_vs_community_shared")
        if both:
            psnr = "∞ (identical)" if both["max_abs"].get("max") == 0 else f"{cell(both['psnr'])} dB"
            lines.append(
                f"\nsdlab's edit against the script's (shared x_T), uint8: PSNR {psnr}, SSIM "
                f"{cell(both['ssim'], 4)}, max |Δ| {cell(both['max_abs'], 1)} (n = {both['max_abs']['n']}).\n"
            )
        for e in p2p["edits"]:
            lines.append(f"- seed {e['seed']}: {e['source_prompt']!r} → {e['target_prompt']!r}")
        if p2p["errors"]:
            lines.append("\nErrors: " + "; ".join(f"`{k}`: {v['error'][:300]}" for k, v in p2p["errors"].items()))
    lines += ["", "![reconstructions and edits](inversion_community.png)", ""]
    if results.get("notes"):
        lines += ["## What it means\n", results["notes"], ""]
    path.write_text("\n".join(lines) + "\n")


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--community", type=Path, required=True, help="folder with the three community .py files")
    p.add_argument("--community-commit", default="unknown", help="the diffusers commit they came from (recorded)")
    p.add_argument("--parts", default="sd1,tinyworld,p2p")
    p.add_argument("--sd1-images", type=int, default=6)
    p.add_argument("--tw-images", type=int, default=4)
    p.add_argument("--p2p-edits", type=int, default=3)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50, the scripts' default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 images, 6 steps, to /tmp/sdlab-inversion-community")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--notes", type=Path, default=None, help="a text file whose contents go under 'What it means'")
    p.add_argument("--markdown-only", action="store_true", help="rewrite the .md (and notes) from the .json")
    args = p.parse_args()
    if args.markdown_only:
        out = args.out or RESULTS
        results = json.loads((out / "inversion_community.json").read_text())
        if args.notes and args.notes.exists():
            results["notes"] = args.notes.read_text().strip()
            (out / "inversion_community.json").write_text(json.dumps(results, indent=1, default=str))
        write_markdown(results, out / "inversion_community.md")
        return
    if args.quick:
        args.sd1_images, args.tw_images, args.p2p_edits, args.steps = 2, 2, 1, 6
    out = args.out or (Path("/tmp/sdlab-inversion-community") if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    community = load_community(args.community)
    started, load_start = time.perf_counter(), load()

    def log(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    results = {
        "meta": {
            "command": " ".join(["python", "benchmarks/inversion_community.py", *sys.argv[1:]]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "community_commit": args.community_commit,
            "load_start": load_start,
            "steps": args.steps,
            "null_text_guidance": NT_GUIDANCE,
            "edict_guidance": EDICT_GUIDANCE,
            "epsilon": EPSILON,
            "seed_base": SEED_BASE,
        },
        "community_import_errors": {k: v for k, v in community.items() if isinstance(v, dict)},
    }
    pictures = {}
    with tempfile.TemporaryDirectory() as workdir:
        if "sd1" in parts:
            pipe = tiny_sd1_pipeline(seed=0)
            pipe.set_progress_bar_config(disable=True)
            config = pipe.scheduler.config
            assert type(pipe.scheduler).__name__ == "DDIMScheduler" and config.timestep_spacing == "leading"
            assert config.prediction_type == "epsilon" and pipe.vae.config.scaling_factor == 0.18215
            part = run_part("sd1", pipe, community, list(range(args.sd1_images)), args.steps, Path(workdir), True, log)
            part["first"] = 0
            part["scheduler"] = {k: v for k, v in dict(config).items() if not k.startswith("_")}
            results["sd1"] = part
        if "tinyworld" in parts or "p2p" in parts:
            tw = lab.load_pipeline()
            tw.set_progress_bar_config(disable=True)
        if "tinyworld" in parts:
            first = 100  # other images than the tiny SD1 part's
            images = list(range(first, first + args.tw_images))
            part = run_part("tinyworld", tw, community, images, args.steps, Path(workdir), False, log)
            part["first"] = first
            results["tinyworld"] = part
        if "p2p" in parts:
            results["p2p"] = run_p2p(tw, community, args.p2p_edits, args.steps, log)
    for key in ("sd1", "tinyworld"):
        if key in results:
            results[key]["summary"] = summarise_part(results[key])
            pictures[key] = results[key].pop("pictures")
    if "p2p" in results:
        pictures["p2p"] = results["p2p"].pop("pictures")
    results["meta"]["wall_s"] = time.perf_counter() - started
    results["meta"]["load_end"] = load()
    if args.notes and args.notes.exists():
        results["notes"] = args.notes.read_text().strip()
    figure(
        {**results["tinyworld"], "pictures": pictures["tinyworld"]} if "tinyworld" in results else None,
        {**results["p2p"], "pictures": pictures["p2p"]} if "p2p" in results else None,
        out / "inversion_community.png",
    )
    (out / "inversion_community.json").write_text(json.dumps(results, indent=1, default=str))
    write_markdown(results, out / "inversion_community.md")
    print(f"wrote {out}/inversion_community.json, .md, .png")


if __name__ == "__main__":
    main()
