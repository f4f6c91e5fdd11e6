"""lab.weights: weight edits and LoRA adapters that put every tensor back, bit for bit, on every exit path."""

import inspect

import pytest
import torch
from conftest import generate
from safetensors.torch import save_file

import lab
import lab.weights as weights
from lab.weights import LoraAdapter, LoraWeights, WeightEdit

KV = "unet.*.attn2.to_[kv].weight"
BUILDERS = {"sd1": "tiny_sd1_pipeline", "sd2": "tiny_sd2_pipeline", "sdxl": "tiny_sdxl_pipeline"}


def state(pipe):
    """Everything an edit must give back: every component's state_dict, requires_grad, grads, module types."""
    tensors, flags, types = {}, {}, {}
    for root, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            tensors.update({f"{root}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
            flags.update({f"{root}.{k}": (p.requires_grad, p.grad) for k, p in module.named_parameters()})
            types.update({f"{root}.{k}": type(m) for k, m in module.named_modules()})
    return tensors, flags, types


def differences(pipe, before) -> list[str]:
    tensors, flags, types = state(pipe)
    out = [f"keys {sorted(tensors.keys() ^ before[0].keys())[:3]}"] if tensors.keys() != before[0].keys() else []
    out += [
        k
        for k, v in tensors.items()
        if k in before[0] and not (v.dtype == before[0][k].dtype and torch.equal(v, before[0][k]))
    ]
    out += [
        f"requires_grad/grad {k}"
        for k, (g, grad) in flags.items()
        if (g, grad is None) != (before[1].get(k, (None,))[0], True)
    ]
    if types != before[2]:
        out.append(f"module types {sorted(map(str, types.items() ^ before[2].items()))[:3]}")
    return out


def halve(edit):
    with torch.no_grad():
        for p in edit.parameters.values():
            p.mul_(0.5)


# ------------------------------------------------------------------------------- restoring


def test_normal_exit_restores_bit_for_bit(any_pipe, restored):
    before, hooks, base = state(any_pipe), restored(any_pipe), generate(any_pipe)
    with WeightEdit(any_pipe, KV) as w:
        assert w.parameters and all(".attn2.to_" in n for n in w.parameters)
        halve(w)
        assert w.changed() == list(w.parameters)
        assert all(torch.allclose(d, -p.detach()) for d, p in zip(w.delta().values(), w.parameters.values()))
        assert not torch.equal(generate(any_pipe), base)
    assert differences(any_pipe, before) == []
    assert torch.equal(generate(any_pipe), base)
    hooks()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_and_keyboard_interrupt_restore(sd1, error):
    before = state(sd1)
    with pytest.raises(error):
        with WeightEdit(sd1, ["unet.*attn2*", "text_encoder.*.layers.0.*"]) as w:
            halve(w)
            generate(sd1)
            raise error("mid-block")
    assert differences(sd1, before) == []


def test_fault_during_training_loop_restores_values_flags_and_grads(sd1):
    """ESD-x style: optimizer steps on the attn2 parameters, requires_grad toggled, a fault at step 2."""
    before = state(sd1)
    unet = sd1.unet
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with pytest.raises(RuntimeError, match="injected"):
        with WeightEdit(sd1, lambda n, p: n.startswith("unet.") and ".attn2." in n) as w:
            params = list(w.parameters.values())
            for i, p in enumerate(params):
                p.requires_grad_(i % 2 == 0)
            trainable = [p for p in params if p.requires_grad]
            optimizer = torch.optim.Adam(trainable, lr=1e-2)
            for step in range(4):
                loss = unet(latents, 500, encoder_hidden_states=context).sample.square().mean()
                # grads of the chosen parameters only: the rest of the UNet is not this edit's to restore
                for p, g in zip(trainable, torch.autograd.grad(loss, trainable)):
                    p.grad = g
                optimizer.step()
                if step == 2:
                    assert w.changed()
                    raise RuntimeError("injected fault")
    assert differences(sd1, before) == []


def test_dtype_shape_and_replaced_parameter_are_restored(sd1):
    before = state(sd1)
    attn = sd1.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    k, v = attn.to_k.weight, attn.to_v.weight
    with WeightEdit(sd1, KV, offload=True) as w:
        k.data = k.data.to(torch.float16)  # dtype changed
        v.data = v.data[:1].clone()  # shape changed
        attn.to_q.weight.requires_grad_(False)  # not selected: not ours to restore
        attn.to_k.weight = torch.nn.Parameter(torch.zeros(3))  # another Parameter object at the name
        assert {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"} <= set(w.changed())
    attn.to_q.weight.requires_grad_(True)
    assert attn.to_k.weight is k and attn.to_k.weight.dtype == torch.float32 and attn.to_v.weight.shape[0] > 1
    assert differences(sd1, before) == []


def test_changed_structure_is_refused_after_restoring_values(sd1):
    before = state(sd1)
    attn = sd1.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    original = attn.to_k
    try:
        with pytest.raises(RuntimeError, match=r"(?s)structure changed.*attn2.to_k.weight: another Linear at"):
            with WeightEdit(sd1, KV) as w:
                halve(w)
                attn.to_k = torch.nn.Linear(original.in_features, original.out_features, bias=False)
        name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        assert torch.equal(original.weight, before[0][name])  # the values went back into the old module
    finally:
        attn.to_k = original
    assert differences(sd1, before) == []


def test_a_broken_restore_is_caught(sd1):
    """The checks above can fail: drop one parameter from the snapshot and `differences` names it."""
    name = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    before = state(sd1)
    with WeightEdit(sd1, name):  # the guard that cleans up after the sabotage
        with WeightEdit(sd1, KV) as w:
            halve(w)
            del w._saved[name]
        assert differences(sd1, before) == [name]
    assert differences(sd1, before) == []


def test_persistent_and_keep_keep_the_change(sd1):
    name = "unet.conv_in.weight"
    original = sd1.unet.conv_in.weight.detach().clone()
    with WeightEdit(sd1, name):  # outer guard puts it back at the end
        with WeightEdit(sd1, name, persistent=True) as w:
            halve(w)
        assert torch.equal(sd1.unet.conv_in.weight, original * 0.5)
        with pytest.raises(RuntimeError, match="closed"):
            w.changed()
        with WeightEdit(sd1, name) as w:
            halve(w)
            w.keep()
        assert torch.equal(sd1.unet.conv_in.weight, original * 0.25)
    assert torch.equal(sd1.unet.conv_in.weight, original)


def test_unknown_selector_is_a_clear_error_and_changes_nothing(sd1):
    before = state(sd1)
    with pytest.raises(ValueError, match=r"(?s)to_kk.*Did you mean.*attn2\.to_k\.weight"):
        WeightEdit(sd1, "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_kk.weight")
    with pytest.raises(ValueError, match="start with a component: .*unet"):
        WeightEdit(sd1, ["unet.conv_in.weight", "down_blocks.0.attentions.0.proj_in.weight"])
    with pytest.raises(ValueError, match="bare module"):
        WeightEdit(sd1.unet, "unet.conv_in.weight")
    with pytest.raises(ValueError, match="predicate"):
        WeightEdit(sd1, lambda n, p: False)
    assert differences(sd1, before) == []


def test_an_edit_dropped_outside_with_warns(sd1):
    with pytest.warns(RuntimeWarning, match="dropped without being restored"):
        WeightEdit(sd1, "unet.conv_in.bias")


def test_esd_u_selection_is_everything_but_attn2(sd1):
    esd_u = weights.select_parameters(sd1.unet, lambda n, p: ".attn2." not in n)
    assert len(esd_u) + len(weights.select_parameters(sd1.unet, "*.attn2.*")) == len(list(sd1.unet.parameters()))
    assert (
        weights.select_parameters(sd1, "unet.down_blocks.1.*")
        .keys()
        .isdisjoint(weights.select_parameters(sd1, "unet.down_blocks.0.*").keys())
    )


# ------------------------------------------------------------------------------- saving


def test_save_load_apply_reproduces_weights_and_latents(any_pipe, tmp_path):
    before, base = state(any_pipe), generate(any_pipe)
    with WeightEdit(any_pipe, KV) as w:
        first = next(iter(w.parameters.values()))
        with torch.no_grad():
            first.mul_(-1.5)  # only one of them changes: only it is saved
        edited, latents = {n: p.detach().clone() for n, p in w.parameters.items()}, generate(any_pipe)
        names = w.save(tmp_path / "edit.safetensors")
        assert names == w.changed() and len(names) == 1
    saved = weights.load(tmp_path / "edit.safetensors")
    assert list(saved.tensors) == names and saved.metadata["format"] == "sdlab.weights"
    assert saved.metadata["components"] == {"unet": "UNet2DConditionModel"}
    assert saved.metadata["parameters"][names[0]] == {"shape": list(edited[names[0]].shape), "dtype": "float32"}
    with saved.apply(any_pipe) as again:
        assert all(torch.equal(p, edited[n]) for n, p in again.parameters.items())
        assert torch.equal(generate(any_pipe), latents)
    assert differences(any_pipe, before) == [] and torch.equal(generate(any_pipe), base)
    with weights.load(tmp_path / "edit.safetensors").apply(any_pipe.unet):  # a pipeline's edit fits its bare UNet
        assert torch.equal(generate(any_pipe), latents)
    assert differences(any_pipe, before) == []


def test_persistent_apply(sd1, tmp_path):
    with WeightEdit(sd1, "unet.conv_in.bias") as w:
        with torch.no_grad():
            w.parameters["unet.conv_in.bias"].add_(1.0)
        w.save(tmp_path / "bias.safetensors")
        edited = sd1.unet.conv_in.bias.detach().clone()
    with WeightEdit(sd1, "unet.conv_in.bias"):  # guard
        weights.load(tmp_path / "bias.safetensors").apply(sd1, persistent=True)
        assert torch.equal(sd1.unet.conv_in.bias, edited)
    assert not torch.equal(sd1.unet.conv_in.bias, edited)


def test_loading_onto_another_architecture_refuses_and_changes_nothing(sd1, sd2, sdxl, tmp_path):
    with WeightEdit(sd1.unet, "*.attn2.to_k.weight") as w:  # saved from a bare UNet
        halve(w)
        w.save(tmp_path / "sd1.safetensors")
    saved = weights.load(tmp_path / "sd1.safetensors")
    for other, why in ((sd2, "another architecture"), (sdxl, "does not fit this model")):
        before = state(other)
        with pytest.raises(ValueError, match=f"{why}.*nothing was changed"):
            saved.apply(other)
        assert differences(other, before) == []
    before = state(sd2)
    with pytest.warns(UserWarning, match="another architecture"):  # names and shapes fit: it can be forced
        with saved.apply(sd2, strict=False) as w:
            assert w.changed()
    assert differences(sd2, before) == []
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an sdlab weight edit"):
        weights.load(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="nothing to save"):
        with WeightEdit(sd1, KV) as w:
            w.save(tmp_path / "empty.safetensors")


# ------------------------------------------------------------------------------- LoRA


def lora_config(r=4, alpha=4):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=["to_k", "to_v", "to_q", "to_out.0"])


def randomize(lora):
    """peft starts lora_B at zero (a no-op adapter): give it values so that the adapter matters."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.parameters.values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def test_lora_scale_zero_is_the_base_model_and_removal_leaves_everything(any_pipe, restored):
    before, hooks, base = state(any_pipe), restored(any_pipe), generate(any_pipe)
    with LoraAdapter(any_pipe, lora_config(), scale=0.0) as lora:
        randomize(lora)
        assert lora.parameters and all("lora_" in n for n in lora.parameters)
        assert torch.equal(generate(any_pipe), base)
        lora.scale = 1.0
        assert not torch.allclose(generate(any_pipe), base)
    assert differences(any_pipe, before) == []
    assert not hasattr(any_pipe.unet, "peft_config")
    assert torch.equal(generate(any_pipe), base)
    hooks()


def test_exception_inside_lora_removes_it(sd1):
    before = state(sd1)
    with pytest.raises(KeyboardInterrupt):
        with LoraAdapter(sd1, lora_config()) as lora:
            optimizer = torch.optim.SGD(list(lora.parameters.values()), lr=0.1)
            sd1.unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 32)).sample.sum().backward()
            optimizer.step()
            raise KeyboardInterrupt
    assert differences(sd1, before) == []
    with pytest.raises(ValueError, match="already loaded"):  # a taken name is refused before anything is added
        with LoraAdapter(sd1, lora_config(), adapter_name="a"):
            LoraAdapter(sd1, lora_config(), adapter_name="a")
    assert differences(sd1, before) == []


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_saved_lora_loads_in_plain_diffusers(kind, request, tmp_path):
    pipe = request.getfixturevalue(kind)
    before = state(pipe)
    with LoraAdapter(pipe, lora_config()) as lora:
        randomize(lora)
        ours, half = generate(pipe), None
        lora.scale = 0.5
        half = generate(pipe)
        lora.save(tmp_path / "lora")
    assert differences(pipe, before) == []

    fresh = getattr(lab.testing, BUILDERS[kind])()
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(tmp_path / "lora")  # plain diffusers, no sdlab
    assert torch.equal(generate(fresh), ours)
    fresh.unload_lora_weights()  # (plain diffusers leaves every base parameter requires_grad=False)
    fresh_before = state(fresh)
    with LoraWeights(fresh, tmp_path / "lora", scale=0.5):
        assert torch.equal(generate(fresh), half)
    with pytest.raises(RuntimeError):
        with LoraWeights(fresh, tmp_path / "lora", scale=0.5):
            raise RuntimeError
    assert differences(fresh, fresh_before) == []


def test_lora_alpha_travels_with_the_file_or_is_refused(sd1, tmp_path):
    with LoraAdapter(sd1, lora_config(r=2, alpha=8)) as lora:
        randomize(lora)
        ours = generate(sd1)
        if "unet_lora_adapter_metadata" not in inspect.signature(type(sd1).save_lora_weights).parameters:
            with pytest.raises(NotImplementedError, match="lora_alpha"):  # diffusers before LoRA metadata
                lora.save(tmp_path / "lora")
            return
        lora.save(tmp_path / "lora")
    with LoraWeights(sd1, tmp_path / "lora"):
        assert torch.equal(generate(sd1), ours)


# ------------------------------------------------------------------------------- with lab.trace


def cross_maps(pipe):
    with lab.trace(pipe) as tr:
        maps = tr.capture("cross", "probs", reduce=lab.Mean(over=("steps", "heads")))
        generate(pipe)
    return maps.result()


def test_trace_inside_edit_and_edit_inside_trace(sd1, restored):
    before, hooks, base = state(sd1), restored(sd1), cross_maps(sd1)
    with WeightEdit(sd1, KV) as w:
        halve(w)
        edited = cross_maps(sd1)
    assert any(not torch.equal(edited[k], base[k]) for k in base)
    with lab.trace(sd1) as tr:
        maps = tr.capture("cross", "probs", reduce=lab.Mean(over=("steps", "heads")))
        with WeightEdit(sd1, KV) as w:
            halve(w)
            generate(sd1)
    assert all(torch.equal(maps.result()[k], edited[k]) for k in base)
    assert all(torch.equal(v, base[k]) for k, v in cross_maps(sd1).items())
    assert differences(sd1, before) == []
    hooks()


def test_trace_inside_lora_and_lora_inside_a_qkv_trace_is_refused(sd1, restored):
    before, hooks = state(sd1), restored(sd1)
    with LoraAdapter(sd1, lora_config()) as lora:
        randomize(lora)
        with lab.trace(sd1) as tr:
            keys = tr.capture("cross", "k")
            generate(sd1)
        assert keys.result()
    with lab.trace(sd1) as tr:
        tr.capture("cross", "k")
        with pytest.raises(ValueError, match="Open the LoRA context first"):
            LoraAdapter(sd1, lora_config())
        assert differences(sd1, before) == []
    assert differences(sd1, before) == []
    hooks()
