"""The EAGLE-2 ops: each a public function with a pure-torch reference, a Triton kernel
and (when built) a native CPU kernel, dispatched by tensor device.

Layout: the folder ``ops/<op>/`` holds everything of one op: ``__init__.py`` (the public
function: docstring with shapes, input checks, dispatch), ``reference.py`` (pure torch, the
specification; the CPU path without the extension), ``kernel.py`` (Triton kernels and their
launcher) and ``native.py`` (the wrapper of the C++ extension ``eagle2_kernels._C``). The
backend module is picked through one table (``ops/_dispatch.py``) from the main input's
device; ``EAGLE2_KERNELS_BACKEND=reference|triton|ext`` forces a backend, and every function
also takes ``backend=`` for an explicit per-call choice.

Input errors (``ops/_checks.py``, shared by every op): a wrong type (not a tensor, not an
int, not a ``DraftTree``) or a wrong dtype raises ``TypeError``; a wrong shape, device or
value raises ``ValueError``. Messages start with the op's name. Errors found while running
(a parent index outside the tree, a page outside the pool) are ``ValueError`` too.

Draft-tree masks are packed int32 words (node j of a row at bit j % 32 of word j // 32):
``ops.tree.pack_bits`` / ``unpack_bits`` convert between them and bool matrices.

For serving engines: the paged ops ``tree_attention_paged``, ``kv_compact_paged`` and
``remap_slots`` (KV in pages addressed by a block table; reference and Triton kernel, no native
kernel yet: on CPU they run on torch, the attention on the native dense kernel), and
``tree_formats``, converters between ``DraftTree`` and SGLang's / FlashInfer's /
TensorRT-LLM's tree layouts.
"""

from eagle2_kernels.ops.tree import DraftTree
from eagle2_kernels.ops.tree_expand import tree_expand
from eagle2_kernels.ops.tree_build import tree_build
from eagle2_kernels.ops.tree_attention import tree_attention
from eagle2_kernels.ops.verify_greedy import verify_greedy
from eagle2_kernels.ops.verify_sample import verify_sample
from eagle2_kernels.ops.kv_compact import kv_compact
from eagle2_kernels.ops.tree_attention_paged import tree_attention_paged
from eagle2_kernels.ops.kv_compact_paged import kv_compact_paged
from eagle2_kernels.ops.remap_slots import remap_slots
from eagle2_kernels.ops.ngram_lookup import ngram_lookup
from eagle2_kernels.ops import tree_formats  # noqa: F401  (ops.tree_formats, a module)

__all__ = [
    "DraftTree",
    "tree_expand",
    "tree_build",
    "tree_attention",
    "verify_greedy",
    "verify_sample",
    "kv_compact",
    "tree_attention_paged",
    "kv_compact_paged",
    "remap_slots",
    "ngram_lookup",
]
