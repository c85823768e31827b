"""Pure Triton kernels of monkey-kernels and their host launchers (no ``nn.Module`` here).

``segments`` holds :class:`SegmentInfo`, the one segment-metadata type every kernel shares; it imports
without Triton. The kernel modules import Triton when first imported.
"""
from .segments import SegmentInfo

__all__ = ["SegmentInfo"]
