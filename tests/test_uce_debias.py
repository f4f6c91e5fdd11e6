"""lab.uce_debias: each round is UCE's closed form with guide c + Σ α a (the paper's formula solved directly), α moves
by the measured gap, the loop stops when the proportions are reached, and every weight comes back bit for bit,
also after a failing classifier; bad input is refused before anything changes."""

import itertools

import pytest
import torch
from test_uce import assert_same, cross_kv, paper_solution, reference_c, weights

from lab import uce_debias

FAST = dict(images=2, num_inference_steps=2, height=64, width=64, output_type="np", progress=False)


def always(label):
    return lambda image: label


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_the_second_round_is_the_papers_closed_form_with_the_attribute_mix(name, request):
    pipe = request.getfixturevalue(name)
    before = weights(pipe)
    old = {n: m.weight.detach().clone() for n, m in cross_kv(pipe).items()}
    with uce_debias.debias(
        pipe, ["doctor"], ["male", "female"], always("male"), preserve=["nurse"], rounds=2, **FAST
    ) as edit:
        assert [h.tolist() for h in edit.history] == [[[1.0, 0.0]], [[1.0, 0.0]]] and not edit.converged
        assert edit.alphas.tolist() == [[-0.5, 0.5]]  # round 2's α: the gap of round 1, step 1
        if name == "sd1":  # the reference's c (SDXL's is two encoders concatenated: test_uce checks that read)
            c, a = reference_c(pipe, "doctor"), {w: reference_c(pipe, w) for w in ("male", "female", "nurse")}
            guide = c - 0.5 * a["male"] + 0.5 * a["female"]
            for n, module in cross_kv(pipe).items():
                want = paper_solution(old[n], [c], [guide], [a["nurse"]], 0.5)
                torch.testing.assert_close(module.weight.double(), want, rtol=1e-4, atol=1e-5)
        assert edit.changed()
    assert_same(pipe, before)


def test_round_one_changes_nothing_and_reached_proportions_stop_the_loop(sd1):
    before = weights(sd1)
    labels = itertools.cycle(["male", "female"])
    with uce_debias.debias(sd1, "doctor", ["male", "female"], lambda image: next(labels), **FAST) as edit:
        assert edit.converged and len(edit.history) == 1 and edit.alphas.tolist() == [[0.0, 0.0]]
        assert_same(sd1, before)  # α = 0: v* = W_old c, the closed form gives W_old back exactly
    assert_same(sd1, before)


def test_a_failing_classifier_leaves_every_weight_as_it_was(sd1):
    before = weights(sd1)
    calls = itertools.count()

    def classify(image):
        if next(calls) == 3:  # round 2, after the first rewrite with α != 0
            raise RuntimeError("classifier crashed")
        return "male"

    with pytest.raises(RuntimeError, match="crashed"):
        uce_debias.debias(sd1, "doctor", ["male", "female"], classify, rounds=5, **FAST)
    assert_same(sd1, before)
    with pytest.raises(ValueError, match="not one of"):
        uce_debias.debias(sd1, "doctor", ["male", "female"], always("nurse"), **FAST)
    assert_same(sd1, before)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(attributes=["male"]), ValueError, "two or more"),
        (dict(attributes=["male", "male"]), ValueError, "two or more"),
        (dict(desired=[0.7, 0.7]), ValueError, "sum to 1"),
        (dict(desired=[1.0]), ValueError, "one proportion"),
        (dict(desired=[float("nan"), 1.0]), ValueError, "one proportion"),
        (dict(rounds=0), ValueError, "rounds"),
        (dict(classify="male"), TypeError, "function"),
        (dict(preserve=[]), ValueError, "preserve=None"),
        (dict(concepts=[""]), ValueError, "empty concept"),
    ],
)
def test_bad_input_is_refused_before_anything_changes(sd1, kwargs, error, message):
    before = weights(sd1)
    args = dict(concepts="doctor", attributes=["male", "female"], classify=always("male"))
    args.update(kwargs)
    with pytest.raises(error, match=message):
        uce_debias.debias(sd1, args.pop("concepts"), args.pop("attributes"), args.pop("classify"), **args, **FAST)
    assert_same(sd1, before)


def test_a_classifier_that_never_answers_is_warned_about(sd1):
    with pytest.warns(UserWarning, match="None for all 2 images"):
        uce_debias.debias(sd1, "doctor", ["male", "female"], always(None), rounds=1, **FAST).restore()
