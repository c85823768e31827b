"""A float64 PEFT model, patched, equals PEFT to float64 rounding, also when the scale alpha / r (alpha / sqrt(r)
with rsLoRA, or a ``set_scale`` value) is not exact in float32: no value passes through float32."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from monkey_kernels import adapter_selection, patch_model  # noqa: E402
from helpers.peft_towers import make_peft, pixels  # noqa: E402

ADAPTERS = {
    "red": dict(r=3, lora_alpha=7, target_modules=["q_proj", "v_proj", "fc1"]),  # 7 / 3
    "blue": dict(r=8, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "out_proj", "fc2"]),  # 5 / sqrt(8)
}
ROWS = ["red", "__base__", "blue", "red"]


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_float64_peft_scales_stay_exact(backend):
    model = make_peft("siglip", adapters=ADAPTERS).double().eval()
    for module in model.modules():
        if hasattr(module, "set_scale") and "blue" in getattr(module, "scaling", {}):
            module.set_scale("blue", 0.3)  # multiplies alpha / sqrt(r) by 0.3: inexact in float32 as well
    x = pixels(model, len(ROWS), "cpu").double()
    with torch.no_grad():
        expected = model(pixel_values=x, adapter_names=ROWS).last_hidden_state
    patch_model(model, backend=backend)
    with torch.no_grad(), adapter_selection(model, ROWS):
        got = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-13, rtol=1e-13)
