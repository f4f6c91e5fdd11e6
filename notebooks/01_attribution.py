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
#         num_inference_steps: 4
#         evaluation_prompts:
#         - a red circle
#         - a red circle left of a blue square
#         token_epochs: 20
# ---

# %% [markdown]
# # Attribution: which words act where (DAAM, step by step)
#
# When Stable Diffusion draws "a red circle left of a blue square", which pixels did the word
# *circle* shape? This notebook builds the answer from the ground up:
#
# 1. what **cross-attention** is, read straight out of the UNet;
# 2. how **DAAM** aggregates it into one heat map per word — by hand, then with `lab.daam`;
# 3. **slices**: per step, per layer resolution, per head;
# 4. **self-attention**: where the image looks at itself;
# 5. **open-vocabulary maps**: words that are not in the prompt;
# 6. **how good are the maps?** mIoU against TinyWorld's ground truth;
# 7. the **attribution explorer** widget, to play with all of it.
#
# References: Tang et al., [*What the DAAM: Interpreting Stable Diffusion Using Cross
# Attention*](https://arxiv.org/abs/2210.04885), ACL 2023; Marcos-Manchon et al.,
# [*Open-Vocabulary Attention Maps with Token Optimization for Semantic Segmentation in Diffusion
# Models*](https://arxiv.org/abs/2403.14291), CVPR 2024.

# %% tags=["parameters"]
# Parameters: change them and run the notebook again. (CI and `sdlab demo --profile fast` run a
# fast profile: fewer steps, one evaluation prompt.)
model = None  # None: the embedded TinyWorld model; or the Hugging Face id / folder of an SD 1.x/2.x/XL model
device = "cpu"
prompt = "a red circle left of a blue square"
seed = 0
num_inference_steps = 20
guidance_scale = 5.0
# Prompts whose maps are scored against TinyWorld's ground truth in section 6 (TinyWorld only).
evaluation_prompts = [
    "a red circle",
    "a purple heart",
    "a blue square",
    "a yellow star",
    "a green triangle on a sky background",
    "a red circle left of a blue square",
    "a yellow star above a green triangle",
    "a purple heart right of an orange cross",
]
token_epochs = 100  # optimisation steps of OVAM's token optimisation (section 6)

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import lab
import widgets

pipe = lab.load_pipeline(model, device=device)
pipe.set_progress_bar_config(disable=True)

# %% [markdown]
# ## 1. Cross-attention, read out of the UNet
#
# The prompt is encoded into 77 token vectors (CLIP's start token, the words' tokens, then padding
# with the end token). In every cross-attention layer, each position of the image latent makes a
# *query* $q$; each token makes a *key* $k$ and a *value* $v$. The position's update is a weighted
# average of the values, with weights
#
# $$a_{\text{position},\,\text{token}} = \operatorname{softmax}_{\text{token}}\left(\frac{q \cdot k}{\sqrt{d}}\right)$$
#
# For one position, the weights over the 77 tokens sum to 1: they say how much of that position's
# update comes from each token. Read along a token instead, and you get a *map*: how much each
# position listens to that token. Layers run at several resolutions (TinyWorld: 16×16, 8×8 and 4×4
# latent grids) and have several *heads* (independent attentions side by side).
#
# The tokens of our prompt:

# %%
lab.prompt_tokens(pipe, prompt)[:12]

# %% [markdown]
# `lab.trace` records what flows through the UNet. Here: the attention probabilities (`"probs"`) of
# the cross-attention layers at 16×16, at every step (`lab.Stack()` keeps one tensor per step).

# %%
with lab.trace(pipe) as tracer:
    attention = tracer.capture("cross 16x16", "probs", reduce=lab.Stack())
    image = pipe(
        prompt,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]

probabilities = attention.result()  # {layer: tensor of (steps, images, heads, positions, tokens)}
for name, tensor in probabilities.items():
    print(name, tuple(tensor.shape))

# %%
layer = next(iter(probabilities))
tensor = probabilities[layer]
print("each position's weights over the tokens sum to:", tensor.sum(dim=-1).mean().item())
share = tensor.mean(dim=(0, 1, 2, 3))  # mean weight of each token over steps, heads and positions
end = len(lab.prompt_tokens(pipe, prompt)) - 1  # where the end-of-text token is; padding follows
print(
    f"start token {share[0]:.2f} | the prompt's words {share[1:end].sum():.2f} | "
    f"end-of-text and padding {share[end:].sum():.2f}"
)

