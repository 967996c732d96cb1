"""``remap_slots`` on the CPU extension: there is no native kernel; the torch reference runs
(it touches only the tree's slot ids, a few per sequence).
"""

from eagle2_kernels.ops.remap_slots.reference import remap_slots

__all__ = ["remap_slots"]
