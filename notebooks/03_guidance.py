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
#         num_inference_steps: 8
#         search_prompts: 8
# ---

# %% [markdown]
# # Attention guidance: Attend-and-Excite, SAG, PAG and FreeU
#
# Four ways to steer a diffusion model *while it samples*, with no training: each reads or edits the UNet's
# attention (or its features) at every step and changes what the sampler does with it.
#
# | method | what it reads | what it changes | paper |
# |---|---|---|---|
# | **Attend-and-Excite** | cross-attention of each subject word | the latent, by gradient steps, until every subject is attended | Chefer et al., SIGGRAPH 2023 |
# | **SAG** | where the mid block's self-attention dwells | adds the difference to a pass on a blurred, re-noised $\hat x_0$ | Hong et al., ICCV 2023 |
# | **PAG** | nothing: it replaces self-attention maps by the identity | adds the difference to that perturbed pass | Ahn et al., ECCV 2024 |
# | **FreeU** | the decoder's backbone and skip features | scales the backbone up and the skips' low frequencies down | Si et al., CVPR 2024 |
#
# Every one is a `with` block (or, for Attend-and-Excite, a function) around the pipeline's own call, in
# `lab/attend_excite.py`, `lab/sag.py`, `lab/pag.py` and `lab/freeu.py`; their latents are tested equal to
# diffusers' pipelines. Here each is set against its paper on TinyWorld, where a judge reads every image back
# into objects, so "did it help?" has an answer:
#
# 1. **Attend-and-Excite**: a two-object prompt the model gets wrong, the per-step maxima, the paper's
#    schedule against one adapted to 20 steps;
# 2. **SAG**: its mask, and what blurring and re-noising $\hat x_0$ does;
# 3. **PAG**: identity attention, the formula with and without classifier-free guidance;
# 4. **FreeU**: backbone and skip features before and after, captured in the same call;
# 5. **stacking** two methods in one `with`;
# 6. the **measured tables** of `benchmarks/guidance.py`;
# 7. the **guidance explorer** widget.

# %% tags=["parameters"]
# Parameters: change them and run the notebook again. (CI runs a fast profile: fewer denoising steps and
# fewer prompts searched for a failing case.)
model = None  # None: the embedded TinyWorld model; or the Hugging Face id / folder of an SD 1.x/2.x/XL model
device = "cpu"
num_inference_steps = 20
guidance_scale = 5.0
seed = 0
prompt = "a red circle left of a blue square"  # used where no failing case is found (section 1)
search_prompts = 12  # held-out two-object prompts searched for one the plain model gets wrong
sag_scale = 0.75  # diffusers' default
pag_scale = 3.0  # the paper's SD recipe with CFG: guidance 4 + PAG 3 (PAG alone: 5)

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image, Markdown, display

import lab
import widgets
from lab.attend_excite import PAPER, schedule_for, subject_maps
from lab.freeu import FREEU_PRESETS, STAGES, low_frequency_scaled, preset_for
from lab.sag import SITE as SAG_SITE
from lab.sag import attention_mask, degrade
from lab.tinyworld.evaluate import prompt_split
from lab.tinyworld.judge import parse_prompt, score_prompt

pipe = lab.load_pipeline(model, device=device)
pipe.set_progress_bar_config(disable=True)
settings = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)


def generator():
    return torch.Generator().manual_seed(seed)


