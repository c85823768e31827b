"""The fused ops, one folder each (``multi_lora/``, ``slp/``), all following one pattern: a public function
(validate -> resolve backend -> call), a custom op pair with fakes and a registered autograd formula (plus its
eager twin, :mod:`.custom`), one implementation per backend side by side (each registered against the op's
protocol, :mod:`.registry`), and a ``*_ref``. The backend list and protocols are in :mod:`.registry`, the rule that
picks a backend in :mod:`.backends`; the Triton kernels live in ``triton_kernels/`` (``monkey_kernels._triton``).

Nothing is imported here, so that ``monkey_kernels._native`` (imported by :mod:`.backends`) and the op folders
load in any order.
"""
