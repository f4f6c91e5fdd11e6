# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
#   sdlab:
#     profiles:
#       fast:
#         sweep_timesteps:
#         - 0
#         - 261
#         - 801
#         sweep_blocks:
#         - up_blocks.1
#         sweep_pairs: 1
#         pck_pairs: 1
# ---

# %% [markdown]
# # Correspondence: DIFT, the same part found in another image
#
# Click the top tip of a red star; where is the top tip of a small, striped, yellow star on grass? A
# diffusion model was never trained to answer that, yet its UNet's internal features answer it well:
# this is **DIFT** (*diffusion features*). This notebook follows the paper on TinyWorld, whose images
# come with the true position of every keypoint, so what the features find can be checked:
#
# 1. the **images** and their ground-truth keypoints;
# 2. **what the features are**: noise the image to timestep $t$, run the UNet once, read an up block;
# 3. **matching**: cosine similarity and its best pixel, by hand and with `lab.dift`;
# 4. **why the timestep matters**: PCK as $t$ goes from clean to pure noise, per block;
# 5. **against baselines**: raw pixels and the VAE latent, on a handful of pairs;
# 6. the **correspondence explorer** widget: click a point, see its matches.
#
# Reference: Tang, Jia, Wang, Chen, Hariharan, [*Emergent Correspondence from Image
# Diffusion*](https://arxiv.org/abs/2306.03881), NeurIPS 2023. Code: `lab/dift.py`.

# %% tags=["parameters"]
# Parameters: change them and run the notebook again. (CI runs a fast profile: fewer timesteps, blocks
# and pairs in sections 4 and 5.)
model = None  # None: the embedded TinyWorld model; or the Hugging Face id / folder of an SD 1.x/2.x/XL model
device = "cpu"
shape = "star"  # the TinyWorld shape class of the images: circle, square, triangle, star, heart, cross
timestep = None  # None: the pipeline's preset (lab.dift.PRESETS); the paper uses 261 on SD 2.1
blocks = None  # None: the preset's block(s); or one block name, or a list (their features are concatenated)
prompt_template = "a {}"  # the prompt, {} standing for the shape class; "" for the empty prompt
ensemble = 8  # noise draws averaged (the paper: 8)
seed = 0
# Section 4: PCK@0.1 at each timestep and block, on `sweep_pairs` pairs of every shape class.
sweep_timesteps = [0, 50, 101, 261, 401, 601, 801, 999]
sweep_blocks = ["down_blocks.0", "up_blocks.0", "up_blocks.1", "up_blocks.2"]
sweep_pairs = 2
# Section 5: DIFT against raw pixels and the VAE latent, on `pck_pairs` pairs of every shape class.
pck_pairs = 3

# %%
from functools import partial

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import lab
import lab.dift
import widgets
from lab.tinyworld import world
from widgets.correspondence import tinyworld_images, tinyworld_labels

pipe = lab.load_pipeline(model, device=device)
pipe.set_progress_bar_config(disable=True)
preset = lab.dift.PRESETS[lab.dift.preset_for(pipe)]
timestep = preset["timestep"] if timestep is None else timestep
blocks = list(preset["blocks"]) if blocks is None else [blocks] if isinstance(blocks, str) else list(blocks)
block_label = "+".join(blocks)
# The paper prompts "a photo of a {class}" when the class is known, "" otherwise; TinyWorld's captions say "a star".
prompt = prompt_template.format(shape)
print(f"preset {lab.dift.preset_for(pipe)!r}: t = {preset['timestep']}, {'+'.join(preset['blocks'])}")
print(f"used here: t = {timestep}, {block_label}, ensemble {ensemble}, prompt {prompt!r}")

# The model's own image size: TinyWorld renders are 64x64; a bigger model gets them upscaled (and the
# keypoints scaled with them).
native = pipe.unet.config.sample_size * pipe.vae_scale_factor
scale = native / world.IMAGE_SIZE


def for_the_model(rendered):
    """(image, keypoints of its first object, its mask) at the model's size."""
    image, mask = Image.fromarray(rendered.image), Image.fromarray(rendered.masks[0])
    if scale != 1:
        image, mask = image.resize((native, native), Image.BICUBIC), mask.resize((native, native), Image.NEAREST)
    points = {name: (x * scale, y * scale) for name, (x, y) in rendered.keypoints[0].items()}
    return np.asarray(image), points, np.asarray(mask)