def show_images(images, titles, size=2.6):
    figure, axes = plt.subplots(1, len(images), figsize=(size * len(images), size + 0.3))
    for ax, image, title in zip(np.atleast_1d(axes), images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    figure.tight_layout()


def judged(text, image):
    """The judge's verdict on an image: how many objects it found, and which named ones are missing."""
    score = score_prompt(text, image)
    if score["all_present"]:
        return f"{score['n_found']} found · both ✓"
    named = parse_prompt(text).objects
    missing = [f"{obj['color']} {obj['shape']}" for obj, got in zip(named, score["objects"]) if not got["present"]]
    return f"{score['n_found']} found · ✗ {', '.join(missing)}"


# %% [markdown]
# ## 1. Attend-and-Excite
#
# **The failure it targets.** With two objects in a prompt, Stable Diffusion often draws only one of them
# ("catastrophic neglect"): early in sampling, one subject takes over the layout and the other's tokens never
# get a region of the image that attends to them. TinyWorld's model does it too. Among the held-out
# two-object prompts, the first one whose plain image lacks an object:

# %%
candidates = [
    text
    for text in prompt_split()["pairs"][:search_prompts]
    if len({obj["shape"] for obj in parse_prompt(text).objects}) == 2  # two different shapes: two subjects
]
plain_images = pipe(candidates, generator=[generator() for _ in candidates], **settings).images
failing = [(text, image) for text, image in zip(candidates, plain_images) if score_prompt(text, image)["n_found"] < 2]
if failing:
    prompt, plain_image = failing[0]
else:  # no failing case among these: the parameter's prompt
    plain_image = pipe(prompt, generator=generator(), **settings).images[0]
subjects = [obj["shape"] for obj in parse_prompt(prompt).objects]
print(f"{len(failing)} of {len(candidates)} prompts lose an object at seed {seed}; the case studied: {prompt!r}")
show_images([plain_image], [f"plain: {judged(prompt, plain_image)}"], size=3)

# %% [markdown]
# **What it reads.** At step $t$, for the conditional prompt, the cross-attention probabilities of the
# $16 \times 16$ layers, averaged over layers and heads, $A \in \mathbb{R}^{(16 \cdot 16) \times 77}$. A
# softmax over the text tokens (start token dropped) with temperature $1/100$ turns each pixel's row into a
# distribution over words; a subject $s$'s column, Gaussian-smoothed, is its map $M_s$:
#
# $$A^{\text{txt}} = \operatorname{softmax}\bigl(100\, A_{:,\,1:e}\bigr), \qquad M_s = G * A^{\text{txt}}_{:,\,s-1}, \qquad
# \mathcal{L} = \max_s \bigl(1 - \max M_s\bigr)$$
#
# $\mathcal{L}$ is small when **every** subject has some patch of the image that attends to it strongly. A&E
# then moves the latent: $z_t \leftarrow z_t - \alpha_t \nabla_{z_t} \mathcal{L}$ for the first
# `max_iter_to_alter` steps, with $\alpha_t = 20\sqrt{\text{linspace}(1, 0.5)}$, and at a few steps
# (`thresholds`) it repeats the update until every $\max M_s$ reaches the threshold.
#
# The maps can be read on the *plain* generation with a capture, and `lab.attend_excite.subject_maps` applies
# the paper's softmax and smoothing; `lab.attend_and_excite` returns the maps it used (before each update):

# %%
side = PAPER["attn_res"]
columns = [index for word in subjects for index in lab.token_indices(pipe, prompt, word)]
# Where the softmax's text tokens end: the last token (CLIP's tokenizer pads with end-of-text), or, when the
# tokenizer pads with something else (SD 2.x), the end-of-text position (A&E's normalize_eot="auto").
tokenizer = pipe.tokenizer
end = -1 if tokenizer.pad_token == tokenizer.eos_token else len(tokenizer(prompt)["input_ids"]) - 1
with lab.trace(pipe) as tr:
    probs = tr.capture(f"cross {side}x{side}", "probs", reduce=lab.Stack(), rows="cond")  # per site: steps x probs
    pipe(prompt, generator=generator(), **settings)
per_step = zip(*probs.result().values())  # per step: each site's (1, heads, h*w, 77)
plain_maxima = torch.stack([subject_maps(list(sites), columns, end, (side, side)).amax((1, 2)) for sites in per_step])

adapted = schedule_for(num_inference_steps)
runs = {
    "paper's defaults": lab.attend_and_excite(pipe, prompt, subjects, generator=generator(), **settings),
    f"schedule_for({num_inference_steps})": lab.attend_and_excite(
        pipe, prompt, subjects, generator=generator(), **settings, **adapted
    ),
}
print("paper (for 50 steps):", {key: PAPER[key] for key in ("max_iter_to_alter", "thresholds", "scale_factor")})
print(f"schedule_for({num_inference_steps}):", adapted)
for name, run in runs.items():
    print(f"{name}: {run}")

# %% [markdown]
# The per-step maximum of each subject's map: plain (dashed) and with A&E (solid, read by A&E before its own
# update at that step, so it shows what the previous updates achieved). Shaded: the steps where the
# adapted schedule updates the latent.

# %%
figure, axes = plt.subplots(1, 2, figsize=(11, 3.2), sharey=True)
for ax, (name, run) in zip(axes, runs.items()):
    if name != "paper's defaults":
        ax.axvspan(-0.5, adapted["max_iter_to_alter"] - 0.5, color="0.92")
    for k, (word, _) in enumerate(run.subjects[0]):
        ax.plot(plain_maxima[:, k], "--", color=f"C{k}", label=f"{word}: plain")
        ax.plot(run.steps, run.max_attention[:, 0, k], "-o", ms=3, color=f"C{k}", label=f"{word}: A&E")
    ax.set_title(f"A&E, {name}", fontsize=9)
    ax.set_xlabel("denoising step")
axes[0].set_ylabel("max of the smoothed map")
axes[0].legend(fontsize=7)
figure.tight_layout()
show_images(
    [plain_image] + [run.images[0] for run in runs.values()],
    [f"plain\n{judged(prompt, plain_image)}"] + [f"{name}\n{judged(prompt, r.images[0])}" for name, r in runs.items()],
    size=3,
)

# %% [markdown]
# **The paper's schedule on 20 steps.** The defaults were written for 50 steps: update the latent at the first
# 25, refine at steps 0, 10 and 20. Used unchanged on a 20-step run (as diffusers does), "the first 25" is
# every step, the refinement at step 10 comes halfway through instead of a fifth of the way, and step 20 does
# not exist. `schedule_for(20)` keeps the paper's *proportions* instead: updates at the first 10 steps,
# refinements at steps 0, 4 and 8.
#
# What the full profile (20 steps, seed 0) shows on its case: without A&E the triangle's map stays near zero
# at every step — no region of the image attends to "triangle", and the model draws the cross with a red
# foot. With the paper's defaults, the refinement at step 10 (threshold 0.5) lifts the triangle's maximum from
# about 0.2 to 0.45, where it stays, and the two objects separate. `schedule_for(20)` refines earlier, at steps
# 4 and 8 while the layout is still forming, and its updates do raise the triangle's attention; but they stop
# at step 10 (A&E reads nothing after that, so its curve ends) and the final image merges the two again. (The
# fast profile's 8 steps tell their own story.) Which schedule is better is a question for many prompts, not
# one: the benchmark of section 6 chooses between them on a validation split and reports a held-out one.
#
# ## 2. Self-Attention Guidance (SAG)
#
# **The idea.** The regions a model's self-attention dwells on are where its fine detail is decided. SAG
# blurs exactly those regions of the model's own guess of the clean image, re-noises the result to the
# current noise level, and asks the model again: the difference between the two predictions is the detail
# that blurring took away, and SAG adds more of it:
#
# $$M = \Bigl[\textstyle\sum_{\text{queries}} \overline{A}_{\text{mid}} > 1\Bigr], \quad
# \tilde x_t = \sqrt{\bar\alpha_t}\,\bigl(M \odot \operatorname{blur}(\hat x_0) + (1 - M) \odot \hat x_0\bigr) + \sqrt{1-\bar\alpha_t}\,\hat\epsilon$$
#
# $$\epsilon = \epsilon(x_t, \varnothing) + w\,\bigl(\epsilon(x_t, c) - \epsilon(x_t, \varnothing)\bigr) +
# s\,\bigl(\epsilon(x_t, \varnothing) - \epsilon(\tilde x_t, \varnothing)\bigr)$$
#
# $\overline{A}_{\text{mid}}$: the mid block's self-attention map averaged over heads; summed over queries it
# says how much attention each position *receives*, and $M$ marks those above the average (1). With
# classifier-free guidance SAG works on the unconditional rows, as the paper's equation 25 and diffusers do.
# `sag.masks` keeps $M$ of every step; a capture of the UNet's input and output gives $\hat x_0$ at any step:

# %%
with lab.trace(pipe) as tr:
    unet_in = tr.capture("unet", "input", reduce=lab.Stack(), rows="uncond")
    unet_out = tr.capture("unet", "output", reduce=lab.Stack(), rows="uncond")
    mid_probs = tr.capture(SAG_SITE, "probs", reduce=lab.Stack(), rows="uncond")
    with lab.sag(pipe, scale=sag_scale) as sag:
        sag_image = pipe(prompt, generator=generator(), **settings).images[0]
masks = torch.stack(sag.masks)[:, 0]  # (steps, h, w) on the mid block's grid
by_hand = torch.stack([attention_mask(p, tuple(masks.shape[1:]))[0] for p in mid_probs.result()[SAG_SITE]])
print(
    f"SAG reads {SAG_SITE}: a {tuple(masks.shape[1:])} mask per step; the same by hand: {torch.equal(by_hand, masks)}"
)
print("share of positions masked per step:", " ".join(f"{float(m.float().mean()):.2f}" for m in masks))

shown_steps = sorted({1, num_inference_steps // 4, num_inference_steps // 2, num_inference_steps - 1})
figure, axes = plt.subplots(1, len(shown_steps), figsize=(2.4 * len(shown_steps), 2.6))
for ax, step in zip(axes, shown_steps):
    ax.imshow(sag_image)
    ax.imshow(masks[step].float().numpy(), cmap="Reds", alpha=0.45, extent=(0, 64, 64, 0), vmin=0, vmax=1)
    ax.set_title(f"step {step}: mask", fontsize=8)
    ax.axis("off")
figure.tight_layout()

# %% [markdown]
# What the degraded pass sees, at one step: the model's $\hat x_0$, the same with the masked positions blurred
# (a $9 \times 9$ Gaussian, $\sigma = 1$, on the latent), decoded by the VAE. `lab.sag.degrade` is SAG's own
# function; $\bar\alpha$ and $\hat x_0$ come from `lab.diffusion`, whatever the prediction type (TinyWorld
# predicts $v$).

# %%
step = num_inference_steps // 4
timestep = pipe.scheduler.timesteps[step]
x_t, prediction = unet_in.result()["unet"][step], unet_out.result()["unet"][step]
abar = lab.diffusion.input_alpha_bar(pipe.scheduler, step, timestep)
kind = pipe.scheduler.config.prediction_type
x0 = lab.diffusion.predicted_x0(prediction, x_t, abar, kind)
blurred = degrade(x0, masks[step][None])
decoded = lab.diffusion.decode_latents(pipe, torch.cat([x0, blurred]))
change = np.abs(decoded[0] - decoded[1]).max(-1)
show_images(
    [decoded[0], decoded[1], change],
    [f"x̂0 at step {step} (t = {int(timestep)})", "masked positions blurred", f"difference (0–{change.max():.2f})"],
)

# %% [markdown]
# At $\bar\alpha \to 0$ (the first step of TinyWorld's zero-terminal-SNR schedule) $\tilde x_t = x_t$: the
# degraded pass sees the input itself and SAG adds nothing. Later the blur removes the edges inside the mask,
# and the guidance term pushes the prediction away from that blurred version. Plain against SAG:

# %%
plain_image = pipe(prompt, generator=generator(), **settings).images[0]
with lab.sag(pipe, scale=2 * sag_scale):
    strong = pipe(prompt, generator=generator(), **settings).images[0]
show_images(
    [plain_image, sag_image, strong],
    ["plain", f"SAG s = {sag_scale:g}", f"SAG s = {2 * sag_scale:g}"],
)

# %% [markdown]
# ## 3. Perturbed-Attention Guidance (PAG)
#
# **The idea.** Classifier-free guidance pushes away from a worse prediction, the unconditional one. PAG makes
# a different worse prediction: the same UNet, same prompt, with some self-attention maps replaced by the
# **identity** — every position attends only to itself, so $\operatorname{softmax}(QK^\top/\sqrt d)\,V$ becomes
# $V$ and the layer no longer mixes information across the image. Structure suffers; PAG pushes away from it:
#
# $$\epsilon = \epsilon(x_t, c) + s\,\bigl(\epsilon(x_t, c) - \hat\epsilon(x_t, c)\bigr) \qquad \text{(no CFG, } w \le 1\text{)}$$
#
# $$\epsilon = \epsilon(x_t, \varnothing) + w\,\bigl(\epsilon(x_t, c) - \epsilon(x_t, \varnothing)\bigr) + s\,\bigl(\epsilon(x_t, c) - \hat\epsilon(x_t, c)\bigr) \qquad \text{(with CFG)}$$
#
# where $\hat\epsilon$ is the perturbed prediction. Note it is computed from the **conditional** prompt in both
# cases (unlike SAG), so PAG works without any prompt-free pass; the paper's recipes for SD 1.5 are PAG 5 alone,
# or CFG 4 + PAG 3. What the identity replaces: the mid block's self-attention at one step, against the identity.

# %%
pag_site = "mid_block.attentions.0.transformer_blocks.0.attn1"
with lab.trace(pipe) as tr:
    mid = tr.capture(pag_site, "probs", reduce=lab.Mean(over=("steps", "heads")), rows="cond")
    pipe(prompt, generator=generator(), **settings)
attention = mid.result()[pag_site][0]  # (queries, keys), averaged over steps and heads
figure, axes = plt.subplots(1, 2, figsize=(6, 3))
axes[0].imshow(attention.numpy(), cmap="viridis")
axes[0].set_title(f"mid-block self-attention ({attention.shape[0]} positions)", fontsize=8)
axes[1].imshow(np.eye(attention.shape[0]), cmap="viridis")
axes[1].set_title("PAG's perturbation: the identity", fontsize=8)
for ax in axes:
    ax.set_xlabel("key position", fontsize=8)
    ax.set_ylabel("query position", fontsize=8)
figure.tight_layout()

# %% [markdown]
# With and without classifier-free guidance, and at two sets of layers: the mid block (diffusers' default)
# and the decoder's self-attention ("up").

# %%
pag_runs = {}
for layers in ("mid", "up"):
    for w in (1.0, guidance_scale):
        with lab.pag(pipe, scale=pag_scale, layers=layers) as pag:
            image = pipe(prompt, generator=generator(), num_inference_steps=num_inference_steps, guidance_scale=w)
        pag_runs[layers, w] = (image.images[0], len(pag.layers))
no_guidance = pipe(prompt, generator=generator(), num_inference_steps=num_inference_steps, guidance_scale=1.0)
show_images(
    [no_guidance.images[0], plain_image] + [image for image, _ in pag_runs.values()],
    ["no guidance (w = 1)", f"CFG w = {guidance_scale:g}"]
    + [f"PAG {layers} ({n} layers), w = {w:g}" for (layers, w), (_, n) in pag_runs.items()],
    size=2.2,
)

# %% [markdown]
# On TinyWorld the mid block's self-attention (a $4 \times 4$ grid) barely matters: replacing it by the identity
# hardly changes the prediction, and PAG at "mid" leaves the image as it was (the explorer below shows
# $|\epsilon(c) - \hat\epsilon(c)|$ per step: a few ten-thousandths). Perturbing the decoder's self-attention
# changes a lot, more than the paper's gentle sharpening: on this small model PAG's layers and scale need
# choosing together.
#
# ## 4. FreeU
#
# **The idea.** Each decoder resnet reads $[\,x, h\,]$: $x$ the **backbone** features coming up the decoder,
# $h$ the **skip** features from the encoder. The paper finds the backbone does the denoising and the skips
# carry high-frequency detail, and that the decoder over-relies on the skips. In the first two decoder stages
# (`up_blocks.0`, `up_blocks.1`) FreeU scales the first half of the backbone channels by $b$ and the skips'
# lowest frequencies by $s$:
#
# $$x'_{i} = b\, x_{i} \ (i < C/2), \qquad h' = \mathrm{IFFT}\bigl(\mathrm{FFT}(h) \odot \beta\bigr), \quad
# \beta = s \text{ in the central } 2 \times 2 \text{ box of frequencies}, 1 \text{ elsewhere}$$
#
# lab exposes both halves as the "merge" sites' tensors "backbone" and "skip". An edit that returns its input
# unchanged reads them; registered before `lab.freeu` it sees them before FreeU's edits, registered after it
# sees them after (edits run in registration order), all in the same UNet call:

# %%
preset = preset_for(pipe)
sites = [s.name for s in lab.sites(pipe) if s.kind == "merge" and s.name.rsplit(".resnets.", 1)[0] in STAGES]
readings = {}  # (site, "backbone" | "skip", "before" | "after") -> the first image's cond rows, one step


def read_as(what, moment):
    def read(x, ctx):
        if ctx.step == num_inference_steps // 2:  # one step, halfway
            readings[ctx.site.name, what, moment] = x[0].float()
        return x

    return read


with lab.trace(pipe) as tr:
    for what in ("backbone", "skip"):
        tr.edit(sites, what, read_as(what, "before"), rows="cond", passes="main")
    with lab.freeu(pipe, preset=preset):
        for what in ("backbone", "skip"):
            tr.edit(sites, what, read_as(what, "after"), rows="cond", passes="main")
        freeu_image = pipe(prompt, generator=generator(), **settings).images[0]
print(f"preset {preset!r}: {FREEU_PRESETS[preset]}; FreeU edits {', '.join(sites)}")
print(f"{'merge site':24s} {'mean |backbone| before → after':>32s} {'skip low-freq energy before → after':>38s}")


def low_share(h):
    power = torch.fft.fftshift(torch.fft.fft2(h).abs() ** 2, dim=(-2, -1))
    rows, cols = power.shape[-2:]
    return float(power[..., rows // 2 - 1 : rows // 2 + 1, cols // 2 - 1 : cols // 2 + 1].sum() / power.sum())


for name in sites:
    b0, b1 = readings[name, "backbone", "before"], readings[name, "backbone", "after"]
    h0, h1 = readings[name, "skip", "before"], readings[name, "skip", "after"]
    print(
        f"{name:24s} {float(b0.abs().mean()):15.3f} → {float(b1.abs().mean()):.3f} "
        f"{100 * low_share(h0):24.1f}% → {100 * low_share(h1):.1f}%"
    )

# %% [markdown]
# The skip's filter, checked by hand: `lab.freeu.low_frequency_scaled` on the "before" tensor gives the "after"
# one. And the maps, at the first site of each stage: the mean over channels of $|x|$ before and after (same
# colour scale), of $|h|$, and what the filter removed, $|h - h'|$ on $|h|$'s scale — a smooth field, the
# lowest frequencies of every channel: little in the first stage ($s_1 = 0.9$), most of it in the second
# ($s_2 = 0.2$).

# %%
values = FREEU_PRESETS[preset]
shown_sites = [next(name for name in sites if name.startswith(stage + ".")) for stage in STAGES]
for name in shown_sites:
    s = values["s1"] if name.startswith(STAGES[0] + ".") else values["s2"]
    by_hand = low_frequency_scaled(readings[name, "skip", "before"], s)
    print(f"{name}: |by hand - captured| max {float((by_hand - readings[name, 'skip', 'after']).abs().max()):.2e}")
titles = ["|backbone| before", "|backbone| after", "|skip| before", "|skip − skip′|: removed"]
figure, axes = plt.subplots(len(shown_sites), 4, figsize=(10, 2.7 * len(shown_sites)), squeeze=False)
for row, name in zip(axes, shown_sites):
    before, after = readings[name, "skip", "before"], readings[name, "skip", "after"]
    maps = [
        readings[name, "backbone", "before"].abs().mean(0),
        readings[name, "backbone", "after"].abs().mean(0),
        before.abs().mean(0),
        (before - after).abs().mean(0),
    ]
    top, skip_top = float(max(maps[0].max(), maps[1].max())), float(maps[2].max())
    for ax, heat, title, vmax in zip(row, maps, titles, [top, top, skip_top, skip_top]):
        ax.imshow(heat.numpy(), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"{name}\n{title}", fontsize=7)
        ax.axis("off")
figure.tight_layout()
show_images([plain_image, freeu_image], ["plain", f"FreeU {preset}"])

# %% [markdown]
# The backbone's mean magnitude rises by about the factor on half its channels; the skip keeps its detail and
# loses most of its lowest-frequency energy (on these small grids the $2 \times 2$ box is a large share of all
# frequencies). No published preset was tuned for TinyWorld's sizes, and none improves its judge scores
# (`lab/freeu.py`'s `preset_for` gives the measurement).
#
# ## 5. Stacking
#
# The techniques register on one shared trace (`lab.hooks.shared_trace`) and fold their guidance terms once, so
# they combine in one `with`: PAG's term is added to the pipeline's own guidance while FreeU edits the features
# of every pass, the perturbed one included (as diffusers' PAG pipeline with `enable_freeu` does). Everything is
# removed on exit:

# %%
with lab.pag(pipe, scale=pag_scale, layers="up"), lab.freeu(pipe, preset=preset):
    both = pipe(prompt, generator=generator(), **settings).images[0]
print("hooks left on the pipeline:", lab.active_hooks(pipe))
show_images(
    [plain_image, pag_runs["up", guidance_scale][0], freeu_image, both],
    ["plain", "PAG (up)", "FreeU", "PAG (up) + FreeU"],
)

# %% [markdown]
# ## 6. Measured
#
# One image per method says little. `benchmarks/guidance.py` generates the held-out prompts of TinyWorld's
# split with several seeds and lets the judge read every image: for Attend-and-Excite, the share of two-object
# images with both objects (its schedule chosen on a separate validation split); for SAG, PAG and FreeU, single
# and two-object prompts with and without classifier-free guidance, and unconditional samples; and each
# method's cost against diffusers' own pipeline. Its results, when they are in this checkout (± is the half-width
# of a 95% interval: with about a hundred images, differences of a few points are within the noise):

# %%
results_path = Path(lab.__file__).resolve().parent.parent / "benchmarks" / "results" / "guidance.json"


def percent(value, n=None):
    """A rate, with the half-width of its 95% interval when the number of images is known."""
    if value is None:
        return "–"
    spread = f" ± {196 * (value * (1 - value) / n) ** 0.5:.0f}" if isinstance(n, int) and n > 0 else ""
    return f"{100 * value:.1f}%{spread}"


def tables(results):
    lines = []
    ae = results.get("ae")
    if ae:
        n = ae.get("n", {})
        lines += [
            f"**Attend-and-Excite** (schedule chosen on validation: *{ae.get('chosen', '?')}*)",
            "",
            f"| test split | pairs present ({n.get('test_pairs', '?')} images) | single correct "
            f"({n.get('test_single', '?')} images) |",
            "|---|---|---|",
        ]
        lines += [
            f"| {name} | {percent(row.get('pairs_present'), n.get('test_pairs'))} | "
            f"{percent(row.get('single_correct'), n.get('test_single'))} |"
            for name, row in ae.get("test", {}).items()
        ]
        lines.append("")
    for part, title in (("sag_pag", "SAG and PAG"), ("freeu", "FreeU")):
        block = results.get(part)
        if not block:
            continue
        lines += [
            f"**{title}**",
            "",
            "| method | single correct, w = 1 | pairs, w = 1 | single correct, w = 5 | pairs, w = 5 | unconditional: an object |",
            "|---|---|---|---|---|---|",
        ]
        n = block.get("n", {})
        sizes = [n.get("single"), n.get("pairs"), n.get("single"), n.get("pairs"), n.get("unconditional")]
        keys = ("single_correct_g1", "pairs_present_g1", "single_correct_g5", "pairs_present_g5", "unconditional_valid")
        for name, row in block.get("rows", {}).items():
            cells = " | ".join(percent(row.get(key), size) for key, size in zip(keys, sizes))
            lines.append(f"| {name} | {cells} |")
        lines.append("")
    cost = results.get("cost")
    if cost:
        lines += ["**Cost** (median seconds per call)", "", "| run | seconds |", "|---|---|"]
        lines += [f"| {name} | {seconds:.2f} |" for name, seconds in cost.get("median_seconds", {}).items()]
        ratios = cost.get("lab_over_diffusers", {})
        lines += ["", "lab / diffusers: " + ", ".join(f"{k} {v:.2f}×" for k, v in ratios.items()), ""]
    return "\n".join(lines)


if results_path.exists():
    display(Markdown(tables(json.loads(results_path.read_text()))))
    maxima_plot = results_path.with_name("guidance_ae_maxima.png")
    if maxima_plot.exists():  # the benchmark's failing case: per-step maxima, plain and with A&E
        display(Image(filename=str(maxima_plot)))
else:
    display(
        Markdown(
            "No measurements in this checkout yet: run `python benchmarks/guidance.py` (about 40 minutes on two "
            "CPU cores) to write `benchmarks/results/guidance.json` and `guidance.md`, then run this cell again."
        )
    )

# %% [markdown]
# ## 7. Explore
#
# The guidance explorer shows one prompt and seed plain and guided, side by side with their difference. Choose
# a method and drag its scale: each scale computed once is kept, so moving back to it redraws at once; a new
# one runs the model (a progress bar counts the steps). Below the images is what the method reads, per step:
# Attend-and-Excite's subject maps and their maxima (guided solid, plain dashed), SAG's mask, PAG's perturbed
# layers and $|\epsilon(c) - \hat\epsilon(c)|$, FreeU's backbone and skip features before and after its edits.
# FreeU's slider is a strength $t$: every factor moves from 1 (off) to the preset's, $b = 1 + t(b_{\text{preset}} - 1)$.
# It opens on the case of section 1.

# %%
explorer = widgets.GuidanceExplorer(
    pipe,
    prompt,
    seed=seed,
    num_inference_steps=num_inference_steps,
    guidance_scale=guidance_scale,
    subjects=subjects,
)
explorer
