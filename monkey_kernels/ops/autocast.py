"""How the ops behave under ``torch.autocast``: the policy's building blocks, shared by both ops.

Autocast casts the floating operands of an op on its list of lower-precision ops (``linear``, ``matmul``, ...) to
the autocast dtype, except float64 tensors and tensors on another device type, and runs the op with autocast off.
The ops here follow their references (``F.linear`` / ``nn.Linear``): each op names which of its arguments that
cast applies to (:mod:`monkey_kernels.ops.multi_lora.api`, :mod:`monkey_kernels.ops.slp.api`), the rest keep
their dtype. The casts are ordinary differentiable ``Tensor.to`` calls, so the gradients reach fp32 master
parameters in their own dtype, and ``torch.compile`` traces them like any other op.

The ops' implementations run with autocast's dispatch keys excluded (:func:`autocast_excluded`): their fp32
intermediates (``H``, the accumulators of the torch backend, the C++ ops' ATen calls) must stay fp32 whatever
context the caller runs them in, eager, compiled, or in a backward run inside an autocast region.

:func:`register_autocast` gives each forward custom op its kernel for the ``AutocastCPU`` / ``AutocastCUDA``
dispatch keys, so that the op called directly (``torch.ops.monkey_kernels.*``) in an autocast region gets the
same casts, and a graph traced from it too. ``torch.library.register_autocast`` does not fit: it casts every
floating tensor argument to one fixed dtype, which would cast the per-adapter ``scale`` (full precision by
policy) and the residual.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["autocast_dtype", "cast_for_autocast", "autocast_excluded", "register_autocast", "HALF_DTYPES"]

#: Device types whose autocast the ops honour (the devices the backends run on).
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
#: The dtypes that round a LoRA intermediate where a reference in that dtype rounds it.
HALF_DTYPES = (torch.float16, torch.bfloat16)

_AUTOCAST_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA))


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` runs linear layers in for tensors of ``device_type``, or ``None`` where it is
    off (or on a device type the ops do not run on). ``torch.compile`` folds it into a constant of the graph."""
    if device_type not in AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_for_autocast(tensor: Optional[torch.Tensor], dtype: torch.dtype, device_type: str) -> Optional[torch.Tensor]:
    """What autocast does to one argument of a lower-precision op: a floating tensor on ``device_type``, other than
    float64, becomes ``dtype`` (a differentiable cast); anything else (``None`` too) is returned as it is."""
    if (not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dtype == dtype
            or tensor.dtype == torch.float64 or tensor.device.type != device_type):
        return tensor
    return tensor.to(dtype)


def autocast_excluded():
    """A guard under which no autocast applies, on CPU and CUDA alike: what the ops' implementations run in."""
    return torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS)


def register_autocast(custom_op, cast_arguments: Callable[[tuple, torch.dtype, str], tuple]) -> None:
    """Registers ``custom_op``'s autocast kernels (CPU and CUDA): in an autocast region of the device type of the
    call, ``cast_arguments(args, dtype, device_type)`` returns the arguments the op runs with (the op's policy),
    then the op runs with autocast off. ``custom_op`` is a ``torch.library.custom_op`` (its positional arguments
    only)."""
    for device_type in AUTOCAST_DEVICE_TYPES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _exclude=exclude, **kwargs):
            if kwargs:
                raise AssertionError(f"{custom_op._name} takes positional arguments only, got {sorted(kwargs)}")
            args = cast_arguments(args, torch.get_autocast_dtype(_device_type), _device_type)
            with torch._C._ExcludeDispatchKeyGuard(_exclude):
                return custom_op._opoverload(*args)

        custom_op._lib.impl(custom_op._name, kernel, key, with_keyset=True)
