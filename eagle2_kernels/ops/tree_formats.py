"""Tree interchange: ``DraftTree`` to and from the tree layouts other serving engines read.

Four formats, each with its inverse (the README's "Tree formats" section has an example):

- **SGLang** ``retrive_index / retrive_next_token / retrive_next_sibling``, int64 [B, T]
  (the layout SGLang's ``build_tree_kernel_efficient`` writes and ``verify_tree_greedy`` walks;
  TensorRT-LLM's dynamic tree reads the same arrays). ``retrive_index[b, i] = b * T + i``, the
  node's row in the batch-flattened draft tokens; ``retrive_next_token[b, i]`` is node i's first
  child (its smallest node index), ``retrive_next_sibling[b, i]`` the next larger-index child of
  i's parent; -1 = none. Node indices are ours (node 0 = root, parents first), so KV slots and
  logits rows line up without a permutation. ``to_sglang`` / ``from_sglang``.
- **SGLang** ``tree_mask`` of ``build_tree_kernel_efficient`` in its three ``TreeMaskMode``s:
  ``full`` (bool, each request's [T, prefix_len + T] rows, prefix included: FlashInfer's
  unpacked ``custom_mask``), ``qlen_only`` (bool [B * T * T], the tree columns only) and
  ``qlen_only_bitpacking`` (one little-endian 1/2/4-byte word per row for T <= 8/16/32, node j
  at bit j: the first word of ``DraftTree.mask``). ``to_sglang_tree_mask`` /
  ``from_sglang_tree_mask``.
- **FlashInfer** ``custom_mask``: one bit per (query, key) element of each request's
  [T, prefix_len + T] attention matrix, row-major (query-major), the prefix keys included
  (all visible); packed ``bitorder="little"`` (element e of a segment is bit e % 8 of its byte
  e // 8), each request's segment starting on a byte boundary, ``mask_indptr`` [B + 1] int32
  its byte offsets (what ``flashinfer.quantization.segment_packbits`` produces and the
  ``packed_custom_mask`` argument of its prefill wrappers takes). ``packed=False`` gives the
  unpacked flat bool ``custom_mask`` with the element offsets instead.
  ``to_flashinfer_custom_mask`` / ``from_flashinfer_custom_mask``.
- **TensorRT-LLM** packed mask (``spec_decoding_packed_mask``): int32 [B, T, ceil(T / 32)],
  node j of row i at bit j % 32 of word j // 32, the root at bit 0 of word 0: exactly the bits of
  ``DraftTree.mask`` (tested). ``to_trtllm_packed_mask`` / ``from_trtllm_packed_mask``.

Plus two constructors shared by the inverses: ``tree_from_parents`` and ``tree_from_mask``.

The forward converters run on the tree's device without host reads, except those whose output
length depends on the prefix lengths (FlashInfer's custom mask, SGLang's ``full`` tree mask;
FlashInfer's own ``segment_packbits`` reads them on the host as well). The inverses validate their input (the ops' rule: TypeError for a
wrong type or dtype) and raise ValueError on a layout that is not a parents-first tree (host
reads). Tokens are not part of any of these
layouts (the engines keep them in a separate draft-token array); the inverses take them as
``tokens`` [B, T].
"""

from __future__ import annotations

from typing import Sequence

import torch

from eagle2_kernels.ops._checks import INT_DTYPES, check_rank, check_tensor
from eagle2_kernels.ops.tree import DraftTree, mask_words, pack_bits, unpack_bits

__all__ = [
    "tree_from_parents",
    "tree_from_mask",
    "to_sglang",
    "from_sglang",
    "to_sglang_tree_mask",
    "from_sglang_tree_mask",
    "to_flashinfer_custom_mask",
    "from_flashinfer_custom_mask",
    "to_trtllm_packed_mask",
    "from_trtllm_packed_mask",
]



# ----------------------------------------------------------------------------- constructors