# %% [markdown]
# ## 1. The images
#
# Four TinyWorld renders of one shape class: a source (large, red, plain, on a plain background) and
# three targets that differ from it in colour, size, position, texture and background. Every shape
# class has named keypoints (a star's centre and five tips); the render knows where they are.

# %%
renders = tinyworld_images(shape)
labels = tinyworld_labels(shape)
images, keypoints, masks = zip(*(for_the_model(rendered) for rendered in renders))
figure, axes = plt.subplots(1, len(images), figsize=(2.8 * len(images), 3))
for ax, image, points, label in zip(axes, images, keypoints, labels):
    ax.imshow(image)
    for name, (x, y) in points.items():
        ax.plot(x, y, "o", ms=5, mfc="white", mec="black")
        ax.annotate(name, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6)
    ax.set_title(label, fontsize=8)
    ax.axis("off")
figure.tight_layout()

# %% [markdown]
# ## 2. What the features are
#
# DIFT reads the UNet at one moment of the *forward* (noising) process, on a real image $x$:
#
# $$z_0 = \mathcal{E}(x), \qquad x_t = \sqrt{\bar\alpha_t}\, z_0 + \sqrt{1-\bar\alpha_t}\,\epsilon_k, \qquad
# F(x) = \frac{1}{E}\sum_{k=1}^{E} \mathrm{UNet}_b(x_t, t, c)$$
#
# - $\mathcal{E}$ is the VAE encoder, $t$ an integer training timestep, $\bar\alpha_t$ its share of
#   signal (the scheduler's), $\epsilon_k$ Gaussian noise;
# - $\mathrm{UNet}_b$ is the output of one block $b$ of the denoiser (the paper reads an **up block**),
#   given the prompt $c$; with several blocks, each one's features are L2-normalised and concatenated;
# - the **ensemble**: $E$ noise draws, averaged, so that the features do not depend on one draw.
#
# No denoising loop, no generation: one UNet pass per image and draw, stopped right after block $b$.
# `lab.dift.extract` does exactly this through lab's hooks:

# %%
features = lab.dift.extract(
    pipe, list(images), prompt=prompt, timestep=timestep, blocks=blocks, ensemble=ensemble, seed=seed, progress=False
)
features

# %% [markdown]
# One feature vector per cell of the block's grid. To see what they encode, upsample them to the pixels,
# keep the pixels of each star, take away each star's mean vector (what the whole instance has in
# common: its colour, its size...), and project what is left onto its first three principal components,
# shown as red, green and blue — the same projection for all four stars. If the features say *which
# part of the shape* a pixel is, the same parts get the same colours on every star, whatever its colour,
# size and texture.

# %%
height, width = features.image_size
upsampled = F.normalize(F.interpolate(features.features, size=(height, width), mode="bilinear"), dim=1)
inside = torch.from_numpy(np.stack(masks))  # (images, height, width): the stars' pixels
per_pixel = upsampled.permute(0, 2, 3, 1).clone()  # (images, height, width, channels)
for index in range(len(images)):
    per_pixel[index] -= per_pixel[index][inside[index]].mean(dim=0)
_, _, components = torch.linalg.svd(per_pixel[inside], full_matrices=False)
projected = per_pixel @ components[:3].T
low, high = projected[inside].min(dim=0).values, projected[inside].max(dim=0).values
colours = ((projected - low) / (high - low)).clamp(0, 1)
colours[~inside] = 0.92  # the background, light grey
figure, axes = plt.subplots(2, len(images), figsize=(2.4 * len(images), 4.8))
for column, (image, picture) in enumerate(zip(images, colours)):
    axes[0, column].imshow(image)
    axes[1, column].imshow(picture.numpy())
    for row in range(2):
        axes[row, column].axis("off")
axes[1, 0].set_title(f"{block_label}: 3 principal components", fontsize=8, loc="left")
figure.tight_layout()

# %% [markdown]
# ## 3. Matching: cosine similarity and its best pixel
#
# A point $p$ of the source matches, in a target, the pixel $q$ whose feature points the same way:
#
# $$q^\star = \arg\max_q \frac{\langle F_{\text{src}}(p),\, F_{\text{tgt}}(q) \rangle}{\lVert F_{\text{src}}(p)\rVert\,\lVert F_{\text{tgt}}(q)\rVert}$$
#
# with both feature maps upsampled (bilinearly) to the image's pixels, as the reference code does (the
# `upsampled` features above, normalised to unit length: the cosine is a dot product). By hand, for the
# source's top tip, against every target pixel:

