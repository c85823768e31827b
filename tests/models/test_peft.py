"""``patch_model`` on HuggingFace PEFT multi-LoRA vision towers (tiny SigLIP / CLIP from configs, random weights,
no downloads): mixed-batch outputs vs PEFT's ``adapter_names``, per-adapter gradients vs PEFT with that adapter
alone, training then ``save_pretrained`` / reload, unfusable layers reported and still right, bad selections."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import PeftModel  # noqa: E402

from conftest import kernel_device  # noqa: E402
from helpers.peft_towers import ADAPTERS, make_peft, pixels, tiny_tower  # noqa: E402
from monkey_kernels.patching import NothingToPatchError, is_patched, patch_model, unpatch_model  # noqa: E402
from monkey_kernels.rules.peft_lora import (  # noqa: E402
    RULE_NAME, adapter_selection, clear_adapter_rows, peft_adapter_names, set_adapter_rows,
)
from helpers.peft_towers import build_peft  # noqa: E402

BACKENDS = ["triton", "torch"]
ROWS = ["red", "__base__", "green", "blue", "red"]
TOL = dict(atol=2e-5, rtol=2e-5)


def lora_params(model: nn.Module, adapter: str):
    return {n: p for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n}


def train_all_adapters_(model: nn.Module) -> None:
    # PEFT only trains the active adapter; a multi-adapter batch trains all of them.
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, name: str, rel: float = 2e-5) -> None:
    """fp32 gradients summed in another order: every entry within ``rel`` of the tensor's largest entry
    (an elementwise rtol fails on entries near zero that come from cancelling sums)."""
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rel * scale + 1e-12, f"{name}: max error {error:.3e} vs largest entry {scale:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_mixed_batch_matches_peft_adapter_names(family, backend):
    device = kernel_device(backend)
    model = make_peft(family, device=device).eval()
    x = pixels(model, len(ROWS), device)
    with torch.no_grad():
        expected = model(pixel_values=x, adapter_names=ROWS)
        single = model(pixel_values=x)  # PEFT's active adapter ("red") on every row
    keys_before = list(model.state_dict().keys())
    report = patch_model(model, backend=backend)
    assert report.rules[RULE_NAME] == 12 and report.skipped == []  # 2 layers x 6 Linear layers
    assert list(model.state_dict().keys()) == keys_before
    with torch.no_grad(), adapter_selection(model, ROWS):
        got = model(pixel_values=x)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, **TOL)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, **TOL)
    # The base-only row differs from every adapter row: the selection really switched adapters.
    assert not torch.allclose(expected.last_hidden_state[1], single.last_hidden_state[1], atol=1e-3)
    with torch.no_grad():
        by_id = None
        with adapter_selection(model, [0, -1, 1, 2, 0]):  # ids in load order
            by_id = model(pixel_values=x).last_hidden_state
        # PEFT's own adapter_names kwarg also runs through the fused layers (eval, as PEFT allows).
        via_peft = model(pixel_values=x, adapter_names=ROWS).last_hidden_state
        # Outside a selection: PEFT's single active adapter on all rows, fused.
        active = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(by_id, expected.last_hidden_state, **TOL)
    torch.testing.assert_close(via_peft, expected.last_hidden_state, **TOL)
    torch.testing.assert_close(active, single.last_hidden_state, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_gradients_match_peft_per_adapter(backend):
    device = kernel_device(backend)
    model = make_peft("siglip", device=device).train()
    reference = copy.deepcopy(model)
    train_all_adapters_(model)
    x = pixels(model, len(ROWS), device)
    weights = torch.randn(len(ROWS), 4, 32, device=device)  # [B, tokens, hidden]: a non-trivial loss
    patch_model(model, backend=backend)
    with adapter_selection(model, ROWS):
        (model(pixel_values=x).last_hidden_state * weights).sum().backward()
    for adapter in ADAPTERS:
        reference.set_adapter(adapter)
        train_all_adapters_(reference)
        reference.zero_grad(set_to_none=True)
        idx = [i for i, name in enumerate(ROWS) if name == adapter]
        (reference(pixel_values=x[idx]).last_hidden_state * weights[idx]).sum().backward()
        expected = lora_params(reference, adapter)
        got = lora_params(model, adapter)
        assert expected.keys() == got.keys() and len(got) > 0
        for name, p in got.items():
            assert p.grad is not None, name
            assert_close_to_scale(p.grad, expected[name].grad, name)
    # Base weights are frozen by PEFT: the fused op must not produce gradients for them.
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_gradient_checkpointing_keeps_the_selection():
    model = make_peft("siglip").train()
    checkpointed = copy.deepcopy(model)
    checkpointed.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = pixels(model, len(ROWS), "cpu")
    grads = []
    for m in (model, checkpointed):
        train_all_adapters_(m)
        patch_model(m, backend="torch")
        with adapter_selection(m, ROWS):  # backward inside: the recomputed forward reads the same rows
            m(pixel_values=x).last_hidden_state.square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, grad in grads[0].items():
        assert_close_to_scale(grads[1][name], grad, name)


@pytest.mark.parametrize("blue_p", [0.5, 0.0])
def test_per_adapter_dropout_in_training(blue_p):
    """red has p=0.5; blue 0.5 (one p: in-kernel dropout) or 0 (different p: per-row dropout on lora_input)."""
    adapters = {"red": dict(ADAPTERS["red"], lora_dropout=0.5), "blue": dict(ADAPTERS["blue"], lora_dropout=blue_p)}
    model = make_peft("siglip", adapters={k: {a: b for a, b in v.items() if a != "lora_dropout"}
                                          for k, v in adapters.items()})
    for name, kwargs in adapters.items():  # make_peft builds with dropout 0: set PEFT's dropout modules here
        for m in model.modules():
            if isinstance(m, peft.tuners.lora.layer.LoraLayer) and name in m.lora_dropout:
                m.lora_dropout[name] = nn.Dropout(kwargs["lora_dropout"]) if kwargs["lora_dropout"] else nn.Identity()
    train_all_adapters_(model)
    patch_model(model, backend="torch")
    rows = ["red", "blue", "__base__"]
    x = pixels(model, len(rows), "cpu")
    with adapter_selection(model, rows):
        model.eval()
        with torch.no_grad():
            evaluated = model(pixel_values=x).last_hidden_state
        model.train()
        trained = model(pixel_values=x).last_hidden_state
        trained.square().sum().backward()
    close = [torch.allclose(trained[i], evaluated[i], atol=1e-6) for i in range(len(rows))]
    # Dropout only touches rows of adapters with p > 0; the base row never changes.
    assert close == [False, blue_p == 0.0, True]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_unused_adapter_gets_no_gradient():
    model = make_peft("siglip").train()
    train_all_adapters_(model)
    patch_model(model, backend="torch")
    with adapter_selection(model, ["red", "__base__"]):
        model(pixel_values=pixels(model, 2, "cpu")).last_hidden_state.sum().backward()
    assert all(p.grad is not None for p in lora_params(model, "red").values())
    # As with PEFT, an adapter no row uses is not part of the graph (an optimizer leaves it alone).
    assert all(p.grad is None for a in ("green", "blue") for p in lora_params(model, a).values())


@pytest.mark.parametrize("unpatch_first", [True, False])
def test_train_then_save_pretrained_and_reload(tmp_path, unpatch_first):
    backend = "torch" if unpatch_first else "triton"
    device = kernel_device(backend)
    model = make_peft("clip", device=device)
    base_state = copy.deepcopy(model.base_model.model.state_dict())  # base weights: frozen, never trained
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    train_all_adapters_(model)
    patch_model(model, backend=backend)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = pixels(model, len(ROWS), device)
    for _ in range(2):  # lora_B starts non-zero: every A and B moves at step 1; step 2 uses AdamW's moments
        optimizer.zero_grad()
        with adapter_selection(model, ROWS):
            model(pixel_values=x).pooler_output.square().mean().backward()
        optimizer.step()
    changed = [n for n, p in model.named_parameters() if "lora_" in n and not torch.equal(p, initial[n])]
    assert len(changed) == len(initial)  # every adapter's A and B trained
    model.eval()
    with torch.no_grad(), adapter_selection(model, ROWS):
        trained = model(pixel_values=x).last_hidden_state
    if unpatch_first:
        unpatch_model(model)
        assert not is_patched(model)
    model.save_pretrained(tmp_path)

    # Fresh PEFT model over the same base weights, adapters loaded from disk.
    base = tiny_tower("clip")
    base.load_state_dict({k.replace("base_layer.", ""): v for k, v in base_state.items() if "lora_" not in k})
    names = list(ADAPTERS)
    paths = {n: tmp_path / n if (tmp_path / n).is_dir() else tmp_path for n in names}
    loaded = PeftModel.from_pretrained(base, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        loaded.load_adapter(paths[name], adapter_name=name)
    loaded = loaded.to(device).eval()
    with torch.no_grad():
        reloaded = loaded(pixel_values=x, adapter_names=ROWS).last_hidden_state
    torch.testing.assert_close(reloaded, trained, **TOL)


def test_unfusable_layers_are_skipped_and_still_correct():
    adapters = dict(ADAPTERS)
    adapters["dora"] = dict(r=4, lora_alpha=4, use_dora=True, target_modules=["fc1"])
    # LoRA on the patch conv: a PEFT Conv2d LoRA layer.
    adapters["conv"] = dict(r=2, lora_alpha=2, target_modules=["patch_embedding", "fc2"])
    model = make_peft("siglip", adapters=adapters).eval()
    lora_layer = peft.tuners.lora.layer.LoraLayer
    report = patch_model(model, backend="torch")
    skipped = {name.split("model.")[-1]: reason for name, rule, reason in report.skipped}
    assert all(rule == RULE_NAME for _, rule, _ in report.skipped)
    assert sorted(skipped) == sorted(["embeddings.patch_embedding", "encoder.layers.0.mlp.fc1",
                                      "encoder.layers.1.mlp.fc1"])
    assert "DoRA" in skipped["encoder.layers.0.mlp.fc1"]
    assert "Conv2d" in skipped["embeddings.patch_embedding"]
    assert report.rules[RULE_NAME] == 10 and "skipped: 3" in str(report)
    for name, module in model.named_modules():
        if any(name.endswith(s) for s in skipped):
            assert isinstance(module, lora_layer) and "forward" not in module.__dict__, name
    # Skipped layers still follow the selection (PEFT's own per-row path), so mixed batches stay exact.
    rows = ["red", "conv", "__base__", "blue"]
    x = pixels(model, len(rows), "cpu")
    unpatched = copy.deepcopy(model)
    unpatch_model(unpatched)
    with torch.no_grad():
        expected = unpatched(pixel_values=x, adapter_names=rows).last_hidden_state
        with adapter_selection(model, rows):
            got = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, expected, **TOL)
    # A DoRA row cannot run per row in PEFT either: PEFT's error, not a silently wrong output.
    with pytest.raises(ValueError, match="DoRA"), torch.no_grad(), adapter_selection(model, ["dora", "red"]):
        model(pixel_values=pixels(model, 2, "cpu"))


def test_lora_embedding_is_skipped_and_never_silently_wrong():
    adapters = dict(ADAPTERS)
    adapters["emb"] = dict(r=2, lora_alpha=2, target_modules=["position_embedding"])
    model = make_peft("siglip", adapters=adapters).eval()
    report = patch_model(model, backend="torch")
    assert [(n.split("model.")[-1], "Embedding" in r) for n, _, r in report.skipped] == [
        ("embeddings.position_embedding", True)]
    # The position embedding sees position_ids [1, S], not one row per image: PEFT cannot select per row there
    # (its adapter_names raise the same way), so the selection raises instead of applying the active adapter.
    with pytest.raises(ValueError, match="adapter_names"), torch.no_grad(), \
            adapter_selection(model, ["red", "blue"]):
        model(pixel_values=pixels(model, 2, "cpu"))


def test_only_unfusable_layers_raises_nothing_to_patch():
    model = make_peft("siglip", adapters={"dora": dict(r=2, lora_alpha=2, use_dora=True, target_modules=["fc1"])})
    with pytest.raises(NothingToPatchError, match="DoRA"):
        patch_model(model)


def test_merged_adapter_layers_are_skipped():
    model = make_peft("siglip").eval()
    model.base_model.model.encoder.layers[0].mlp.fc2.merge(adapter_names=["red"])
    report = patch_model(model, backend="torch")
    skipped = [(n.split("model.")[-1], "merged" in r) for n, _, r in report.skipped]
    assert skipped == [("encoder.layers.0.mlp.fc2", True)]
    assert report.rules[RULE_NAME] == 11


def test_selection_validation_and_unpatch():
    model = make_peft("siglip").eval()
    assert peft_adapter_names(model) == list(ADAPTERS)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    patch_model(model, backend="torch")
    with pytest.raises(ValueError, match=r"rows\[1\]='purple' is not a loaded adapter"):
        set_adapter_rows(model, ["red", "purple"])
    with pytest.raises(ValueError, match=r"rows\[0\]=3 is not an adapter id"):
        set_adapter_rows(model, [3])
    with pytest.raises(ValueError, match="rows must be a sequence"):
        set_adapter_rows(model, "red")
    with pytest.raises(ValueError, match="1-D integer ids"):
        set_adapter_rows(model, torch.tensor([0.5]))
    assert set_adapter_rows(model, torch.tensor([2, -1, 0])).names == ("blue", None, "red")
    with adapter_selection(model, ["red", "blue"]):
        with pytest.raises(ValueError, match="3 batch rows .* selection has 2 rows"):
            model(pixel_values=pixels(model, 3, "cpu"))
        with adapter_selection(model, ["blue"]):  # nested: the inner one wins, the outer one comes back
            model(pixel_values=pixels(model, 1, "cpu"))
        model(pixel_values=pixels(model, 2, "cpu"))
    clear_adapter_rows(model)
    report = unpatch_model(model)
    assert report.rules[RULE_NAME] == 12 and not is_patched(model)
    lora_layer = peft.tuners.lora.layer.Linear
    layers = [m for m in model.modules() if isinstance(m, lora_layer)]
    assert len(layers) == 12 and all("forward" not in m.__dict__ for m in layers)
    assert all(not k.startswith("_monkey_kernels") for m in layers for k in m.__dict__)
    state = model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


# ---------------------------------------------------------------------------------------------------------
# adapter_selection / set_adapter_rows
# ---------------------------------------------------------------------------------------------------------
def test_adapter_selection_bad_rows_and_empty_batch():
    model, _, _ = build_peft()
    patch_model(model, backend="torch")
    cases = [
        (None, "rows must be a sequence"), ({"red": 0}, "rows must be a sequence"), ("red", "rows must be a sequence"),
        ([True], r"rows\[0\] must be an adapter name"), ([0.5], r"rows\[0\] must be an adapter name"),
        ([2], r"rows\[0\]=2 is not an adapter id"), ([-2], r"rows\[0\]=-2 is not an adapter id"),
        (["red", "purple"], r"rows\[1\]='purple' is not a loaded adapter"),
        (torch.tensor([[0]]), "rows as a tensor must be 1-D"), (torch.tensor([0.0]), "rows as a tensor must be 1-D"),
        (torch.tensor([0], device="meta"), "rows is a tensor on the meta device"),
    ]
    for rows, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            set_adapter_rows(model, rows)
        with pytest.raises(ValueError, match=pattern):
            with adapter_selection(model, rows):
                pass
    for bad in (None, "model"):
        with pytest.raises(ValueError, match="model must be an nn.Module"):
            set_adapter_rows(bad, [0])
        with pytest.raises(ValueError, match="model must be an nn.Module"):
            with adapter_selection(bad, [0]):
                pass
    # an empty selection for an empty batch, straight through one fused layer (the towers reject batch 0)
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    with adapter_selection(model, []):
        assert layer(torch.randn(0, 4, 32)).shape == (0, 4, 32)
    with adapter_selection(model, ["red", "blue"]):
        with pytest.raises(ValueError, match="input has 3 batch rows"):
            layer(torch.randn(3, 4, 32))


def test_peft_nan_image_stays_in_its_row():
    model, forward, _ = build_peft()
    model.eval()
    pixel_values = torch.randn(3, 3, 28, 28)
    pixel_values[1, 0, 0, 0] = float("nan")
    rows = ["red", "blue", "__base__"]
    with torch.no_grad(), adapter_selection(model, rows):
        expected = model(pixel_values=pixel_values).last_hidden_state
    patch_model(model, backend="torch")
    with torch.no_grad(), adapter_selection(model, rows):
        out = model(pixel_values=pixel_values).last_hidden_state
    assert torch.equal(out.isnan(), expected.isnan()) and not out[[0, 2]].isnan().any()
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-4, atol=1e-5)


def test_inference_reuses_stacked_adapters_only_while_the_weights_are_unchanged():
    """No-grad calls cache each layer's stacked adapters: an in-place edit (what an optimizer step does) or a
    new Parameter tensor must show up in the next call."""
    model = make_peft("siglip").eval()
    patched = copy.deepcopy(model)
    patch_model(patched, backend="native" if "native" in BACKENDS else BACKENDS[0])
    x = pixels(model, len(ROWS), "cpu")

    def both():
        with torch.no_grad():
            expected = model(pixel_values=x, adapter_names=ROWS).last_hidden_state
            with adapter_selection(patched, ROWS):
                got = patched(pixel_values=x).last_hidden_state
        torch.testing.assert_close(got, expected, **TOL)
        return got

    first = both()
    assert both().data_ptr() != first.data_ptr()  # a second call hits the cache and still matches
    with torch.no_grad():
        for m in (model, patched):
            for name, p in m.named_parameters():
                if "lora_B.blue" in name:
                    p.add_(0.5)  # in place: the version counter moves
    assert not torch.allclose(both(), first)
    for m in (model, patched):
        for name, module in m.named_modules():
            if name.endswith("lora_A") and "red" in module:
                module["red"].weight = nn.Parameter(module["red"].weight.detach() * 2.0)  # a new tensor
    both()