def tree_from_parents(tokens: torch.Tensor, parents: torch.Tensor) -> DraftTree:
    """The ``DraftTree`` (depth and packed ancestor-or-self mask derived) of a parent array.

    Args:
        tokens: [B, T] int32/int64 token ids (stored as int64).
        parents: [B, T] int32/int64; parents[b, 0] = -1 and 0 <= parents[b, i] < i for i > 0.

    Returns:
        DraftTree(tokens int64, parents int32, depth int32, mask int32 [B, T, ceil(T / 32)]).

    Raises:
        ValueError: a parent array that is not parents-first with the root at node 0.

    Example:
        >>> tree_from_parents(torch.tensor([[5, 6, 7]]), torch.tensor([[-1, 0, 0]])).mask
        tensor([[[1],
                 [3],
                 [5]]], dtype=torch.int32)
    """
    check_rank("tree_from_parents", "tokens", tokens, "[B, T]", INT_DTYPES)
    check_rank("tree_from_parents", "parents", parents, "[B, T]", INT_DTYPES)
    if tokens.shape != parents.shape:
        raise ValueError(
            f"tree_from_parents: tokens {tuple(tokens.shape)} and parents {tuple(parents.shape)} "
            "differ in shape"
        )
    B, T = parents.shape
    par = parents.to(torch.int64)
    own = torch.arange(T, device=par.device)
    ok = torch.where(own == 0, par == -1, (par >= 0) & (par < own))
    if T and not bool(ok.all()):
        b, i = (int(x) for x in torch.nonzero(~ok)[0])
        raise ValueError(
            f"tree_from_parents: parents[{b}, {i}] = {int(par[b, i])}; node 0 is the root (-1) "
            f"and every other node's parent must be a smaller node index in [0, {i})"
        )
    # Parents first: row i of the ancestor-or-self matrix is its parent's row plus i itself.
    anc = torch.zeros(B, T, T, dtype=torch.bool, device=par.device)
    rows = torch.arange(B, device=par.device)
    for i in range(T):
        if i:
            anc[:, i] = anc[rows, par[:, i]]
        anc[:, i, i] = True
    depth = (anc.sum(-1) - 1).to(torch.int32)
    return DraftTree(tokens.to(torch.int64), par.to(torch.int32), depth, pack_bits(anc))


def tree_from_mask(mask: torch.Tensor, tokens: torch.Tensor) -> DraftTree:
    """The ``DraftTree`` whose packed ancestor-or-self mask is ``mask``.

    Node i's parent is its largest-index strict ancestor (parents first, so every ancestor has a
    smaller index and the deepest one is the largest).

    Args:
        mask: [B, T, W] int32, W = ceil(T / 32), bit j of row i = node j is i or an ancestor.
        tokens: [B, T] int32/int64.

    Raises:
        ValueError: ``mask`` is not exactly the ancestor-or-self mask of a parents-first tree
            (bits past T set, a missing self bit, a non-closed ancestor set, ...).
    """
    check_rank("tree_from_mask", "tokens", tokens, "[B, T]", INT_DTYPES)
    B, T = tokens.shape
    W = mask_words(T)
    check_tensor("tree_from_mask", "mask", mask, (torch.int32,))
    if tuple(mask.shape) != (B, T, W):
        raise ValueError(
            f"tree_from_mask: mask must be [B={B}, T={T}, W={W}] int32, got shape "
            f"{tuple(mask.shape)}"
        )
    bits = unpack_bits(mask, T)  # [B, T, T]
    strict = bits & torch.ones(T, T, dtype=torch.bool, device=mask.device).tril(-1)
    j = torch.arange(T, device=mask.device)
    # Largest strict-ancestor index of each row; -1 where there is none.
    parents = torch.where(strict, j, -1).amax(-1) if T else j.new_empty(B, 0)
    orphan = (j > 0) & (parents < 0)
    if bool(orphan.any()):
        b, i = (int(x) for x in torch.nonzero(orphan)[0])
        raise ValueError(
            f"tree_from_mask: row {i} of sequence {b} has no ancestor bit below it; every node "
            "but the root must see the root (bit 0)"
        )
    tree = tree_from_parents(tokens, parents)
    if not torch.equal(tree.mask, mask):
        bad = torch.nonzero((tree.mask != mask).any(-1))[0].tolist()
        raise ValueError(
            f"tree_from_mask: row {bad[1]} of sequence {bad[0]} is not the ancestor-or-self set "
            "of a parents-first tree (missing self bit, a bit past the row, a bit past T, or "
            "an ancestor set not closed under parents)"
        )
    return tree


