"""``patch_model`` / ``unpatch_model`` on Monkey's vision encoder: fused vs reference (float64), state dicts,
save/load, unpatching, patching twice, optimizers, dropout, gradient checkpointing, and a user's copy of the
public Monkey block code; round trips (patch, train, cast, unpatch: no weight lost) of the Monkey encoder, a PEFT
tower and an SLP model."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from helpers.accuracy import rel_err
from conftest import kernel_device
from helpers.monkey_models import UserTower, VisualAttentionBlock, make_model, randomize_, views
from helpers.peft_towers import build_peft
from monkey_kernels._triton.env import interpreter_active
from monkey_kernels.rules.monkey_vit import FusedMonkeyBlock
from monkey_kernels.models import MonkeyVisionBlock, MonkeyVisionModel
from monkey_kernels.patching import NothingToPatchError, is_patched, patch_model, unpatch_model
from helpers.slp_models import H, LayoutModel, V, slp_inputs

BACKENDS = ["triton", "torch"]
GRIDS = {"2x2": 4, "3x2": 6}  # tiles per image


def run_with_grads(model: nn.Module, pixel_values: torch.Tensor, weights: torch.Tensor):
    """Output and ``{name: grad}`` of every trainable parameter for the loss ``sum(out * weights)``; an adapter
    no view used has no gradient in the reference loop and a zero one in the fused model (read as zeros)."""
    model.zero_grad(set_to_none=True)
    out = model(pixel_values)
    (out * weights.to(out.dtype)).sum().backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def family_of(name: str) -> str:
    return next((k for k in ("lora_scale", "lora_a", "lora_b") if k in name), name)


def grad_families(grads: dict) -> dict:
    """Gradients concatenated per family: every ``lora_scale`` together, every ``lora_a`` together, ...; other
    parameters alone. A one-element ``lora_scale`` gradient is a long reduction whose half-precision value can
    cancel to a few units of rounding, so half-precision runs are judged per family."""
    families = {}
    for name, grad in grads.items():
        families.setdefault(family_of(name), []).append(grad.detach().double().cpu().reshape(-1))
    return {k: torch.cat(v) for k, v in families.items()}


def compare_to_float64(model, pixel_values, *, backend, factor, floor, tensor_floor):
    """Patched model vs the reference in float64 (on a copy) and vs the reference in the model's dtype: the
    fused error may be at most ``factor`` x the plain PyTorch error, plus ``floor``, for the output and every
    gradient family (see :func:`grad_families`); each gradient tensor alone, with its error measured against its
    family's norm, gets ``tensor_floor``, which still catches a wrong adapter or a missing term."""
    reference64 = copy.deepcopy(model).double().cpu()
    reference_same = copy.deepcopy(model)
    weights = torch.randn(pixel_values.shape[0], pixel_values.shape[1] * model.config.n_queries,
                          model.config.output_dim, dtype=torch.float64)
    ref_out, ref_grads = run_with_grads(reference64, pixel_values.double().cpu(), weights)
    base_out, base_grads = run_with_grads(reference_same, pixel_values, weights.to(pixel_values.device))
    report = patch_model(model, backend=backend)
    assert report.rules["monkey_block"] == model.config.layers
    out, grads = run_with_grads(model, pixel_values, weights.to(pixel_values.device))
    assert out.shape == ref_out.shape and out.dtype == pixel_values.dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref_out) <= factor * rel_err(base_out, ref_out) + floor
    assert set(grads) == set(ref_grads)
    families, ref_families, base_families = grad_families(grads), grad_families(ref_grads), grad_families(base_grads)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        # Measured against the family's norm: a lone lora_scale gradient may cancel to near zero.
        family_norm = ref_families[family_of(name)].norm().clamp_min(1e-30).item()
        error = (grad.double().cpu() - ref_grads[name].double().cpu()).norm().item() / family_norm
        base_error = (base_grads[name].double().cpu() - ref_grads[name].double().cpu()).norm().item() / family_norm
        assert error <= factor * base_error + tensor_floor, name
    for name, grad in families.items():
        limit = factor * rel_err(base_families[name], ref_families[name]) + floor
        assert rel_err(grad, ref_families[name]) <= limit, name
    return report


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_matches_reference_float64(backend, grid):
    device = kernel_device(backend)
    model = make_model(device).train()  # train mode, dropout 0: the exact comparison
    pixel_values = views(2, GRIDS[grid], model.config, device)
    report = compare_to_float64(model, pixel_values, backend=backend, factor=4.0, floor=1e-5, tensor_floor=1e-4)
    assert report.kinds["attn.in_proj"] == report.kinds["attn.out_proj"] == report.kinds["mlp.c_proj"] == 2
    assert report.rules["monkey_transformer"] == 1 and report.rules["monkey_vision_model"] == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_matches_reference_half_precision(backend, dtype):
    device = kernel_device(backend)
    model = make_model(device, dtype=dtype).eval()
    pixel_values = views(2, 4, model.config, device, dtype)
    # Triton 3.9's interpreter truncates fp32 -> bf16 (round toward zero): twice the rounding error of a GPU.
    factor = 6.0 if backend == "triton" and dtype == torch.bfloat16 and interpreter_active() else 4.0
    compare_to_float64(model, pixel_values, backend=backend, factor=factor, floor=torch.finfo(dtype).eps,
                       tensor_floor=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_active_in_train_mode_and_seeded(backend):
    device = kernel_device(backend)
    model = make_model(device, lora_dropout=0.3)
    pixel_values = views(1, 4, model.config, device)
    patch_model(model, backend=backend)
    model.train()
    torch.manual_seed(11)
    first = model(pixel_values).detach()
    torch.manual_seed(11)
    again = model(pixel_values).detach()
    torch.manual_seed(12)
    other = model(pixel_values).detach()
    assert torch.equal(first, again), "dropout masks must follow torch.manual_seed"
    assert not torch.equal(first, other), "a new seed must draw new masks"
    model.eval()
    eval_out = model(pixel_values).detach()
    assert torch.equal(eval_out, model(pixel_values).detach())
    assert not torch.equal(first, eval_out), "dropout must act in train mode"
    # Dropout touches only the LoRA terms: the global view (no adapter) is the same in train and eval mode.
    q = model.config.n_queries
    torch.testing.assert_close(first[:, -q:], eval_out[:, -q:], rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_and_save_load(tmp_path):
    reference = make_model("cpu")
    patched = MonkeyVisionModel(reference.config)
    patch_model(patched, backend="torch")
    patched.load_state_dict(reference.state_dict())
    state = patched.state_dict()
    assert list(state) == list(reference.state_dict())
    back = MonkeyVisionModel(reference.config)
    back.load_state_dict(state)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name

    patched.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = MonkeyVisionModel.from_pretrained(tmp_path)
    assert not is_patched(loaded)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    pixel_values = views(2, 4, reference.config, "cpu")
    with torch.no_grad():
        expected = patched.eval()(pixel_values)
        torch.testing.assert_close(loaded.eval()(pixel_values), expected, rtol=1e-4, atol=1e-5)
        # A patched model pickles and deep-copies as a patched model.
        torch.save(patched, tmp_path / "whole.pt")
        for clone in (torch.load(tmp_path / "whole.pt", weights_only=False), copy.deepcopy(patched)):
            assert is_patched(clone) and isinstance(clone.transformer.resblocks[0], FusedMonkeyBlock)
            assert torch.equal(clone(pixel_values), expected)


def test_optimizers_frozen_parameters_and_unpatch():
    model = make_model("cpu").train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params_before = {n: p for n, p in model.named_parameters()}
    early = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    patch_model(model, backend="torch")
    assert {n: p for n, p in model.named_parameters()} == params_before, "patching must keep Parameter objects"
    late = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert len(late.param_groups[0]["params"]) == len(early.param_groups[0]["params"])
    pixel_values = views(2, 4, model.config, "cpu")
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for optimizer in (early, late):
        optimizer.zero_grad()
        model(pixel_values).square().mean().backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad and re.search(r"_lora\.[45]\.", name):
            # 4 tiles use adapters 0..3: as in the reference loop, 4 and 5 get no gradient, so AdamW's weight
            # decay leaves them where they were
            assert p.grad is None and torch.equal(p.detach(), trained[name]), f"{name} moved without a gradient"
        elif p.requires_grad:
            assert not torch.equal(p.detach(), trained[name]), f"{name} did not train"
        else:
            assert p.grad is None and torch.equal(p.detach(), frozen[name]), f"{name} must stay frozen"

    model.eval()
    with torch.no_grad():
        patched_out = model(pixel_values)
    report = unpatch_model(model)
    assert report.rules["monkey_block"] == model.config.layers and not is_patched(model)
    assert all(type(b) is MonkeyVisionBlock for b in model.transformer.resblocks)
    assert "forward" not in model.__dict__ and "forward" not in model.transformer.__dict__
    assert {n: p for n, p in model.named_parameters()} == params_before
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values), patched_out, rtol=1e-4, atol=1e-5)


