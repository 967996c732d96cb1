"""Shared input checks of the paged ops (block tables, per-sequence index vectors).

A paged KV pool holds pages of ``page_size`` token slots; sequence b's logical position ``pos``
lives in page ``block_table[b, pos // page_size]`` at slot ``pos % page_size`` (vLLM's block
table; SGLang's ``req_to_token`` is the same with page_size 1). Only the entries a sequence
uses (``ceil(length / page_size)``) are read; the rest may hold anything (e.g. -1).
"""

from __future__ import annotations

import torch

INT_DTYPES = (torch.int32, torch.int64)


def check_tensor(fn: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_index_vector(fn: str, name: str, t: torch.Tensor, B: int, device) -> None:
    """[B] int32/int64 on ``device``."""
    check_tensor(fn, name, t)
    if t.shape != (B,) or t.dtype not in INT_DTYPES:
        raise ValueError(
            f"{fn}: {name} must be [B={B}] int32/int64, got shape {tuple(t.shape)} dtype {t.dtype}"
        )
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, expected {device}")


def check_block_table(fn: str, block_table, B: int, device, name: str = "block_table") -> None:
    """[B, max_blocks] int32/int64 on ``device``."""
    check_tensor(fn, name, block_table)
    if block_table.dim() != 2 or block_table.shape[0] != B or block_table.dtype not in INT_DTYPES:
        raise ValueError(
            f"{fn}: {name} must be [B={B}, max_blocks] int32/int64, got shape "
            f"{tuple(block_table.shape)} dtype {block_table.dtype}"
        )
    if block_table.device != device:
        raise ValueError(f"{fn}: {name} is on {block_table.device}, expected {device}")

