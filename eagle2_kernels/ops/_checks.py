"""The input checks shared by the public ops (one place, one rule, one message style).

The rule, for every public op in ``eagle2_kernels.ops``: a wrong *type* (not a tensor, not an
int, not a ``DraftTree``) or a wrong *dtype* raises ``TypeError``; a wrong *shape*, *device*
or *value* (out of range) raises ``ValueError``. Messages start with the op's name and say
what was given and what would be valid, e.g. ``tree_attention: q has dtype torch.float64;
valid: float32, float16, bfloat16``.

Paged KV: a pool holds pages of ``page_size`` token slots; sequence b's logical position
``pos`` lives in page ``block_table[b, pos // page_size]`` at slot ``pos % page_size`` (vLLM's
block table; SGLang's ``req_to_token`` is the same with page_size 1). Only the entries a
sequence uses (``ceil(length / page_size)``) are read; the rest may hold anything (e.g. -1).
"""

from __future__ import annotations

import torch

from eagle2_kernels.ops.tree import DraftTree, mask_words

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)


def describe(x) -> object:
    """The shape of a tensor, else the name of the type (for messages)."""
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _dtype_names(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_tensor(fn: str, name: str, t, dtypes=None) -> None:
    """TypeError unless ``t`` is a tensor (of one of ``dtypes`` when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{fn}: {name} must be {_dtype_names(dtypes)}, got {t.dtype}")


def check_rank(fn: str, name: str, t, layout: str, dtypes=None) -> None:
    """A tensor with as many dims as ``layout`` names (e.g. ``"[B, T]"``), dtype in ``dtypes``."""
    check_tensor(fn, name, t)
    ndim = layout.count(",") + 1
    if t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be a {layout} tensor, got shape {tuple(t.shape)}")
    check_tensor(fn, name, t, dtypes)


def check_shape(fn: str, name: str, t, shape: tuple, layout: str, dtypes=None) -> None:
    """A tensor of exactly ``shape`` (``layout`` names its dims, e.g. ``"[B]"``)."""
    check_tensor(fn, name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{fn}: {name} must have shape {layout} = {list(shape)}, got {tuple(t.shape)}"
        )
    check_tensor(fn, name, t, dtypes)


def check_device(fn: str, name: str, t: torch.Tensor, device, ref: str) -> None:
    """ValueError unless ``t`` is on ``device`` (the device of the input named ``ref``)."""
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, {ref} on {device}")


def check_int(
    fn: str, name: str, value, lo: int, hi: int, hi_label: str | None = None, hint: str = ""
) -> int:
    """A Python int (not bool) in [lo, hi]; ``hi_label`` says where hi comes from (``"V=5"``),
    ``hint`` is appended to the message."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be a Python int, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{fn}: {name}={value} must be in [{lo}, {hi_label or hi}]{hint}")
    return value


def check_scale(fn: str, scale) -> None:
    """A softmax scale: a real number or None."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{fn}: scale must be a float or None, got {scale!r}")


def check_index_vector(fn: str, name: str, t, B: int, device, ref: str) -> None:
    """[B] int32/int64 on ``device``."""
    check_shape(fn, name, t, (B,), "[B]", INT_DTYPES)
    check_device(fn, name, t, device, ref)


def check_block_table(fn: str, table, B: int, device, ref: str, name: str = "block_table") -> None:
    """[B, max_blocks] int32/int64 on ``device``."""
    check_rank(fn, name, table, "[B, max_blocks]", INT_DTYPES)
    if table.shape[0] != B:
        raise ValueError(f"{fn}: {name} has {table.shape[0]} rows, expected B={B}")
    check_device(fn, name, table, device, ref)


def check_tree_mask(fn: str, tree_mask, B: int, Tq: int, tree_len: int, device, ref: str) -> None:
    """[B, Tq, W] int32 with W >= ceil(tree_len / 32), on ``device``."""
    check_rank(fn, "tree_mask", tree_mask, "[B, Tq, W]", (torch.int32,))
    words = mask_words(tree_len)
    if tree_mask.shape[0] != B or tree_mask.shape[1] != Tq or tree_mask.shape[2] < words:
        raise ValueError(
            f"{fn}: tree_mask has shape {tuple(tree_mask.shape)}; expected "
            f"[B={B}, Tq={Tq}, W>={words}] for tree_len={tree_len}"
        )
    check_device(fn, "tree_mask", tree_mask, device, ref)


def check_attention(fn: str, q, k, v, kv_layout: str, kv_names=("k_cache", "v_cache")):
    """q [B, Hq, Tq, Dh] float and K/V of one shape, dtype and device of ``q``; returns
    ``(B, Hq, Tq, Dh)``. Head counts and head dims are checked by the caller, which knows
    where they sit in ``kv_layout``."""
    check_rank(fn, "q", q, "[B, Hq, Tq, Dh]", FLOAT_DTYPES)
    for name, t in zip(kv_names, (k, v)):
        check_rank(fn, name, t, kv_layout)
        if t.dtype != q.dtype:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}, q has {q.dtype}")
        check_device(fn, name, t, q.device, "q")
    if k.shape != v.shape:
        raise ValueError(
            f"{fn}: {kv_names[0]} {tuple(k.shape)} and {kv_names[1]} {tuple(v.shape)} differ in shape"
        )
    return tuple(q.shape)


def check_heads(fn: str, Hq: int, Hkv: int, Dh: int, Dk: int) -> None:
    """GQA: Hq a multiple of Hkv, one head dim."""
    if Dk != Dh:
        raise ValueError(f"{fn}: cache head dim {Dk} != q head dim Dh={Dh}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{fn}: Hq={Hq} must be a multiple of Hkv={Hkv}")


def check_tree_and_logits(fn: str, tree, target_logits) -> tuple[int, int]:
    """A ``DraftTree`` whose tokens and parents are [B, T] int32/int64 (B, T >= 1) and
    target_logits [B, T, V] float (V >= 1) on their device; returns ``(B, T)``. The verify ops
    read only the tokens and parents of a tree."""
    if not isinstance(tree, DraftTree):
        raise TypeError(f"{fn}: tree must be an eagle2_kernels.ops.DraftTree, got {type(tree).__name__}")
    tokens, parents = tree.tokens, tree.parents
    for name, t in (("tree.tokens", tokens), ("tree.parents", parents)):
        check_rank(fn, name, t, "[B, T]", INT_DTYPES)
    if tuple(parents.shape) != tuple(tokens.shape):
        raise ValueError(
            f"{fn}: tree.parents shape {tuple(parents.shape)} differs from tree.tokens shape "
            f"{tuple(tokens.shape)}"
        )
    B, T = tokens.shape
    if B < 1 or T < 1:
        raise ValueError(f"{fn}: the tree needs B >= 1 and T >= 1 (the root), got [B, T] = [{B}, {T}]")
    check_rank(fn, "target_logits", target_logits, "[B, T, V]")
    if not target_logits.is_floating_point():
        raise TypeError(f"{fn}: target_logits must be float (fp32/fp16/bf16), got {target_logits.dtype}")
    if tuple(target_logits.shape[:2]) != (B, T):
        raise ValueError(
            f"{fn}: target_logits must be [B, T, V] = [{B}, {T}, V], got shape "
            f"{tuple(target_logits.shape)}"
        )
    if target_logits.shape[2] < 1:
        raise ValueError(f"{fn}: target_logits has an empty vocabulary dim (V = 0)")
    for name, t in (("tree.tokens", tokens), ("tree.parents", parents)):
        check_device(fn, name, t, target_logits.device, "target_logits")
    return B, T
