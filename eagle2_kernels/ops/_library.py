"""The ops as PyTorch operators: ``torch.ops.eagle2.<op>``, registered with ``torch.library``.

Registered when ``eagle2_kernels`` is imported, so other stacks (serving engines, C++ via the
dispatcher, ``torch.compile`` graphs, CUDA-graph capture) can call the ops on plain tensors
without our Python wrappers or the ``DraftTree`` dataclass:

    torch.ops.eagle2.tree_expand(logits, parent_scores, top_k, draft_to_target=None)
        -> (child_tokens, child_scores, next_index, next_scores)
    torch.ops.eagle2.tree_build(cand_tokens, cand_scores, cand_parents, root_tokens,
                                total_tokens, error_flag=None) -> (tokens, parents, depth, mask)
    torch.ops.eagle2.tree_attention(q, k_cache, v_cache, prefix_len, tree_mask, tree_len,
                                    scale=None, window=None, softcap=None, sinks=None) -> out
    torch.ops.eagle2.verify_greedy(tokens, parents, target_logits) -> (path, accept_len, bonus)
    torch.ops.eagle2.verify_sample(tokens, parents, target_logits, uniforms, temperature,
                                   top_p=1.0, top_k=0) -> (path, accept_len, bonus)
    torch.ops.eagle2.kv_compact(cache, prefix_len, path, accept_len) -> ()   # mutates cache

and the paged ops for serving engines (``PAGED_OP_NAMES``):

    torch.ops.eagle2.tree_attention_paged(q, k_pages, v_pages, block_table, prefix_len,
                                          tree_mask, tree_len, scale=None, window=None,
                                          softcap=None, sinks=None) -> out
    torch.ops.eagle2.kv_compact_paged(kv_pages, block_table, prefix_len, path, accept_len)
        -> ()                                                            # mutates kv_pages
    torch.ops.eagle2.remap_slots(req_to_token, prefix_len, path, accept_len, tree_len=None,
                                 update=True) -> (accepted_slots, free_slots, num_free)
                                 # declared as mutating req_to_token (it does when update)

Shapes, dtypes and semantics are those of ``eagle2_kernels.ops.<op>``; a tree is passed as
its fields (``tokens``, ``parents``, ... of a ``DraftTree``). ``kv_compact`` returns nothing
(an operator may not return an alias of its input); ``tree_build`` writes ``error_flag`` [B]
int32 when given.

Kernels: CPU runs the native extension when it is built, else the torch reference; CUDA runs
the Triton kernels (imported on first call, never at registration). Both go through the
public op, so the inputs are checked with the same messages and ``EAGLE2_KERNELS_BACKEND``
forces a backend here too. A fake (meta) implementation of each op gives output shapes
without running it, for ``torch.compile`` and other tracing.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from eagle2_kernels.ops.tree import DraftTree, mask_words

__all__ = ["NAMESPACE", "OP_NAMES", "PAGED_OP_NAMES"]

NAMESPACE = "eagle2"
OP_NAMES = (
    "tree_expand",
    "tree_build",
    "tree_attention",
    "verify_greedy",
    "verify_sample",
    "kv_compact",
)
PAGED_OP_NAMES = ("tree_attention_paged", "kv_compact_paged", "remap_slots")
_DEVICES = ("cpu", "cuda")


def _ops():
    # The public functions (input checks + backend choice); imported at call time because
    # eagle2_kernels.ops imports this module's package.
    import eagle2_kernels.ops as ops

    return ops


def _tree(tokens: Tensor, parents: Tensor) -> DraftTree:
    # The verify ops read only the tokens and parents of a tree.
    return DraftTree(tokens=tokens, parents=parents, depth=None, mask=None)


# --- tree_expand -------------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::tree_expand", mutates_args=(), device_types=_DEVICES)
def tree_expand(
    logits: Tensor, parent_scores: Tensor, top_k: int, draft_to_target: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits [B, R, V] float, parent_scores [B, R] -> child_tokens [B, R, K] int64,
    child_scores [B, R, K] float32, next_index [B, K] int64, next_scores [B, K] float32."""
    return tuple(_ops().tree_expand(logits, parent_scores, top_k, draft_to_target))