# %%
source_points = keypoints[0]
query_name = next(name for name in source_points if name != "center")
query = source_points[query_name]
x, y = (int(value) for value in query)  # the pixel the point is in
by_hand = torch.einsum("c,nchw->nhw", upsampled[0, :, y, x], upsampled[1:])
with_lab = lab.dift.similarity(features, query, target_index=[1, 2, 3])
print("largest difference from lab.dift.similarity:", float((by_hand - with_lab).abs().max()))

figure, axes = plt.subplots(1, len(images), figsize=(2.8 * len(images), 3))
axes[0].imshow(images[0])
axes[0].plot(*query, "o", ms=9, mfc="none", mec="white", mew=2)
axes[0].set_title(f"source: {query_name}", fontsize=8)
for ax, image, heat, points in zip(axes[1:], images[1:], with_lab, keypoints[1:]):
    row, column = divmod(int(heat.argmax()), width)
    ax.imshow(image)
    ax.imshow(heat, cmap="jet", alpha=0.55)
    ax.plot(column + 0.5, row + 0.5, "o", ms=9, mfc="none", mec="white", mew=2)
    ax.plot(*points[query_name], "s", ms=6, mfc="none", mec="black", mew=1.5)
    ax.set_title(f"cosine, best {float(heat.max()):.2f}", fontsize=8)
for ax in axes:
    ax.axis("off")
figure.tight_layout()

# %% [markdown]
# Ring: the best match; square: where the keypoint really is. `lab.dift.match_points` matches many points
# at once: every keypoint of the source, into each target. A match counts as correct when it lands
# within $\alpha = 0.1$ of the image size of the truth (**PCK@0.1**, the paper's measure; 6.4 px here).

# %%
names = list(source_points)
where, scores = lab.dift.match_points(features, [source_points[name] for name in names], target_index=[1, 2, 3])
threshold = 0.1 * max(height, width)


def error(matched, truth):
    """Distance in pixels from a matched pixel's centre to the true position."""
    return float(np.hypot(matched[0] + 0.5 - truth[0], matched[1] + 0.5 - truth[1]))


figure, axes = plt.subplots(1, 3, figsize=(12, 4))
for ax, target, target_where in zip(axes, [1, 2, 3], where):
    pair = np.concatenate([images[0], images[target]], axis=1)
    ax.imshow(pair)
    hits = 0
    for name, matched in zip(names, target_where.tolist()):
        correct = error(matched, keypoints[target][name]) <= threshold
        hits += correct
        x0, y0 = source_points[name]
        ax.plot([x0, matched[0] + 0.5 + width], [y0, matched[1] + 0.5], "-", color="lime" if correct else "red", lw=1.5)
    ax.set_title(f"target {target}: {hits}/{len(names)} within {threshold:.1f} px", fontsize=9)
    ax.axis("off")
figure.tight_layout()

# %% [markdown]
# ## 4. Why the timestep matters
#
# $t$ sets how much of the image the UNet still sees, and so what its features have to describe. Near
# $t = 0$ the input is almost clean: the UNet has little to infer, and its features can stay close to
# what the pixels look like. Near $t = 1000$ almost nothing of the image is left to describe. In between,
# the UNet must infer the image from a noisy copy, and what it infers is the **structure** — which part of
# which object — rather than exact pixel values. The paper sweeps $t$ on SPair-71k (semantic
# correspondence: different instances of a class, as here) and finds SD 2.1's best matches at a middle
# timestep, $t = 261$. What the UNet is given, at a few timesteps:

# %%
mean, _ = lab.diffusion.latent_distribution(pipe, images[2])
noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
shown = [0, 261, 601, 999]
noisy = torch.cat([lab.diffusion.add_noise(pipe.scheduler, mean, noise, t) for t in shown])
decoded = lab.diffusion.decode_latents(pipe, noisy)
figure, axes = plt.subplots(1, len(shown), figsize=(2.4 * len(shown), 2.6))
for ax, picture, t in zip(axes, decoded, shown):
    signal = float(lab.diffusion.alpha_bar(pipe.scheduler, t).sqrt())
    ax.imshow(picture)
    ax.set_title(f"t = {t}: √ᾱ = {signal:.2f}", fontsize=8)
    ax.axis("off")
figure.tight_layout()