# %% [markdown]
# The prompt's words get only a small share of the attention: the rest goes to the start token and to
# the end-of-text token and its padding copies, which carry a summary of the whole prompt. (In Stable
# Diffusion 1.5 the start token takes most of it — a "nothing in particular" sink.) So a word's weights
# are small numbers; what matters is *where* they are larger than elsewhere.
#
# The map of *circle* in this layer, at one step and one head — the raw material of everything
# below:

# %%
circle_tokens = lab.token_indices(pipe, prompt, "circle")
print("'circle' is token", circle_tokens)
height = width = int(tensor.shape[3] ** 0.5)
steps_to_show = sorted({0, tensor.shape[0] // 2, tensor.shape[0] - 1})
panels = len(steps_to_show) + 1
figure, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 2.6))
axes[0].imshow(image)
axes[0].set_title("image")
for ax, step in zip(axes[1:], steps_to_show):
    ax.imshow(tensor[step, 0, 0, :, circle_tokens[0]].reshape(height, width), cmap="inferno")
    ax.set_title(f"step {step}, head 0")
for ax in axes:
    ax.axis("off")
figure.tight_layout()

# %% [markdown]
# ## 2. From attention to a heat map: the DAAM recipe
#
# DAAM turns these maps into one heat map per word:
#
# 1. take the word's column of the attention at every step $t$, layer $l$ and head $h$;
# 2. lay it out on the layer's grid and **upsample** it (bicubic) to the image size;
# 3. **sum** over steps, layers and heads (`lab.daam` divides by the number of terms: the mean
#    attention a pixel pays to the word — same map, same mask, a scale that does not depend on how
#    many steps you sum);
# 4. to segment, normalise the map to $[0, 1]$ (min–max, as DAAM's reference code does) and keep the
#    pixels above $\tau = 0.4$.
#
# By hand, for the 16×16 layers captured above:

# %%
image_size = image.size[::-1]  # (height, width)
total = torch.zeros(image_size)
terms = 0
for tensor in probabilities.values():  # one 16x16 layer at a time
    word = tensor[:, 0, :, :, circle_tokens].mean(dim=-1)  # its column: (steps, heads, positions)
    grids = word.reshape(-1, 1, height, width)  # each (step, head) map laid out on the layer's grid
    upsampled = F.interpolate(grids, size=image_size, mode="bicubic", align_corners=False)
    total += upsampled.sum(dim=(0, 1))
    terms += len(grids)
by_hand = (total / terms).clamp(min=0).numpy()  # bicubic overshoot below zero is clipped

# %% [markdown]
# `lab.daam.trace_generation` records the same maps for every layer (and more, see below) in one
# call, and `run.heat_map` does the sum for any slice. Same seed, same image, same numbers:

# %%
run = lab.daam.trace_generation(
    pipe, prompt, seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, per_step=True
)
circle_16 = run.heat_map("circle", sites="16x16")
print("largest difference from the map by hand:", float(np.abs(circle_16.values - by_hand).max()))
run

# %%
figure = lab.daam.plot_grid([run.heat_map(word) for word in run.words()], ncols=5)

# %% [markdown]
# ## 3. Slices: when, where and which head
#
# With `per_step=True` the run keeps every step, layer and head, so each slice below is a few small
# sums — milliseconds, no model call.
#
# **Steps.** Denoising goes from noise to image. Early steps decide the layout (where things go),
# late steps the details. Summing thirds of the steps:

# %%
thirds = np.array_split(np.arange(run.num_steps), 3)
maps = [run.heat_map("circle", steps=range(part[0], part[-1] + 1)) for part in thirds if len(part)]
for heat_map, part in zip(maps, thirds):
    heat_map.word = f"circle, steps {part[0]}–{part[-1]}"
figure = lab.daam.plot_grid(maps, ncols=4)

# %% [markdown]
# **Layers.** `run.site_groups` groups the cross-attention layers by resolution (and by UNet half:
# down, mid, up). Fine layers give sharp but noisy maps, coarse ones blurry but robust maps; DAAM
# sums them all.