@tree_expand.register_fake
def _(logits, parent_scores, top_k, draft_to_target=None):
    B, R, _ = logits.shape
    return (
        logits.new_empty((B, R, top_k), dtype=torch.int64),
        logits.new_empty((B, R, top_k), dtype=torch.float32),
        logits.new_empty((B, top_k), dtype=torch.int64),
        logits.new_empty((B, top_k), dtype=torch.float32),
    )


# --- tree_build --------------------------------------------------------------------------


@torch.library.custom_op(
    f"{NAMESPACE}::tree_build", mutates_args=("error_flag",), device_types=_DEVICES
)
def tree_build(
    cand_tokens: Tensor,
    cand_scores: Tensor,
    cand_parents: Tensor,
    root_tokens: Tensor,
    total_tokens: int,
    error_flag: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """cand_* [B, C], root_tokens [B] -> tokens [B, T] int64, parents [B, T] int32,
    depth [B, T] int32, mask [B, T, W] int32 (T = total_tokens); error_flag [B] int32 is
    overwritten with the per-sequence error codes when given."""
    tree = _ops().tree_build(
        cand_tokens, cand_scores, cand_parents, root_tokens, total_tokens, error_flag=error_flag
    )
    return tree.tokens, tree.parents, tree.depth, tree.mask


@tree_build.register_fake
def _(cand_tokens, cand_scores, cand_parents, root_tokens, total_tokens, error_flag=None):
    B = cand_scores.shape[0]
    T = total_tokens
    return (
        cand_scores.new_empty((B, T), dtype=torch.int64),
        cand_scores.new_empty((B, T), dtype=torch.int32),
        cand_scores.new_empty((B, T), dtype=torch.int32),
        cand_scores.new_empty((B, T, mask_words(T)), dtype=torch.int32),
    )


# --- tree_attention ----------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::tree_attention", mutates_args=(), device_types=_DEVICES)
def tree_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    prefix_len: Tensor,
    tree_mask: Tensor,
    tree_len: int,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """q [B, Hq, Tq, Dh], k_cache / v_cache [B, Hkv, Lmax, Dh], prefix_len [B] int,
    tree_mask [B, Tq, W] int32 -> out [B, Hq, Tq, Dh] (dtype and layout of q); optional
    sliding window (int), logit softcap (float) and per-head sinks [Hq]."""
    return _ops().tree_attention(q, k_cache, v_cache, prefix_len, tree_mask, tree_len, scale,
                                 window=window, softcap=softcap, sinks=sinks)


@tree_attention.register_fake
def _(q, k_cache, v_cache, prefix_len, tree_mask, tree_len, scale=None, window=None, softcap=None,
      sinks=None):
    return torch.empty_like(q)


# --- verify_greedy / verify_sample -------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::verify_greedy", mutates_args=(), device_types=_DEVICES)
def verify_greedy(tokens: Tensor, parents: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """tokens / parents [B, T] int, target_logits [B, T, V] float -> path [B, T] int64
    (-1 padded), accept_len [B] int64, bonus [B] int64."""
    return tuple(_ops().verify_greedy(_tree(tokens, parents), target_logits))


@verify_greedy.register_fake
def _(tokens, parents, target_logits):
    return _verify_outputs(tokens)


@torch.library.custom_op(f"{NAMESPACE}::verify_sample", mutates_args=(), device_types=_DEVICES)
def verify_sample(
    tokens: Tensor,
    parents: Tensor,
    target_logits: Tensor,
    uniforms: Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """tokens / parents [B, T] int, target_logits [B, T, V] float, uniforms [B, T] float32
    -> path [B, T] int64 (-1 padded), accept_len [B] int64, bonus [B] int64."""
    return tuple(
        _ops().verify_sample(
            _tree(tokens, parents), target_logits, uniforms, temperature, top_p, top_k
        )
    )


@verify_sample.register_fake
def _(tokens, parents, target_logits, uniforms, temperature, top_p=1.0, top_k=0):
    return _verify_outputs(tokens)


def _verify_outputs(tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, T = tokens.shape
    return (
        tokens.new_empty((B, T), dtype=torch.int64),
        tokens.new_empty((B,), dtype=torch.int64),
        tokens.new_empty((B,), dtype=torch.int64),
    )


# --- kv_compact --------------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::kv_compact", mutates_args=("cache",), device_types=_DEVICES)
def kv_compact(cache: Tensor, prefix_len: Tensor, path: Tensor, accept_len: Tensor) -> None:
    """cache [N, B, Hkv, Lmax, Dh] (modified in place), prefix_len / accept_len [B] int,
    path [B, T] int."""
    _ops().kv_compact(cache, prefix_len, path, accept_len)


@kv_compact.register_fake
def _(cache, prefix_len, path, accept_len):
    return None


# --- paged ops ---------------------------------------------------------------------------


@torch.library.custom_op(
    f"{NAMESPACE}::tree_attention_paged", mutates_args=(), device_types=_DEVICES
)
def tree_attention_paged(
    q: Tensor,
    k_pages: Tensor,
    v_pages: Tensor,
    block_table: Tensor,
    prefix_len: Tensor,
    tree_mask: Tensor,
    tree_len: int,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """q [B, Hq, Tq, Dh], k_pages / v_pages [num_blocks, page_size, Hkv, Dh], block_table
    [B, max_blocks] int, prefix_len [B] int, tree_mask [B, Tq, W] int32 -> out [B, Hq, Tq, Dh];
    optional sliding window (int), logit softcap (float) and per-head sinks [Hq]."""
    return _ops().tree_attention_paged(
        q, k_pages, v_pages, block_table, prefix_len, tree_mask, tree_len, scale,
        window=window, softcap=softcap, sinks=sinks,
    )


@tree_attention_paged.register_fake
def _(q, k_pages, v_pages, block_table, prefix_len, tree_mask, tree_len, scale=None, window=None,
      softcap=None, sinks=None):
    return torch.empty_like(q)


@torch.library.custom_op(
    f"{NAMESPACE}::kv_compact_paged", mutates_args=("kv_pages",), device_types=_DEVICES
)
def kv_compact_paged(
    kv_pages: Tensor, block_table: Tensor, prefix_len: Tensor, path: Tensor, accept_len: Tensor
) -> None:
    """kv_pages [N, num_blocks, page_size, Hkv, Dh] (modified in place), block_table
    [B, max_blocks] int, prefix_len / accept_len [B] int, path [B, T] int."""
    _ops().kv_compact_paged(kv_pages, block_table, prefix_len, path, accept_len)


@kv_compact_paged.register_fake
def _(kv_pages, block_table, prefix_len, path, accept_len):
    return None


@torch.library.custom_op(
    f"{NAMESPACE}::remap_slots", mutates_args=("req_to_token",), device_types=_DEVICES
)
def remap_slots(
    req_to_token: Tensor,
    prefix_len: Tensor,
    path: Tensor,
    accept_len: Tensor,
    tree_len: Optional[int] = None,
    update: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """req_to_token [B, max_context] int (written when ``update``), prefix_len / accept_len
    [B] int, path [B, T] int -> accepted_slots [B, T], free_slots [B, tree_len] (dtype of
    req_to_token, -1 padded), num_free [B] int64."""
    return tuple(
        _ops().remap_slots(req_to_token, prefix_len, path, accept_len, tree_len, update)
    )


@remap_slots.register_fake
def _(req_to_token, prefix_len, path, accept_len, tree_len=None, update=True):
    B, T = path.shape
    n = T if tree_len is None else tree_len
    return (
        req_to_token.new_empty((B, T)),
        req_to_token.new_empty((B, n)),
        req_to_token.new_empty((B,), dtype=torch.int64),
    )
