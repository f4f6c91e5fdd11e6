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
