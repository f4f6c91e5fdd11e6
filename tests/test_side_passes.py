"""Side passes (a technique's own UNet calls) and shared_trace (techniques stacking on one trace)."""

import pytest
import torch

import lab
from lab.hooks import shared_trace
from lab.testing import tiny_sd1_pipeline

STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd1_pipeline()


def generate(pipe, **kwargs):
    return pipe(
        "a red circle",
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **kwargs,
    ).images


def test_call_unet_is_a_side_pass_at_the_step_it_serves(pipe):
    seen = []
    with lab.trace(pipe) as tr:
        main_only = tr.capture("unet", "output", reduce=lab.Stack(), rows="both")
        everywhere = tr.capture("unet", "output", reduce=lab.Stack(), rows="both", passes="all")

        def rerun(pred, ctx):
            extra = tr.call_unet("probe", rows=ctx.rows("cond"), parts=("cond",))
            seen.append((ctx.step, tr._ctx.pass_name, extra.shape[0]))
            return pred

        tr.edit("unet", "output", rerun, passes="main")
        steps_seen = []
        tr.edit("up_blocks.1", "output", lambda x, ctx: steps_seen.append((ctx.step, ctx.pass_name)) or x)
        generate(pipe)
    # one side pass per step, after which the main call goes on with its own context
    assert seen == [(step, "main", 1) for step in range(STEPS)]
    assert steps_seen == [(step, name) for step in range(STEPS) for name in ("main", "probe")]
    assert len(main_only.contexts) == STEPS and {c.pass_name for c in main_only.contexts} == {"main"}
    assert [(c.step, c.pass_name, c.batch_size) for c in everywhere.contexts] == [
        (step, name, batch) for step in range(STEPS) for name, batch in (("probe", 1), ("main", 2))
    ]


def test_side_pass_does_not_move_the_step_bookkeeping(pipe):
    """A pass run between two steps (Attend-and-Excite's, from callback_on_step_end) keeps its timestep's step."""
    contexts = []
    with lab.trace(pipe) as tr:
        tr.edit("mid_block", "output", lambda x, ctx: contexts.append(ctx) or x)

        def between_steps(p, i, t, kwargs):
            if i + 1 < STEPS:
                nxt = p.scheduler.timesteps[i + 1]
                embeds = torch.zeros(1, 77, p.text_encoder.config.hidden_size)
                with tr.side_pass("between"):
                    p.unet(kwargs["latents"], nxt, encoder_hidden_states=embeds)
            return {}

        generate(pipe, callback_on_step_end=between_steps)
    main = [(c.step, c.run_step) for c in contexts if c.pass_name == "main"]
    side = [(c.step, c.parts, c.batch_size) for c in contexts if c.pass_name == "between"]
    assert main == [(i, i) for i in range(STEPS)]
    assert side == [(i, ("cond",), 1) for i in range(1, STEPS)]


def test_side_pass_errors(pipe):
    with lab.trace(pipe) as tr:
        with pytest.raises(ValueError, match="other than 'main'"):
            with tr.side_pass("main"):
                pass
        with tr.side_pass("a"):
            with pytest.raises(RuntimeError, match="inside side pass 'a'"):
                with tr.side_pass("b"):
                    pass
        with pytest.raises(RuntimeError, match="during a pipeline's UNet call"):
            tr.call_unet("x", rows=[0])
        with pytest.raises(TypeError, match="passes must be"):
            tr.capture("mid_block", "output", passes=[])


def test_shared_trace_opens_one_or_joins_the_active_one(pipe):
    plain = generate(pipe)
    # no trace active: shared_trace opens one and closes it
    with shared_trace(pipe) as tr:
        tr.edit("mid_block", "output", lambda x, ctx: x * 0.5)
        halved = generate(pipe)
    assert lab.active_hooks(pipe) == []
    assert not torch.allclose(halved, plain)
    # inside a user's trace: joins it, and removes only what it registered, also on an exception
    with lab.trace(pipe) as user:
        cap = user.capture("mid_block", "output")
        with pytest.raises(KeyError):
            with shared_trace(pipe) as joined:
                assert joined is user
                joined.edit("mid_block", "output", lambda x, ctx: x * 0.5)
                joined.name_rows(parts=("uncond", "cond"))
                raise KeyError("interrupted")
        assert user.describe() == [repr(cap)] and user._named_parts is None
        again = generate(pipe)
    assert torch.equal(again, plain)
    assert lab.active_hooks(pipe) == []


def test_extra_rows_extend_every_input_and_are_dropped_from_the_output(pipe):
    plain = generate(pipe)
    with lab.trace(pipe) as tr:
        with tr.extra_rows("probe", copy_of="cond"):
            inputs = tr.capture("unet", "input", reduce=lab.Stack(), rows="all")
            seen = []
            tr.edit("mid_block", "output", lambda x, ctx: seen.append((ctx.parts, ctx.groups.get("probe"))) or x)
            extended = generate(pipe)
            x = inputs["unet"]  # (steps, 3 rows, ...): the copy is the cond row
        assert tr.extra_parts == ()
        after = generate(pipe)
    # identical results: the copied rows change nothing the pipeline sees
    assert torch.allclose(extended, plain, atol=1e-6) and torch.equal(after, plain)
    assert seen == [(("uncond", "cond", "probe"), (2,))] * STEPS + [(("uncond", "cond"), None)] * STEPS
    assert x.shape[1] == 3 and torch.equal(x[:, 2], x[:, 1])


def test_extra_rows_on_sdxl_copy_the_added_conditioning():
    from lab.testing import tiny_sdxl_pipeline

    xl = tiny_sdxl_pipeline()
    run = dict(num_inference_steps=2, guidance_scale=5.0, output_type="latent")
    plain = xl("a red circle", generator=torch.Generator().manual_seed(0), **run).images
    with lab.trace(xl) as tr, tr.extra_rows("probe"):
        out = tr.capture("unet", "output", reduce=lab.Stack(), rows="all")
        extended = xl("a red circle", generator=torch.Generator().manual_seed(0), **run).images
    assert torch.allclose(extended, plain, atol=1e-5)
    assert torch.allclose(out["unet"][:, 2], out["unet"][:, 1], atol=1e-5)  # same inputs -> same prediction


def test_extra_rows_errors(pipe):
    with lab.trace(pipe) as tr:
        with pytest.raises(ValueError, match="already names rows"):
            with tr.extra_rows("cond"):
                pass
        with tr.extra_rows("probe", copy_of="nothing"):
            with pytest.raises(ValueError, match="copy_of='nothing'"):
                generate(pipe)
        assert tr.extra_parts == ()
    assert torch.equal(generate(pipe), generate(pipe))


def test_resolution_selector_registered_after_a_run_at_another_size(pipe):
    """A selector naming a resolution is checked against the next run's latent size, not the last one's."""
    with lab.trace(pipe) as tr:
        pipe("a", num_inference_steps=1, height=32, width=32, output_type="latent")  # latent 4x4
        size = lab.hooks.sites(pipe)[0].spatial_size((8, 8))
        cap = tr.capture(f"cross {size[0]}x{size[1]}", "probs")  # exists at 64 px, not at 32 px
        generate(pipe)  # 64 px
        assert cap.result()
        with pytest.raises(ValueError, match="matches no site"):
            tr.capture("cross 3x3", "probs")
            generate(pipe)