# %% [markdown]
# The same sweep on TinyWorld: PCK@0.1 of every keypoint, on `sweep_pairs` pairs of *every* shape
# class (two random instances each, seeds 5000 and up), for each timestep and block: the three up blocks
# the paper considers, and the first down block.


# %%
def pair_of(shape_name, index, base=5000):
    """Two random single-object renders of one class: (source, target), each (image, keypoints)."""
    number = world.SHAPES.index(shape_name) * 100 + index
    scenes = [world.sample_scene(base + 2 * number + k, n_objects=1, shape=shape_name) for k in (0, 1)]
    return [for_the_model(world.render(scene)) for scene in scenes]


def pck_of(make_features, pairs):
    """(correct, total) over every keypoint of every pair; make_features(shape, [image, image])."""
    correct = total = 0
    for shape_name, (source, target) in pairs:
        pair_features = make_features(shape_name, [source[0], target[0]])
        pair_names = list(source[1])
        found, _ = lab.dift.match_points(pair_features, [source[1][n] for n in pair_names], target_index=1)
        for name, matched in zip(pair_names, found[0].tolist()):
            correct += error(matched, target[1][name]) <= threshold
            total += 1
    return correct, total


def dift_at(shape_name, pair, t=timestep, block_name=blocks):
    """DIFT features of a pair (the prompt names its class, per prompt_template)."""
    return lab.dift.extract(
        pipe,
        pair,
        prompt=prompt_template.format(shape_name),
        timestep=t,
        blocks=block_name,
        ensemble=ensemble,
        seed=seed,
        progress=False,
    )


sweep_set = [(name, pair_of(name, i)) for name in world.SHAPES for i in range(sweep_pairs)]
sweep = {}
for sweep_block in sweep_blocks:
    for t in sweep_timesteps:
        correct, total = pck_of(partial(dift_at, t=t, block_name=sweep_block), sweep_set)
        sweep[sweep_block, t] = correct / total
print(f"{len(sweep_set)} pairs, {total} keypoints per setting")

plt.figure(figsize=(6, 3.5))
for sweep_block in sweep_blocks:
    plt.plot(sweep_timesteps, [sweep[sweep_block, t] for t in sweep_timesteps], "o-", label=sweep_block)
plt.axvline(timestep, color="gray", ls=":", label=f"preset t = {timestep}")
plt.xlabel("timestep t")
plt.ylabel("PCK@0.1")
plt.ylim(0, 1)
plt.legend(fontsize=8)
plt.title(f"DIFT on TinyWorld ({len(sweep_set)} pairs)", fontsize=9)
plt.tight_layout()

# %% [markdown]
# What to look for (the full profile, 2 pairs per class; the fast one is a single pair per class and
# noisier): past $t \approx 600$ the matches collapse — by $t = 800$ little is found, as in the paper's
# curve at high noise (this model's schedule ends at zero signal: at $t = 999$ nothing of the image is
# left). Below that, on these clean, simple renders the curve is nearly flat: unlike on photographs, the
# rise from $t = 0$ to the middle is within a few keypoints. **Which block** matters more. Among the up
# blocks, the middle one beats the fine last one and, by far, the coarse first one — the trade-off
# between what a feature knows (coarse) and how precisely it is placed (fine) that made the paper pick
# SD 2.1's second up block. And the first *down* block, which the paper does not read, is as good as the
# best up block here: on flat shapes, the UNet's first 8×8 features already say where a shape's parts
# are. A handful of pairs is noisy: the measurement behind the embedded model's preset is the benchmark
# linked at the end of section 5.

# %%
for sweep_block in sweep_blocks:
    best = max(sweep_timesteps, key=lambda t: sweep[sweep_block, t])
    print(
        f"{sweep_block}: best t = {best} (PCK@0.1 {sweep[sweep_block, best]:.2f}); at t = {sweep_timesteps[-1]}: "
        f"{sweep[sweep_block, sweep_timesteps[-1]]:.2f}"
    )

# %% [markdown]
# ## 5. Against baselines
#
# Is the UNet needed at all? Three baselines go through the same matching (cosine, best pixel):
#
# - **the pixel's colour**: its RGB values, so a point matches the pixel of most similar colour;
# - **pixel patches**: the 21×21 patch of luminance around each pixel with its mean taken away (cosine is
#   then normalised cross-correlation: classic template matching, blind to colour and brightness);
# - **the VAE latent** $z_0$: what the UNet starts from, 4 channels on the latent grid
#   (`pipe.vae_scale_factor` times coarser than the image).