def test_patch_twice_is_a_no_op_and_nothing_to_patch_is_loud():
    model = make_model("cpu")
    first = patch_model(model, backend="torch")
    blocks = list(model.transformer.resblocks)
    with pytest.warns(UserWarning, match="already patched"):
        second = patch_model(model, backend="torch")
    assert second.already_patched and second.total == 0 and first.total > 0
    assert list(model.transformer.resblocks) == blocks
    unpatch_model(model)
    with pytest.warns(UserWarning, match="not patched"):
        unpatch_model(model)

    plain = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    with pytest.raises(NothingToPatchError, match="nothing to patch"):
        patch_model(plain)
    with pytest.warns(UserWarning, match="nothing to patch"):
        assert patch_model(plain, strict=False).total == 0
    assert not is_patched(plain)


@pytest.mark.parametrize("patch_first", [True, False])
def test_gradient_checkpointing_with_dropout(patch_first):
    model = make_model("cpu", lora_dropout=0.2).train()
    pixel_values = views(2, 4, model.config, "cpu")
    weights = torch.randn(2, 5 * model.config.n_queries, model.config.output_dim)
    plain = copy.deepcopy(model)
    patch_model(plain, backend="torch")
    if patch_first:
        patch_model(model, backend="torch")
        model.activation_checkpointing_enable()
    else:
        model.activation_checkpointing_enable()
        patch_model(model, backend="torch")
    assert all(isinstance(b, FusedMonkeyBlock) and b.gradient_checkpointing for b in model.transformer.resblocks)
    torch.manual_seed(3)
    out, grads = run_with_grads(model, pixel_values, weights)
    torch.manual_seed(3)
    ref_out, ref_grads = run_with_grads(plain, pixel_values, weights)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    unpatch_model(model)
    assert all(b.gradient_checkpointing for b in model.transformer.resblocks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_user_copy_of_the_public_code_is_patched(backend):
    device = kernel_device(backend)
    tower = randomize_(UserTower()).to(device).eval()
    reference = copy.deepcopy(tower).double().cpu()
    seq, ids = 6, [0, 3, -1, 1, 2, -1]  # one view per batch row, [seq, batch, dim] like the release
    x = torch.randn(seq, len(ids), 64, device=device)
    with torch.no_grad():
        expected = torch.cat(
            [reference(x[:, i:i + 1].double().cpu(), idx=None if a < 0 else a) for i, a in enumerate(ids)], dim=1
        )
    report = patch_model(tower, backend=backend)
    assert report.rules["monkey_block"] == 2 and report.rules["monkey_transformer"] == 1
    assert "monkey_vision_model" not in report.rules
    assert all(isinstance(b, FusedMonkeyBlock) for b in tower.transformer.resblocks)
    with torch.no_grad():
        batched = tower(x, idx=torch.tensor(ids, device=device))  # one pass, one adapter per batch row
        per_tile = tower(x[:, :2], idx=0)  # the release's loop call still works
        expected_tile = reference(x[:, :2].double().cpu(), idx=0)
    torch.testing.assert_close(batched.double().cpu(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(per_tile.double().cpu(), expected_tile, rtol=1e-4, atol=1e-5)
    unpatch_model(tower)
    assert all(type(b) is VisualAttentionBlock for b in tower.transformer.resblocks)
    assert list(tower.state_dict()) == list(reference.state_dict())


class FixedDropout(nn.Module):
    """Applies a given keep-mask (scaled by ``1/(1-p)``): the reference's dropout with the fused op's mask."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return torch.where(self.keep, x / (1.0 - self.p), torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_block_dropout_equals_reference_with_the_same_masks(backend):
    from monkey_kernels import SegmentInfo, dropout_keep_mask

    device = kernel_device(backend)
    p, seq, ids, seeds = 0.25, 8, [2, -1, 0], [101, 202, 303]
    model = make_model(device, lora_dropout=p, layers=1).train()
    reference = copy.deepcopy(model.transformer.resblocks[0])
    patch_model(model, backend=backend)
    fused = model.transformer.resblocks[0]
    width = model.config.width
    x = torch.randn(len(ids), seq, width, device=device)  # batch-first, as the fused block runs
    segments = SegmentInfo.from_batch(ids, seq, device=device)
    out = fused(x, segments=segments, seeds=seeds)
    masks = [dropout_keep_mask(s, len(ids) * seq, width, p, device, backend=backend).view(len(ids), seq, width)
             for s in seeds]
    expected = []
    for view, adapter in enumerate(ids):
        if adapter >= 0:
            lists = (reference.attn.in_proj_lora, reference.attn.out_proj_lora, reference.mlp_lora)
            for adapters, keep in zip(lists, masks):
                adapters[adapter].lora_dropout = FixedDropout(keep[view][:, None, :], p)  # [seq, 1, width]
        expected.append(reference(x[view][:, None, :], idx=None if adapter < 0 else adapter)[:, 0])
    torch.testing.assert_close(out, torch.stack(expected), rtol=1e-4, atol=1e-5)
    assert masks[0].float().mean().item() < 0.9, "the masks drop entries"


# ---------------------------------------------------------------------------------------------------------
# patch_model / unpatch_model round trips (Monkey, PEFT, SLP)
# ---------------------------------------------------------------------------------------------------------
def build_monkey():
    model = make_model("cpu")
    pixel_values = views(2, 3, model.config, "cpu")
    return model, lambda m: m(pixel_values), 1


def build_slp():
    model = LayoutModel(V, H, "cpu")
    model.embed.embed_tokens.weight.requires_grad_(False)  # a frozen table keeps its flag
    inputs = slp_inputs()

    def forward(m):
        dtype = m.head.weight.dtype
        return m(inputs["input_ids"], inputs["boxes"].to(dtype), inputs["image_features"].to(dtype))

    return model, forward, 1


MODELS = {"monkey": build_monkey, "peft": build_peft, "slp": build_slp}


def snapshot(model):
    return {
        "params": dict(model.named_parameters()),
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "flags": {n: (p.requires_grad, p.dtype) for n, p in model.named_parameters()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
    }


def assert_same_weights(model, before, *, same_types=True, clean=None):
    state = model.state_dict()
    assert list(state) == list(before["values"]), "state-dict keys changed"
    for key, value in state.items():
        assert value.dtype == before["values"][key].dtype and torch.equal(value, before["values"][key]), key
    params = dict(model.named_parameters())
    assert params.keys() == before["params"].keys()
    for name, p in params.items():
        assert p is before["params"][name], f"{name} is a new Parameter object"
        assert (p.requires_grad, p.dtype) == before["flags"][name], name
    if same_types:
        assert [(n, type(m)) for n, m in model.named_modules()] == before["types"]
    if clean if clean is not None else same_types:
        leftovers = [(n, k) for n, m in model.named_modules() for k in m.__dict__
                     if k == "forward" or k.startswith("_monkey_kernels")]
        assert not leftovers, f"patching state left behind: {leftovers}"


@pytest.mark.parametrize("name", list(MODELS))
def test_patch_unpatch_twice_loses_no_weight(name):
    model, forward, _ = MODELS[name]()
    before = snapshot(model)
    with torch.no_grad():
        expected = forward(model.eval())
    for _ in range(2):
        report = patch_model(model, backend="torch")
        assert report.total > 0 and is_patched(model)
        assert_same_weights(model, before, same_types=False)
        with torch.no_grad():
            torch.testing.assert_close(forward(model), expected, rtol=1e-5, atol=1e-5)
        unpatch_model(model)
        assert not is_patched(model)
        assert_same_weights(model, before)


@pytest.mark.parametrize("name", list(MODELS))
def test_adamw_step_while_patched_then_unpatch(name):
    """One AdamW step on the patched model: its gradients are the reference's, the Parameters it updated are
    the ones the unpatched model holds, and the unpatched model gives the patched model's output."""
    model, forward, _ = MODELS[name]()
    model.train()
    twin = copy.deepcopy(model)
    before = snapshot(model)
    patch_model(model, backend="torch")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    forward(model).square().mean().backward()
    forward(twin).square().mean().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if p.requires_grad and q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"grad {n}: {m}")
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before["values"][n])]
    assert changed and all(before["flags"][n][0] for n in changed), "frozen weights moved or nothing trained"
    model.eval()
    with torch.no_grad():
        patched_out = forward(model)
    unpatch_model(model)
    assert all(p is before["params"][n] for n, p in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(forward(model), patched_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_to_dtype_after_patching(name):
    model, forward, _ = MODELS[name]()
    model.eval()
    reference = copy.deepcopy(model).double()
    patch_model(model, backend="torch")
    model.to(torch.float64)
    params = dict(model.named_parameters())
    with torch.no_grad():
        out = forward(model)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, forward(reference), rtol=1e-10, atol=1e-10)
    unpatch_model(model)
    assert all(p is params[n] and p.dtype == torch.float64 for n, p in model.named_parameters())
    assert all(t.dtype == torch.float64 for t in model.state_dict().values() if t.is_floating_point())
    with torch.no_grad():
        torch.testing.assert_close(forward(model), forward(reference), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(MODELS))
def test_double_patch_warns_unpatch_of_unpatched_warns_and_bad_calls_raise(name):
    model, _, _ = MODELS[name]()
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_model(model, backend="cuda-magic")
    assert not is_patched(model), "a rejected backend must leave the model unpatched"
    with pytest.warns(UserWarning, match="not patched"):
        assert unpatch_model(model).total == 0
    patch_model(model, backend="torch")
    before = snapshot(model)
    with pytest.warns(UserWarning, match="already patched"):
        assert patch_model(model).already_patched
    assert_same_weights(model, before, clean=False)
    unpatch_model(model)
    for bad in (None, torch.zeros(2), "model"):
        with pytest.raises(ValueError, match="model must be an nn.Module"):
            unpatch_model(bad)
        with pytest.raises(ValueError, match="model must be an nn.Module"):
            patch_model(bad)
