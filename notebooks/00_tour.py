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
# ---

# %% [markdown]
# # A tour of sdlab
#
# **sdlab** is a lab for looking inside Stable Diffusion and editing what it does. It hooks into
# [diffusers](https://github.com/huggingface/diffusers) pipelines without patching them: you choose
# places in the UNet (*sites*), read what flows through them (*captures*) or change it (*edits*), and
# everything is put back when you are done.
#
# This tour takes a few minutes on a laptop CPU:
#
# 1. load the embedded **TinyWorld** model,
# 2. generate an image,
# 3. see where each word of the prompt acts in the image (cross-attention heat maps),
# 4. explore those maps with the **attribution explorer**,
# 5. find the notebook for each technique.
#
# Run the cells from top to bottom: **Shift+Enter** runs one, *Run ▸ Run All Cells* runs them all.

# %% tags=["parameters"]
# Parameters: change them and run the notebook again. (CI and `sdlab demo --profile fast` run a
# fast profile: fewer denoising steps.)
model = None  # None: the embedded TinyWorld model; or the Hugging Face id / folder of an SD 1.x/2.x/XL model
device = "cpu"  # "cuda" for a real Stable Diffusion model on a GPU
prompt = "a red circle left of a blue square"
seed = 0
num_inference_steps = 20
guidance_scale = 5.0

# %% [markdown]
# ## 1. The model
#
# TinyWorld is a Stable Diffusion model trained from scratch on a procedural world of coloured shapes
# (circles, squares, triangles, stars, hearts, crosses) on plain, sky or grass backgrounds. It has
# exactly Stable Diffusion 1.x's architecture — CLIP text encoder, UNet with cross-attention, VAE,
# DDIM scheduler — only narrow enough to make a 64×64 image in about a second on a CPU. And because
# the world is procedural, every image can be checked against ground truth: we can tell whether a
# heat map points at the right object.
#
# `lab.load_pipeline()` returns an ordinary diffusers pipeline.

# %%
import torch

import lab
import widgets

pipe = lab.load_pipeline(model, device=device)
pipe.set_progress_bar_config(disable=True)  # the explorer below has its own progress bar
type(pipe).__name__, type(pipe.unet).__name__

# %% [markdown]
# The places sdlab can look at: every attention layer and every block of the UNet, in the order
# they run. *Cross*-attention layers are where the image reads the prompt.

# %%
for site in lab.sites(pipe):
    if site.kind == "cross":
        print(f"{site.name:60s} {site.place:5s} level {site.level}")

# %% [markdown]
# ## 2. Generate
#
# The pipeline is used as in any diffusers code. (Images are 64×64: shown here 4× larger, with
# square pixels.)

# %%
generator = torch.Generator().manual_seed(seed)
image = pipe(
    prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator
).images[0]
image.resize((256, 256), resample=0)  # 0 = nearest neighbour: keep the pixels sharp

# %% [markdown]
# ## 3. Where does each word act?
#
# At every denoising step, each position of the image latent *attends* to the prompt's tokens: a
# softmax over the tokens says how much of that position's update comes from each word. Adding up
# these attention maps over steps, layers and heads gives one heat map per word — the method of
# [DAAM](https://arxiv.org/abs/2210.04885) (Tang et al., 2023).
#
# `lab.daam.trace_generation` generates (the same image: same seed) while recording the maps;
# `per_step=True` keeps every step, layer and head so that any slice can be summed later in
# milliseconds.

# %%
run = lab.daam.trace_generation(
    pipe, prompt, seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, per_step=True
)
run

# %%
heat_maps = [run.heat_map(word) for word in run.words()]
figure = lab.daam.plot_grid(heat_maps, ncols=5)

# %% [markdown]
# Each panel is one word's map: the mean attention each pixel pays to the word, stretched to [0, 1]
# for display. Words that name something in the image (*circle*, *square*, the colours) tend to be
# strongest where it is; small words (*a*, *of*) spread out. A map is a `HeatMap`: `.values`,
# `.normalized()`, `.mask(threshold)` (DAAM's segmentation), `.overlay()`, `.peak()`.

# %%
circle = run.heat_map("circle")
print(circle)
print("strongest at pixel (x, y) =", circle.peak())

# %% [markdown]
# ## 4. The attribution explorer
#
# The same run, in an interactive widget. Everything below is computed from the maps already
# recorded: nothing runs the model again until you press **Generate**.
#
# - **Word**: click a word of the prompt, or type any word (even one not in the prompt: an
#   *open-vocabulary* map) and press Enter;
# - **Steps**: drag the two handles to sum only some denoising steps — early steps decide the layout,
#   late steps the details;
# - **Layers**: all layers, or one resolution (16×16 layers are sharp, 4×4 ones coarse), or the
#   down / mid / up half of the UNet; **Head**: one attention head, or all;
# - **Display**: overlay opacity and colormap; the **threshold** makes the mask shown beside the
#   image;
# - **x̂₀ trajectory**: at each step the model's current guess of the final image — scrub through it;
# - **Generate**: a new prompt, seed, number of steps or guidance scale.

# %%
explorer = widgets.AttributionExplorer(pipe, run=run, word="circle")
explorer

# %% [markdown]
# The explorer is also a Python object: whatever it shows, you can get in code.

# %%
explorer.step_start, explorer.step_stop = 0, max(1, run.num_steps // 2)  # the first half of the steps
early = explorer.heat_map()  # the HeatMap on display: .values, .normalized(), .mask(), .overlay()
print(explorer.heat_label)
explorer.run is run  # noqa: B015  (the same lab.daam run a script gets)

# %% [markdown]
# ## 5. Where next
#
# Each technique has its own notebook, copied next to this one by `sdlab lab`:
#
# | notebook | what it covers |
# |---|---|
# | [01_attribution.ipynb](01_attribution.ipynb) | DAAM step by step: cross-attention, how the maps are aggregated, per-step and per-layer slices, self-attention, open-vocabulary maps, and how good the maps are (mIoU against TinyWorld's ground truth) |
# | *coming* | editing attention: re-weighting words and swapping maps between prompts (`lab.trace(pipe).edit`, `lab.scale_tokens`) |
# | *coming* | reading the UNet's features: captures of block outputs, probes |
#
# The same code runs on real Stable Diffusion: set `model` in the parameters cell to, for example,
# `"stable-diffusion-v1-5/stable-diffusion-v1-5"` and `device` to `"cuda"`.