# %%
print({group: len(layers) for group, layers in run.site_groups.items()})
resolutions = [group for group in run.site_groups if "x" in group]
maps = [run.heat_map("circle", sites=group) for group in resolutions]
for heat_map, group in zip(maps, resolutions):
    heat_map.word = f"circle, {group} layers"
figure = lab.daam.plot_grid(maps, ncols=4)

# %% [markdown]
# **Heads.** Each layer has several heads; they need not agree.

# %%
heads = range(run.num_heads["all"])
maps = [run.heat_map("circle", heads=head) for head in heads]
for heat_map, head in zip(maps, heads):
    heat_map.word = f"circle, head {head}"
figure = lab.daam.plot_grid(maps, ncols=5)

# %% [markdown]
# ## 4. Self-attention: where the image looks at itself
#
# Self-attention layers let each position of the image attend to every other position. Pick a
# pixel: its row of the self-attention is a map over the image. Positions on an object tend to
# attend to the same object — self-attention groups pixels into things, which is why it is used to
# sharpen cross-attention maps into segmentations.

# %%
on_circle = run.heat_map("circle").peak()  # (x, y) where the circle's map is largest
corner = (2, 2)
maps = [run.self_attention_map(*on_circle), run.self_attention_map(*corner)]
maps[0].word = f"from {on_circle} (circle's peak)"
maps[1].word = f"from {corner} (corner)"
figure = lab.daam.plot_grid(maps, ncols=3)

# %% [markdown]
# ## 5. Open-vocabulary maps: words that are not in the prompt
#
# A heat map needs the word's keys. For a word outside the prompt, we can make them: encode an
# *attribution prompt* containing the word, project it with each layer's own key projection, and
# redo the softmax with the queries recorded during the generation (OVAM, Marcos-Manchon et al.).
# With the generation prompt itself as attribution prompt, this is exactly the DAAM map:

# %%
same = run.open_vocab_map("circle", attribution_prompt=prompt)
difference = np.abs(same.values - run.heat_map("circle").values).max()
print("largest difference from the DAAM map:", float(difference))

# %% [markdown]
# And for words the prompt never said — synonyms, other shapes, the background:

# %%
words = ["circle", "round", "ball", "square", "sky", "background"]
figure = lab.daam.plot_grid([run.open_vocab_map(word) for word in words], ncols=4)

# %% [markdown]
# ## 6. How good are the maps? mIoU against TinyWorld's ground truth
#
# A heat map is only useful if it points at the right thing. On real images checking that needs
# hand-drawn masks; TinyWorld has a **judge** (`lab.tinyworld.judge`) that reads any 64×64 image
# back into objects — shape, colour, position and a pixel mask each. So for each object of a prompt
# that the model did draw, we compare the DAAM mask of its shape word with the judge's mask:
#
# $$\text{IoU} = \frac{|\text{heat-map mask} \cap \text{object mask}|}{|\text{heat-map mask} \cup \text{object mask}|}$$
#
# and average over objects (mIoU). An object the model failed to draw has no mask to compare with
# and is skipped (the judge's prompt score, `judge.score_prompt`, counts those).

# %%
from lab.tinyworld import judge
from lab.tinyworld.world import WorldObject


def judged_masks(prompt, image):
    """{shape word: the judge's mask} of each object of the prompt that the judge finds in the image."""
    asked = judge.parse_prompt(prompt).objects
    expected = [
        WorldObject(shape=o["shape"], color=o["color"] or "", size=0.0, texture="", cx=np.nan, cy=np.nan) for o in asked
    ]
    found = judge.match(expected, judge.read_image(image).objects)
    masks = {}
    for wanted, detection in zip(asked, found):
        right_shape = detection is not None and detection.shape == wanted["shape"]
        if right_shape and wanted["color"] in (None, detection.color):  # no colour asked, or the right one
            masks[wanted["shape"]] = detection.mask
    return masks


def iou(a, b):
    """Intersection over union of two boolean masks."""
    return float((a & b).sum() / max((a | b).sum(), 1))


# %% [markdown]
# Each evaluation prompt is generated and traced; each object the judge finds is scored with the
# paper's mask (min–max normalised map above $\tau = 0.4$), using all layers and each resolution alone.

