"""Never patch what cannot run (issue 21): modules that look like Monkey's (or the SLP's, or a Monkey VLM's) but
are called otherwise are left alone, listed in ``PatchReport.skipped`` with the reason, and the model keeps its
reference output; a model where everything is skipped raises ``NothingToPatchError`` listing the skips.
TextMonkey's modules (``tests/helpers/textmonkey_double.py``) are patched by their own rules (``textmonkey_*``);
the TextMonkey-STYLE variant here (its window loop without ``window_pos`` / ``window_attention``) is not."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers.monkey_models import UserTower, VisualAttentionBlock, make_model, randomize_, structure_alike
from helpers.slp_models import H, V
from helpers.textmonkey_double import VisionTransformer as TextMonkeyVisionTransformer
from helpers.textmonkey_double import randomize_textmonkey_, tiny_textmonkey_visual
from monkey_kernels.call_contract import only_forwarded_problem, plain_loop_problem
from monkey_kernels.ops.slp.reference import SLPEmbeddingRef, SpatialLayoutProjector
from monkey_kernels.patching import NothingToPatchError, is_patched, patch_model, unpatch_model
from monkey_kernels.rules.monkey_vit import FusedMonkeyBlock

# variant -> (the skipped module names expected, a fragment of the transformer's / blocks' reason)
VARIANTS = {
    "textmonkey": ("", "lora_idx"),
    "window_loop": ("", "plain loop"),
    "extra_keyword": ("", "residual_scale"),
    "bare_blocks": ("0", "not in a container the monkey_transformer rule patches"),
}


def module_types(model: nn.Module):
    return [(name, type(m)) for name, m in model.named_modules()]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_structure_alike_variants_are_skipped_with_a_reason_and_still_run(variant):
    model, call = structure_alike(variant)
    reference = copy.deepcopy(model).double()
    types = module_types(model)
    with torch.no_grad():
        before = call(model)
    name, fragment = VARIANTS[variant]
    with pytest.raises(NothingToPatchError, match="recognised but not patched") as error:
        patch_model(model, backend="torch")
    assert fragment in str(error.value)
    with pytest.warns(UserWarning, match="nothing to patch"):
        report = patch_model(model, backend="torch", strict=False)
    assert report.total == 0 and not is_patched(model)
    reasons = {(module, rule): reason for module, rule, reason in report.skipped}
    expected_rule = "monkey_block" if variant == "bare_blocks" else "monkey_transformer"
    assert fragment in reasons[(name, expected_rule)], reasons
    # every Monkey-structured block is listed too, none was touched
    blocks = [n for n, m in model.named_modules() if isinstance(m, VisualAttentionBlock)]
    assert blocks and all((n, "monkey_block") in reasons for n in blocks)
    assert module_types(model) == types
    assert not any(k == "forward" or k.startswith("_monkey_kernels") for _, m in model.named_modules()
                   for k in m.__dict__)
    with torch.no_grad():
        after = call(model)
        expected = call(reference)
    assert torch.equal(after, before)
    torch.testing.assert_close(after.double(), expected, rtol=1e-4, atol=1e-5)  # float32 vs float64


def test_textmonkey_style_blocks_report_their_own_keyword():
    """The Monkey rules name TextMonkey's keyword; the TextMonkey rules name what the style variant lacks (its
    window loop reads no window_pos / window_attention / add_window: not the public one)."""
    model, _ = structure_alike("textmonkey")
    with pytest.warns(UserWarning):
        report = patch_model(model, backend="torch", strict=False)
    block_reasons = [reason for name, rule, reason in report.skipped if rule == "monkey_block"]
    assert len(block_reasons) == 2
    assert all("lora_idx" in r and "idx=None" in r for r in block_reasons), block_reasons
    transformer_reason = next(r for n, rule, r in report.skipped if rule == "monkey_transformer")
    assert "forward(x, attn_mask=None, lora_idx=None, image_size=(64, 64))" in transformer_reason
    text_reason = next(r for n, rule, r in report.skipped if rule == "textmonkey_transformer")
    assert "self.window_pos, self.window_attention, self.add_window" in text_reason, text_reason
    text_block_reasons = [r for n, rule, r in report.skipped if rule == "textmonkey_block"]
    assert len(text_block_reasons) == 2 and all("textmonkey_transformer" in r for r in text_block_reasons)


class Encoders(nn.Module):
    """A Monkey encoder beside a TextMonkey one: each patched by its family's rules."""

    def __init__(self):
        super().__init__()
        self.monkey = randomize_(UserTower())
        visual = tiny_textmonkey_visual()
        visual.pop("image_start_id")
        self.text_monkey = randomize_textmonkey_(TextMonkeyVisionTransformer(**visual))


