"""The native CPU backend: the six ops with the reference signatures, on ``eagle2_kernels._C``.

Each function here has exactly the signature and return structure of
``eagle2_kernels/ops/<op>/reference.py`` (a ``DraftTree`` for ``tree_build``) and the same
semantics: integer outputs and KV moves bit-exact, floats within the op's numerical
contract. The public ops dispatch here for CPU tensors when the extension is built (see
``eagle2_kernels._backend``); importing this module imports the extension, so do it only
after ``ext_available()`` said yes.

What runs natively (C++ in csrc/, parallel over rows/sequences/heads with at::parallel_for):
``tree_expand`` (one pass over V per row: online max / sum-exp and top-k together),
``tree_build`` and ``verify_greedy`` (plain loops; the argmax is taken only at the nodes the
walk visits), ``tree_attention`` (online softmax over key blocks), ``kv_compact`` (every layer
and head in one pass). ``verify_sample`` processes the target logits with the shared
``process_logits`` (temperature / top-k / top-p in torch, so plain sampling and verification
share one distribution bit for bit) only at the nodes its walk visits, and does the walk and
the inverse-CDF bonus draw natively.

The paged ops have no native kernel yet: ``tree_attention_paged`` gathers the pages with one
indexing copy and runs the native dense ``tree_attention``; ``kv_compact_paged`` and
``remap_slots`` are their torch references (they touch only the accepted rows).
"""

from __future__ import annotations

import torch

from eagle2_kernels import _C
from eagle2_kernels.ops.sampling import process_logits
from eagle2_kernels.ops.tree import DraftTree

__all__ = [
    "tree_expand",
    "tree_build",
    "tree_attention",
    "verify_greedy",
    "verify_sample",
    "kv_compact",
    "tree_attention_paged",
    "kv_compact_paged",
    "remap_slots",
]


def tree_expand(
    logits: torch.Tensor,
    parent_scores: torch.Tensor,
    top_k: int,
    draft_to_target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Native ``tree_expand``: logits [B, R, V] f32/f16/bf16, parent_scores [B, R] ->
    child_tokens [B, R, K] int64, child_scores [B, R, K] f32, next_index [B, K] int64,
    next_scores [B, K] f32 (see ``eagle2_kernels.ops.tree_expand``)."""
    return _C.tree_expand(logits, parent_scores, int(top_k), draft_to_target)


def tree_build(
    cand_tokens: torch.Tensor,
    cand_scores: torch.Tensor,
    cand_parents: torch.Tensor,
    root_tokens: torch.Tensor,
    total_tokens: int,
    error_flag: torch.Tensor | None = None,
) -> DraftTree:
    """Native ``tree_build``: cand_* [B, C], root_tokens [B] -> DraftTree of T = total_tokens
    nodes. Raises ValueError (the reference's message) when a kept candidate's parent was
    dropped or a parent index is invalid; ``error_flag`` [B] int32 receives the codes."""
    from eagle2_kernels.ops.tree_build.reference import raise_for_error_codes

    tokens, parents, depth, mask, codes = _C.tree_build(
        cand_tokens, cand_scores, cand_parents, root_tokens, int(total_tokens)
    )
    if error_flag is not None:
        error_flag.copy_(codes)
    if bool(codes.any()):
        raise_for_error_codes(codes, cand_parents)
    return DraftTree(tokens=tokens, parents=parents, depth=depth, mask=mask)


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    tree_len: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Native ``tree_attention``: q [B, Hq, Tq, Dh], caches [B, Hkv, Lmax, Dh], prefix_len [B],
    tree_mask [B, Tq, W] int32 -> out [B, Hq, Tq, Dh] in the dtype and layout of q."""
    return _C.tree_attention(
        q, k_cache, v_cache, prefix_len, tree_mask, int(tree_len),
        None if scale is None else float(scale),
    )


def verify_greedy(
    tree: DraftTree, target_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Native ``verify_greedy``: tree of [B, T], target_logits [B, T, V] -> path [B, T] int64
    (-1 padded), accept_len [B] int64, bonus [B] int64."""
    return _C.verify_greedy(tree.tokens, tree.parents, target_logits)


def verify_sample(
    tree: DraftTree,
    target_logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Native ``verify_sample``: tree of [B, T], target_logits [B, T, V], uniforms [B, T] f32
    -> path [B, T] int64 (-1 padded), accept_len [B] int64, bonus [B] int64.

    The processed distribution of a node (``process_logits`` of its row, which is what the
    reference computes for all rows at once) is computed when the walk reaches the node.
    """
    tokens, parents = tree.tokens, tree.parents
    B, T = tokens.shape
    path_rows = [[-1] * T for _ in range(B)]
    bonus_list, len_list = [], []
    for b in range(B):
        tok_b, par_b, u_b, logits_b = tokens[b], parents[b], uniforms[b], target_logits[b]
        row_path = path_rows[b]
        row_path[0] = 0
        cur, length = 0, 1
        # At most one step per tree level: accept a child (go deeper) or draw the bonus.
        while True:
            probs = process_logits(logits_b[cur], temperature, top_p, top_k)
            child, token = _C.verify_sample_step(tok_b, par_b, probs, u_b, cur)
            if child < 0:
                break
            row_path[length] = child
            length += 1
            cur = child
        bonus_list.append(token)
        len_list.append(length)
    path = torch.tensor(path_rows, dtype=torch.int64)
    accept_len = torch.tensor(len_list, dtype=torch.int64)
    bonus = torch.tensor(bonus_list, dtype=torch.int64)
    return path, accept_len, bonus


def kv_compact(
    cache: torch.Tensor,
    prefix_len: torch.Tensor,
    path: torch.Tensor,
    accept_len: torch.Tensor,
) -> torch.Tensor:
    """Native ``kv_compact``, in place on cache [N, B, Hkv, Lmax, Dh]; returns ``cache``."""
    _C.kv_compact(cache, prefix_len, path, accept_len)
    return cache


def tree_attention_paged(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    tree_len: int,
    scale: float | None = None,
) -> torch.Tensor:
    """``tree_attention_paged`` on CPU: the pages gathered into a dense cache (torch), then the
    native dense kernel; q [B, Hq, Tq, Dh], pages [num_blocks, page_size, Hkv, Dh]."""
    from eagle2_kernels.ops.tree_attention_paged.reference import tree_attention_paged as ref

    return ref(q, k_pages, v_pages, block_table, prefix_len, tree_mask, tree_len, scale,
               dense=tree_attention)


def kv_compact_paged(
    kv_pages: torch.Tensor,
    block_table: torch.Tensor,
    prefix_len: torch.Tensor,
    path: torch.Tensor,
    accept_len: torch.Tensor,
) -> torch.Tensor:
    """``kv_compact_paged`` on CPU (the torch reference); in place, returns ``kv_pages``."""
    from eagle2_kernels.ops.kv_compact_paged.reference import kv_compact_paged as ref

    return ref(kv_pages, block_table, prefix_len, path, accept_len)


def remap_slots(
    req_to_token: torch.Tensor,
    prefix_len: torch.Tensor,
    path: torch.Tensor,
    accept_len: torch.Tensor,
    tree_len: int,
    update: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``remap_slots`` on CPU (the torch reference)."""
    from eagle2_kernels.ops.remap_slots.reference import remap_slots as ref

    return ref(req_to_token, prefix_len, path, accept_len, tree_len, update)