# %%
tau = lab.daam.PAPER_THRESHOLD
groups = ["all"] + [group for group in run.site_groups if "x" in group]  # all, then each resolution
scores = []  # one row per object the model drew: (prompt, word, {layer group: IoU})
evaluation_runs = {}
for text in evaluation_prompts:
    evaluated = lab.daam.trace_generation(
        pipe, text, seed=seed, per_step=True, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale
    )
    evaluation_runs[text] = evaluated
    truth = judged_masks(text, evaluated.images[0])
    for word in [o["shape"] for o in judge.parse_prompt(text).objects]:
        if word not in truth:
            print(f"skipped: the judge finds no {word!r} in the image of {text!r}")
            continue
        masks = {group: evaluated.heat_map(word, sites=group).mask(tau) for group in groups}
        scores.append((text, word, {group: iou(masks[group], truth[word]) for group in groups}))

if scores:
    print()
    for text, word, by_group in scores:
        print(f"{text:42s} {word:9s} IoU {by_group['all']:.2f}")
    print(f"\nmIoU over {len(scores)} objects, by layer group:")
    for group in groups:
        print(f"  {group:6s} {np.mean([by_group[group] for _, _, by_group in scores]):.2f}")
else:
    print("No object was drawn recognisably, so there is nothing to score (an untrained model?).")

# %% [markdown]
# The first prompt, side by side: the image, the heat-map mask, and the judge's mask.

# %%
text = evaluation_prompts[0]
evaluated = evaluation_runs[text]
truth = judged_masks(text, evaluated.images[0])
shapes = [o["shape"] for o in judge.parse_prompt(text).objects]
figure, axes = plt.subplots(len(shapes), 3, figsize=(7.5, 2.5 * len(shapes)), squeeze=False)
for row, word in zip(axes, shapes):
    row[0].imshow(evaluated.images[0])
    row[0].set_title(text if word == shapes[0] else "", fontsize=8)
    row[1].imshow(evaluated.heat_map(word).mask(tau), cmap="gray", vmin=0, vmax=1)
    row[1].set_title(f"DAAM mask of '{word}'")
    nothing = np.zeros(evaluated.image_size, bool)
    row[2].imshow(truth.get(word, nothing), cmap="gray", vmin=0, vmax=1)
    row[2].set_title("judge's mask" if word in truth else "judge: not found")
for ax in axes.flat:
    ax.axis("off")
figure.tight_layout()

# %% [markdown]
# ### Token optimisation (OVAM)
#
# OVAM's second idea: a word's text embedding need not stay what the text encoder made of it. Fit
# the embedding so that its open-vocabulary map matches a mask on **one** image, and the fitted
# token segments the same concept in other images. `run.optimize_token(word, mask)` does this with
# the judge's mask of the first prompt's object as target; then we apply the token, unchanged, to
# every other evaluated image that has that object.

# %%
first = evaluation_prompts[0]
first_truth = judged_masks(first, evaluation_runs[first].images[0])
word = judge.parse_prompt(first).objects[0]["shape"]
if word in first_truth:
    token = evaluation_runs[first].optimize_token(word, first_truth[word], epochs=token_epochs)
    print(token)
    plt.figure(figsize=(4, 2.5))
    plt.plot(token.losses)
    plt.xlabel("optimisation step")
    plt.ylabel("binary cross-entropy")
    for text in evaluation_prompts[1:]:
        truth = judged_masks(text, evaluation_runs[text].images[0])
        if word in truth:
            fitted = evaluation_runs[text].open_vocab_map(token).mask(tau)
            plain = evaluation_runs[text].heat_map(word).mask(tau)
            print(f"{text:42s} IoU: DAAM {iou(plain, truth[word]):.2f}, optimised token {iou(fitted, truth[word]):.2f}")
else:
    print(f"the judge finds no {word!r} in the image of {first!r}: no mask to fit a token to")

# %% [markdown]
# Things to try: other thresholds (`tau`); score only early steps (`steps=range(0, 5)` in
# `heat_map`); add prompts with textures ("a striped red circle") or sizes ("a small blue square").
#
# ## 7. Explore
#
# Everything above, in one widget: pick a word (or type one for an open-vocabulary map), drag the
# step range, choose layers and heads, set the threshold, scrub the x̂₀ trajectory, generate new
# prompts.

# %%
explorer = widgets.AttributionExplorer(pipe, run=run, word="circle")
explorer