# %%
def as_features(tensor, images_of_pair, name):
    """Any (n, channels, h, w) tensor as lab.dift.DiftFeatures, so that lab.dift's matching applies."""
    arrays = np.stack(images_of_pair)
    settings = {"timestep": 0, "blocks": [name], "ensemble": 1, "prompts": [""] * len(arrays)}
    return lab.dift.DiftFeatures(tensor.float(), arrays.shape[1:3], settings, arrays)


def pixel_colour(shape_name, pair):
    pixels = torch.from_numpy(np.stack(pair)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return as_features(pixels, pair, "pixel colour")


def pixel_patches(shape_name, pair, size=21):
    pixels = torch.from_numpy(np.stack(pair)).permute(0, 3, 1, 2).float() / 127.5 - 1
    luminance = (pixels * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(dim=1, keepdim=True)
    padded = F.pad(luminance, (size // 2,) * 4, mode="replicate")
    patches = F.unfold(padded, size).reshape(len(pair), size * size, *luminance.shape[-2:])
    return as_features(patches - patches.mean(dim=1, keepdim=True), pair, "pixel patches")


def vae_latent(shape_name, pair):
    latent = torch.cat([lab.diffusion.latent_distribution(pipe, image)[0] for image in pair])
    return as_features(latent, pair, "VAE latent")


pck_set = [(name, pair_of(name, i, base=6000)) for name in world.SHAPES for i in range(pck_pairs)]
methods = {
    "pixel colour": pixel_colour,
    "pixel patches (21×21)": pixel_patches,
    "VAE latent": vae_latent,
    f"DIFT (t = {timestep}, {block_label})": dift_at,
}
scores = {label: pck_of(make, pck_set) for label, make in methods.items()}
for label, (correct, total) in scores.items():
    print(f"{label:32s} PCK@0.1 {correct:3d}/{total} = {correct / total:.2f}")

plt.figure(figsize=(5.5, 2.8))
plt.barh(list(scores), [correct / total for correct, total in scores.values()], color=["gray"] * 3 + ["C0"])
plt.gca().invert_yaxis()
plt.xlim(0, 1)
plt.xlabel(f"PCK@0.1 ({len(pck_set)} pairs, {total} keypoints)")
plt.tight_layout()

# %% [markdown]
# Colour is what changes between our instances, so a pixel's colour finds almost nothing: a red star's
# tip looks nothing like a yellow star's. The VAE latent is a compressed colour image and does little
# better. DIFT's features are far less swayed by colour and texture: they find the part.
#
# But look at the patches. TinyWorld's objects are flat shapes with sharp outlines, and a template of the
# outline around a point, compared up to brightness, locates a star's tip well: on these renders a
# classic patch matcher is a **strong** baseline, not a straw man — within one class it can match or
# beat DIFT — and how the two compare is worth a real measurement rather than a handful of pairs. That measurement — many held-out pairs of
# every class, DIFT's settings and the patch variant both chosen on a validation split, and matches
# *across* classes (a star's centre found on a cross), where a template of the outline no longer fits —
# is `benchmarks/dift_pck.py`; its results: [`benchmarks/results/dift_pck.md`](../benchmarks/results/dift_pck.md).
#
# Things to try: another `shape` (hearts and crosses have symmetric parts: watch the left lobe match
# the right one); `ensemble = 1`; the empty prompt (`prompt_template = ""`, the paper's choice when the
# class is unknown); other `blocks` (e.g. `["down_blocks.0", "up_blocks.1"]`); your own images in the
# widget below.
#
# ## 6. Explore
#
# Click (or drag) on the source: every target shows its cosine-similarity map and best match at once —
# the features were computed once, and a click costs one `lab.dift.similarity` call (a few milliseconds).
# Clicks near a keypoint snap to it, and the targets then show the keypoint's true position (square) and
# how far the match fell from it. Choose another block, timestep, ensemble size or prompt and press
# *Recompute* for new features; the header's PCK says at once whether the choice helped.

# %%
explorer = widgets.CorrespondenceExplorer(
    pipe,
    list(images),
    keypoints=list(keypoints),
    labels=labels,
    prompt=prompt,
    timestep=timestep,
    blocks=blocks,
    ensemble=ensemble,
    seed=seed,
)
explorer