# ----------------------------------------------------------------------------- SGLang


def to_sglang(tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SGLang's ``retrive_index, retrive_next_token, retrive_next_sibling`` of a tree.

    Children are linked in increasing node index, which in a tree from ``tree_build`` is
    decreasing draft score: the order in which SGLang's greedy verify tries them.

    Args:
        tree: a DraftTree (only ``parents`` [B, T] is read).

    Returns:
        Three int64 [B, T] tensors on the tree's device: ``retrive_index[b, i] = b * T + i``;
        ``retrive_next_token[b, i]`` = smallest child of node i, or -1 (a leaf);
        ``retrive_next_sibling[b, i]`` = the next larger sibling of node i, or -1 (the last
        child, and the root).

    Example:
        >>> tree = tree_from_parents(torch.tensor([[9, 8, 7, 6]]), torch.tensor([[-1, 0, 0, 1]]))
        >>> [x.tolist() for x in to_sglang(tree)]
        [[[0, 1, 2, 3]], [[1, 3, -1, -1]], [[-1, 2, -1, -1]]]
    """
    parents = tree.parents.to(torch.int64)
    B, T = parents.shape
    dev = parents.device
    own = torch.arange(T, device=dev).expand(B, T)
    retrive_index = (torch.arange(B, device=dev)[:, None] * T + own).contiguous()
    # Sorting (parent, index) groups each node's children in increasing index: the next entry
    # with the same parent is the next sibling, the first entry of a group the first child.
    order = torch.argsort(parents * (T + 1) + own, dim=1)  # keys distinct: no stable sort needed
    sorted_par = parents.gather(1, order)
    nxt_same = torch.zeros(B, T, dtype=torch.bool, device=dev)
    nxt_same[:, :-1] = sorted_par[:, 1:] == sorted_par[:, :-1]
    nxt_node = torch.full((B, T), -1, dtype=torch.int64, device=dev)
    nxt_node[:, :-1] = order[:, 1:]
    next_sibling = torch.full((B, T), -1, dtype=torch.int64, device=dev)
    next_sibling.scatter_(1, order, torch.where(nxt_same, nxt_node, -1))
    first = torch.ones(B, T, dtype=torch.bool, device=dev)
    first[:, 1:] = sorted_par[:, 1:] != sorted_par[:, :-1]
    first &= sorted_par >= 0  # the root heads no child list
    # A parent receives the node index of its first child; T (out of range) is a dump slot.
    next_token = torch.full((B, T + 1), -1, dtype=torch.int64, device=dev)
    target = torch.where(first, sorted_par, T)
    next_token.scatter_(1, target, torch.where(first, order, -1))
    return retrive_index, next_token[:, :T].contiguous(), next_sibling


def from_sglang(
    retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor,
    tokens: torch.Tensor,
    retrive_index: torch.Tensor | None = None,
) -> DraftTree:
    """The ``DraftTree`` described by SGLang's child / sibling links (any sibling order).

    Args:
        retrive_next_token: [B, T] int32/int64, first child of each node or -1.
        retrive_next_sibling: [B, T] int32/int64, next sibling of each node or -1.
        tokens: [B, T] draft tokens (SGLang's ``draft_token`` reshaped to [B, T]).
        retrive_index: optional [B, T]; when given it must be the flat layout b * T + i (the
            only one ``build_tree_kernel_efficient`` writes), else ValueError.

    Returns:
        DraftTree; ``to_sglang`` of it gives the same links when the input lists siblings in
        increasing node index (SGLang's own order).

    Raises:
        ValueError: links that do not form a parents-first tree rooted at node 0 (a node reached
            twice or never, a cycle, a child with a smaller index than its parent).
    """
    name = "from_sglang"
    check_rank(name, "retrive_next_token", retrive_next_token, "[B, T]", INT_DTYPES)
    check_rank(name, "retrive_next_sibling", retrive_next_sibling, "[B, T]", INT_DTYPES)
    check_rank(name, "tokens", tokens, "[B, T]", INT_DTYPES)
    B, T = tokens.shape
    for arg, t in (("retrive_next_token", retrive_next_token),
                   ("retrive_next_sibling", retrive_next_sibling)):
        if tuple(t.shape) != (B, T):
            raise ValueError(f"{name}: {arg} has shape {tuple(t.shape)}, tokens [B={B}, T={T}]")
    dev = tokens.device
    if retrive_index is not None:
        check_rank(name, "retrive_index", retrive_index, "[B, T]", INT_DTYPES)
        flat = torch.arange(B * T, device=dev).view(B, T)
        if tuple(retrive_index.shape) != (B, T) or not torch.equal(retrive_index.long(), flat):
            raise ValueError(
                f"{name}: retrive_index must be the flat layout b * T + i of shape [{B}, {T}]"
            )
    nt = retrive_next_token.to(torch.int64)
    ns = retrive_next_sibling.to(torch.int64)
    if T == 0:
        return tree_from_parents(tokens, nt)
    if bool(((nt < -1) | (nt >= T) | (ns < -1) | (ns >= T)).any()):
        raise ValueError(f"{name}: a link is outside [-1, T={T})")
    # Every node but the root is the target of exactly one link (a first child or a sibling).
    hits = torch.zeros(B, T + 1, dtype=torch.int64, device=dev)
    for links in (nt, ns):
        hits.scatter_add_(1, torch.where(links >= 0, links, T), torch.ones_like(links))
    want = torch.ones(B, T, dtype=torch.int64, device=dev)
    want[:, 0] = 0
    if not torch.equal(hits[:, :T], want):
        b, i = (int(x) for x in torch.nonzero(hits[:, :T] != want)[0])
        raise ValueError(
            f"{name}: node {i} of sequence {b} is linked {int(hits[b, i])} times; the root must "
            "be linked 0 times and every other node exactly once"
        )
    # owner[c] = the node whose first child is c; prev[s] = the sibling linking to s.
    dump = torch.full((B, T + 1), -1, dtype=torch.int64, device=dev)
    src = torch.arange(T, device=dev).expand(B, T)
    owner = dump.clone().scatter_(1, torch.where(nt >= 0, nt, T), src)[:, :T]
    prev = dump.clone().scatter_(1, torch.where(ns >= 0, ns, T), src)[:, :T]
    # Pointer jumping to the head of each sibling chain (the first child), log2(T) steps.
    head = torch.where(prev >= 0, prev, src)
    for _ in range(max(1, (T - 1).bit_length())):
        head = head.gather(1, head)
    parents = owner.gather(1, head)
    parents[:, 0] = -1
    own = torch.arange(T, device=dev)
    bad = (own > 0) & ((parents < 0) | (parents >= own))
    if bool(bad.any()):
        b, i = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(
            f"{name}: node {i} of sequence {b} gets parent {int(parents[b, i])}; the links must "
            "form a tree rooted at node 0 with every parent before its children (no cycles)"
        )
    return tree_from_parents(tokens, parents)


SGLANG_TREE_MASK_MODES = ("full", "qlen_only", "qlen_only_bitpacking")


def to_sglang_tree_mask(
    tree: DraftTree, mode: str = "full", prefix_len: torch.Tensor | Sequence[int] | None = None
) -> torch.Tensor:
    """SGLang's flat ``tree_mask`` as ``build_tree_kernel_efficient`` writes it, per mode.

    Args:
        tree: DraftTree with T nodes.
        mode: ``"full"`` (TreeMaskMode.FULL_MASK): bool, request b's [T, prefix_len[b] + T]
            rows flattened query-major and concatenated (prefix columns all True; the same
            array as FlashInfer's unpacked ``custom_mask``; needs ``prefix_len``, read on the
            host). ``"qlen_only"`` (QLEN_ONLY): bool [B * T * T], only the tree columns.
            ``"qlen_only_bitpacking"`` (QLEN_ONLY_BITPACKING): uint8 [B * T * n], n = 1, 2 or
            4 bytes per row for T <= 8, 16, 32 (SGLang's uint8 / uint16 / uint32 elements,
            ``.view(torch.uint16)`` etc. on a little-endian machine), node j at bit j % 8 of
            byte j // 8 of its row; ValueError for T > 32 (SGLang has no wider element).
        prefix_len: [B] committed lengths, for ``"full"`` only.

    Returns:
        The flat mask on the tree's device.
    """
    B, T = tree.tokens.shape
    if mode not in SGLANG_TREE_MASK_MODES:
        raise ValueError(f"to_sglang_tree_mask: mode={mode!r}; valid: {SGLANG_TREE_MASK_MODES}")
    if mode == "full":
        if prefix_len is None:
            raise ValueError("to_sglang_tree_mask: mode 'full' needs prefix_len")
        return to_flashinfer_custom_mask(tree, prefix_len, packed=False)[0]
    if mode == "qlen_only":
        return unpack_bits(tree.mask, T).reshape(-1)
    nbytes = _sglang_row_bytes(T)
    word = tree.mask[..., 0].to(torch.int64) & 0xFFFFFFFF  # [B, T], bits 0..T-1
    shifts = 8 * torch.arange(nbytes, device=word.device)
    return ((word[..., None] >> shifts) & 0xFF).to(torch.uint8).reshape(-1)


def from_sglang_tree_mask(
    tree_mask: torch.Tensor,
    mode: str,
    tokens: torch.Tensor,
    prefix_len: torch.Tensor | Sequence[int] | None = None,
) -> DraftTree:
    """The ``DraftTree`` of an SGLang ``tree_mask`` (the inverse of ``to_sglang_tree_mask``).

    Raises:
        TypeError: a mask of the wrong dtype for ``mode``.
        ValueError: a mask of the wrong size for ``mode``, a hidden prefix key
            (``"full"``), or rows that are not the ancestor-or-self sets of a parents-first tree.
    """
    name = "from_sglang_tree_mask"
    check_rank(name, "tokens", tokens, "[B, T]", INT_DTYPES)
    B, T = tokens.shape
    if mode not in SGLANG_TREE_MASK_MODES:
        raise ValueError(f"{name}: mode={mode!r}; valid: {SGLANG_TREE_MASK_MODES}")
    if mode == "full":
        if prefix_len is None:
            raise ValueError(f"{name}: mode 'full' needs prefix_len")
        prefixes = _host_lengths(name, prefix_len, B)
        sizes = torch.tensor([0] + [T * (P + T) for P in prefixes]).cumsum(0)
        return from_flashinfer_custom_mask(tree_mask, sizes, prefixes, tokens)
    if mode == "qlen_only":
        check_tensor(name, "a qlen_only tree_mask", tree_mask, (torch.bool,))
        if tree_mask.numel() != B * T * T:
            raise ValueError(
                f"{name}: a qlen_only mask is bool [B*T*T = {B * T * T}], got "
                f"{tree_mask.numel()} elements of {tree_mask.dtype}"
            )
        return tree_from_mask(pack_bits(tree_mask.reshape(B, T, T).to(tokens.device)), tokens)
    nbytes = _sglang_row_bytes(T)
    check_tensor(name, "a qlen_only_bitpacking tree_mask", tree_mask, (torch.uint8,))
    if tree_mask.numel() != B * T * nbytes:
        raise ValueError(
            f"{name}: a qlen_only_bitpacking mask of T={T} is uint8 [B*T*{nbytes} = "
            f"{B * T * nbytes}] (view SGLang's uint16/uint32 array as uint8), got "
            f"{tree_mask.numel()} elements of {tree_mask.dtype}"
        )
    rows = _unpackbits_little(tree_mask.to(tokens.device)).view(B, T, 8 * nbytes)
    if bool(rows[..., T:].any()):
        raise ValueError(f"{name}: a row has a bit set past node T-1={T - 1}")
    return tree_from_mask(pack_bits(rows[..., :T]), tokens)


def _sglang_row_bytes(T: int) -> int:
    """Bytes per row of SGLang's bit-packed tree mask: its uint8 / uint16 / uint32 element."""
    if T > 32:
        raise ValueError(
            f"SGLang's qlen_only_bitpacking tree mask holds at most 32 nodes per row; T={T}"
        )
    return 1 if T <= 8 else (2 if T <= 16 else 4)


# ----------------------------------------------------------------------------- FlashInfer


def to_flashinfer_custom_mask(
    tree: DraftTree,
    prefix_len: torch.Tensor | Sequence[int],
    packed: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer's ``custom_mask`` of the verify attention over prefix + tree keys.

    Request b has T query rows (the tree nodes) and kv_len = prefix_len[b] + T keys (its prefix,
    then the tree slots in node order). Element (i, k) of its [T, kv_len] matrix is True iff
    k < prefix_len[b] or node k - prefix_len[b] is i or an ancestor of i. The matrices are
    flattened query-major and concatenated over requests.

    Args:
        tree: DraftTree with T nodes.
        prefix_len: [B] committed lengths (tensor or list; read on the host).
        packed: True (default): ``packed_custom_mask`` uint8, each request packed with
            ``bitorder="little"`` into ceil(T * kv_len / 8) bytes starting on a byte boundary,
            and ``mask_indptr`` [B + 1] int32 byte offsets. False: the unpacked ``custom_mask``
            bool [sum_b T * kv_len_b] and its element offsets ``qk_indptr`` [B + 1] int32.

    Returns:
        (mask, indptr) on the tree's device.

    Example:
        >>> tree = tree_from_parents(torch.tensor([[1, 2]]), torch.tensor([[-1, 0]]))
        >>> m, ptr = to_flashinfer_custom_mask(tree, [1])  # rows: 1 1 0 | 1 1 1
        >>> m.tolist(), ptr.tolist()
        ([59], [0, 1])
    """
    B, T = tree.tokens.shape
    dev = tree.mask.device
    prefixes = _host_lengths("to_flashinfer_custom_mask", prefix_len, B)
    visible = unpack_bits(tree.mask, T)  # [B, T, T]
    segments, sizes = [], []
    for b, P in enumerate(prefixes):
        rows = torch.cat([torch.ones(T, P, dtype=torch.bool, device=dev), visible[b]], dim=1)
        flat = rows.reshape(-1)
        segments.append(_packbits_little(flat) if packed else flat)
        sizes.append(segments[-1].numel())
    indptr = torch.zeros(B + 1, dtype=torch.int32, device=dev)
    if B:
        indptr[1:] = torch.tensor(sizes, dtype=torch.int64, device=dev).cumsum(0).to(torch.int32)
    empty = torch.zeros(0, dtype=torch.uint8 if packed else torch.bool, device=dev)
    return (torch.cat(segments) if segments else empty), indptr


def from_flashinfer_custom_mask(
    custom_mask: torch.Tensor,
    indptr: torch.Tensor,
    prefix_len: torch.Tensor | Sequence[int],
    tokens: torch.Tensor,
) -> DraftTree:
    """The ``DraftTree`` of a FlashInfer custom mask (the inverse of ``to_flashinfer_custom_mask``).

    Args:
        custom_mask: packed uint8 (``packed_custom_mask``, little bit order) with byte offsets
            ``indptr``, or the unpacked flat bool ``custom_mask`` with element offsets.
        indptr: [B + 1] int32/int64 segment offsets (read on the host).
        prefix_len: [B] committed lengths; request b's segment is a [T, prefix_len[b] + T] matrix.
        tokens: [B, T] draft tokens (T from its shape).

    Raises:
        ValueError: a segment of the wrong size, a hidden prefix key (not expressible as a
            DraftTree, whose prefix is always visible), or a tree part that is not the
            ancestor-or-self mask of a parents-first tree.
    """
    name = "from_flashinfer_custom_mask"
    check_rank(name, "tokens", tokens, "[B, T]", INT_DTYPES)
    B, T = tokens.shape
    check_tensor(name, "custom_mask", custom_mask, (torch.uint8, torch.bool))
    if custom_mask.dim() != 1:
        raise ValueError(
            f"{name}: custom_mask must be 1-D uint8 (packed) or bool (unpacked), got shape "
            f"{tuple(custom_mask.shape)} dtype {custom_mask.dtype}"
        )
    packed = custom_mask.dtype == torch.uint8
    prefixes = _host_lengths(name, prefix_len, B)
    offsets = _host_lengths(name, indptr, B + 1, what="indptr")
    dev = tokens.device
    rows = torch.zeros(B, T, T, dtype=torch.bool, device=dev)
    for b, P in enumerate(prefixes):
        n = T * (P + T)
        size = (n + 7) // 8 if packed else n
        lo, hi = offsets[b], offsets[b + 1]
        if hi - lo != size or hi > custom_mask.numel():
            raise ValueError(
                f"{name}: segment {b} spans [{lo}, {hi}) but a [{T}, {P + T}] mask needs {size} "
                f"{'bytes' if packed else 'elements'} (mask has {custom_mask.numel()})"
            )
        seg = custom_mask[lo:hi].to(dev)
        flat = _unpackbits_little(seg)[:n] if packed else seg
        mat = flat.view(T, P + T)
        if not bool(mat[:, :P].all()):
            raise ValueError(
                f"{name}: request {b} hides a prefix key; a DraftTree sees its whole prefix"
            )
        rows[b] = mat[:, P:]
    return tree_from_mask(pack_bits(rows), tokens)


# ----------------------------------------------------------------------------- TensorRT-LLM


def to_trtllm_packed_mask(tree: DraftTree) -> torch.Tensor:
    """TensorRT-LLM's packed tree mask: int32 [B, T, ceil(T / 32)], node j at bit j % 32 of
    word j // 32 (root at bit 0). These are the bits of ``tree.mask``: returns a contiguous
    copy of it. TensorRT-LLM's flattened variant (rows of all requests concatenated,
    [sum of generation lengths, W]) is ``.view(-1, W)`` when every request has T nodes."""
    return tree.mask.to(torch.int32).contiguous().clone()


def from_trtllm_packed_mask(packed_mask: torch.Tensor, tokens: torch.Tensor) -> DraftTree:
    """The ``DraftTree`` of a TensorRT-LLM packed mask [B, T, ceil(T / 32)] int32 (see
    ``tree_from_mask``, which validates it)."""
    return tree_from_mask(packed_mask, tokens)


# ----------------------------------------------------------------------------- helpers


def _host_lengths(fn: str, values, n: int, what: str = "prefix_len") -> list[int]:
    vals = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if len(vals) != n or any(not isinstance(v, int) or v < 0 for v in vals):
        raise ValueError(f"{fn}: {what} must be {n} non-negative integers, got {vals!r}")
    return vals


def _packbits_little(bits: torch.Tensor) -> torch.Tensor:
    """numpy.packbits(bits, bitorder="little") for a 1-D bool tensor: element e is bit e % 8 of
    byte e // 8, the last byte zero-padded."""
    n = bits.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.int32, device=bits.device)
    padded[:n] = bits.to(torch.int32)
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.int32, device=bits.device)
    return (padded.view(-1, 8) * weights).sum(-1).to(torch.uint8)


def _unpackbits_little(data: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_packbits_little``: uint8 [n] -> bool [8 n]."""
    k = torch.arange(8, device=data.device)
    return ((data.to(torch.int32)[:, None] >> k) & 1).bool().reshape(-1)
