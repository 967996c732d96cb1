"""``kv_compact_paged`` on the CPU extension: there is no native kernel; the torch reference
runs (it moves only the accepted rows, a few per sequence).
"""

from eagle2_kernels.ops.kv_compact_paged.reference import kv_compact_paged

__all__ = ["kv_compact_paged"]