def test_a_monkey_encoder_and_a_textmonkey_one_are_both_patched():
    model = Encoders().double().eval()
    x = torch.randn(6, 3, 64, dtype=torch.float64)
    images = torch.randn(2, 3, 112, 112, dtype=torch.float64)
    ids = [0, -1, 3]
    with torch.no_grad():
        text_expected = model.text_monkey.encode(None, lora_idx=4, input_image=images)
        expected = torch.cat([model.monkey(x[:, i:i + 1], idx=None if a < 0 else a) for i, a in enumerate(ids)], 1)
    report = patch_model(model, backend="torch")
    assert report.rules["monkey_block"] == 2 and report.rules["monkey_transformer"] == 1
    assert report.rules["textmonkey_block"] == 4 and report.rules["textmonkey_transformer"] == 1
    assert report.rules["textmonkey_encoder"] == 1 and report.skipped == []
    assert all(isinstance(b, FusedMonkeyBlock) for b in model.monkey.transformer.resblocks)
    assert all(isinstance(b, FusedMonkeyBlock) for b in model.text_monkey.transformer.resblocks)
    with torch.no_grad():
        torch.testing.assert_close(model.monkey(x, idx=torch.tensor(ids)), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.text_monkey.encode(None, lora_idx=4, input_image=images), text_expected,
                                   rtol=1e-10, atol=1e-12)
    unpatch_model(model)
    assert all(type(b) is not FusedMonkeyBlock for b in model.text_monkey.transformer.resblocks)


def test_a_cross_attention_block_and_a_non_adapter_entry_are_skipped_not_broken():
    tower = randomize_(UserTower()).double().eval()
    x = torch.randn(5, 2, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = tower(x, idx=1)
    tower.transformer.resblocks[1].ln_1_kv = nn.LayerNorm(64)  # cross-attention blocks are not fused
    with pytest.raises(NothingToPatchError, match="cross-attention"):
        patch_model(tower, backend="torch")
    del tower.transformer.resblocks[1].ln_1_kv
    tower.transformer.resblocks[0].mlp_lora[2].lora_a.bias = nn.Parameter(torch.zeros(32, dtype=torch.float64))
    with pytest.raises(NothingToPatchError, match=r"mlp_lora\[2\] has a bias on lora_a"):
        patch_model(tower, backend="torch")
    tower.transformer.resblocks[0].mlp_lora[2].lora_a.bias = None
    assert patch_model(tower, backend="torch").rules["monkey_block"] == 2
    with torch.no_grad():
        torch.testing.assert_close(tower(x, idx=1), expected, rtol=1e-10, atol=1e-12)


class PartialLoop(nn.Module):
    def forward(self, x, attn_mask=None, idx=None):
        for r in self.resblocks:
            x = r(x, attn_mask=attn_mask)
        return x


class IdxUsingVisual(nn.Module):
    """A vision tower whose forward reads ``idx`` itself: a fused transformer would get per-view ids it
    never saw."""

    def __init__(self):
        super().__init__()
        self.transformer = UserTower().transformer

    def forward(self, x, idx=None):
        if idx is not None:
            idx = idx % 4
        return self.transformer(x, idx=idx)


def test_source_checks():
    assert plain_loop_problem(type(UserTower().transformer).forward, "resblocks", ("attn_mask", "idx")) is None
    problem = plain_loop_problem(type(make_model("cpu").transformer).forward, "resblocks", ("attn_mask", "idx"))
    assert problem is None
    assert "plain loop" in plain_loop_problem(structure_alike("window_loop")[0].forward.__func__, "resblocks",
                                              ("attn_mask", "idx"))
    assert "is not the plain loop" in plain_loop_problem(
        type(structure_alike("textmonkey")[0]).forward, "resblocks", ("attn_mask", "idx"))
    assert "passes ['attn_mask'], not" in plain_loop_problem(PartialLoop.forward, "resblocks", ("attn_mask", "idx"))
    assert only_forwarded_problem(UserTower.forward, "idx", "transformer") is None
    assert "otherwise than handing it on" in only_forwarded_problem(IdxUsingVisual.forward, "idx", "transformer")


class KeywordSLP(SLPEmbeddingRef):
    """An SLP embedding layer whose forward takes another keyword: the fused module would not."""

    def forward(self, input_ids, boxes=None, page_sizes=None, image_features=None, scale=1.0):
        return scale * super().forward(input_ids, boxes, page_sizes, image_features)


def test_an_slp_layer_called_otherwise_is_skipped():
    layer = KeywordSLP(nn.Embedding(V, H), SpatialLayoutProjector(H), box_token_id=0, image_token_id=V - 1)
    with pytest.raises(NothingToPatchError, match=r"scale=1.0\) is not a prefix"):
        patch_model(layer)
    plain = nn.Sequential(SLPEmbeddingRef(nn.Embedding(V, H), SpatialLayoutProjector(H), box_token_id=0,
                                          image_token_id=V - 1))
    assert patch_model(plain, backend="torch").rules["slp_embedding"] == 1
