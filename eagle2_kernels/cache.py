"""The KV stores shared by the target adapter, the draft heads and the decoder.

Two stores, siblings with one interface (:class:`KVStore`): :class:`StaticKVCache` (dense)
and :class:`PagedKVCache` (pages behind a block table). What one forward needs of a store,
``write`` and ``attend`` over its ``lengths``, is the smaller protocol :class:`KVView`, which
other storage (a serving engine's pool) can answer too.

The dense store keeps all keys and values of a model in ONE preallocated tensor ``kv`` of shape
[2 * layers, B, Hkv, Lmax, Dh]: the keys of layer l at ``kv[2 * l]``, its values at
``kv[2 * l + 1]``. One tensor lets ``ops.kv_compact`` move the accepted path of every layer
in a single call, and keeps the decode state static (no reallocation inside a round).

Lengths are held twice: ``lengths`` is a [B] int32 device tensor (what the ops read, so no
host round-trip is needed on a GPU), and the host mirror ``host_lengths`` (a list of ints)
is what the Python loop uses to slice. The dynamic round keeps both in step (``set_length`` /
``set_lengths``); the static round (``runtime/graphs.py``) advances only the device tensor, so
there ``host_lengths`` is stale until the next ``set_length(s)`` at the start of a call.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class KVView(Protocol):
    """What one forward needs of a KV store: the target adapter's attention function and a
    draft head's ``tree_step`` write the new rows' K/V and attend over the store through it.

    Attributes:
        lengths: [B] int32 device tensor, committed slots per sequence (the visible prefix).
    """

    lengths: torch.Tensor

    def write(self, layer: int, start, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, Hkv, N, Dh] of ``layer`` at logical slots start .. start + N - 1
        (``start``: an int, a list of B ints, or a [B] integer device tensor)."""

    def attend(self, layer: int, q: torch.Tensor, tree_mask: torch.Tensor, tree_len: int, scale,
               backend=None, window=None, softcap=None, sinks=None) -> torch.Tensor:
        """Tree attention of q [B, Hq, N, Dh] over ``layer``'s committed prefix (every slot
        below ``lengths``) and the ``tree_len`` slots after it (per the packed [B, N, W]
        ``tree_mask``): [B, Hq, N, Dh]."""


@runtime_checkable
class KVStore(KVView, Protocol):
    """A KV store a decoder owns across rounds: a :class:`KVView` plus the commit of an
    accepted path (``compact``), the lengths' host mirror and setters, and its size.

    Attributes:
        host_lengths: list of B ints, the host copy of ``lengths`` (stale after a device-side
            ``lengths.add_`` until the next ``set_length(s)``).
    """

    host_lengths: list[int]

    @property
    def capacity(self) -> int:
        """Slots per sequence."""

    def compact(self, path: torch.Tensor, accept_len: torch.Tensor, backend=None) -> None:
        """Move the accepted path's KV (every layer) to the slots right after the prefix."""

    def set_length(self, length: int) -> None:
        """Set every sequence's committed length (host and device)."""

    def set_lengths(self, lengths: list[int]) -> None:
        """Set each sequence's committed length (host list and device tensor)."""

    def matches(self, batch_size: int, capacity: int, dtype: torch.dtype, device, block_size=None) -> bool:
        """True when this store can serve a call with these needs without reallocation."""


def _extra(backend, window, softcap, sinks) -> dict:
    """The optional keywords of a tree-attention call (only those that are set)."""
    named = dict(backend=backend, window=window, softcap=softcap, sinks=sinks)
    return {k: v for k, v in named.items() if v is not None}


class _Lengths:
    """What both stores share: size checks, ``num_layers`` and the committed lengths (the [B]
    int32 device tensor ``lengths`` and its host mirror ``host_lengths``) with their setters.
    Not a store on its own (no storage)."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, capacity: int, head_dim: int,
                 device):
        for name, value in (
            ("num_layers", num_layers),
            ("batch_size", batch_size),
            ("num_kv_heads", num_kv_heads),
            ("capacity", capacity),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {value!r}")
        self.num_layers = num_layers
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.host_lengths = [0] * batch_size

    def set_length(self, length: int) -> None:
        """Set every sequence's committed length to ``length`` (host and device)."""
        self.lengths.fill_(length)
        self.host_lengths = [length] * len(self.host_lengths)

    def set_lengths(self, lengths: list[int]) -> None:
        """Set each sequence's committed length (host list and device tensor)."""
        if len(set(lengths)) == 1:
            self.set_length(lengths[0])
            return
        self.lengths.copy_(torch.tensor(lengths, dtype=torch.int32))
        self.host_lengths = list(lengths)


class StaticKVCache(_Lengths):
    """Preallocated K/V storage for ``num_layers`` attention layers.

    Args:
        num_layers: attention layers of the model (the tensor holds 2 * num_layers planes).
        batch_size: B.
        num_kv_heads: Hkv.
        capacity: Lmax, slots per sequence.
        head_dim: Dh.
        dtype, device: of the storage.

    Attributes:
        kv: [2 * layers, B, Hkv, Lmax, Dh] tensor; keys of layer l at 2l, values at 2l + 1.
        lengths: [B] int32 device tensor, committed slots per sequence (the prefix length).
        host_lengths: list of B ints, host copy of ``lengths`` (not updated by the static
            round's device-side ``lengths.add_``).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        super().__init__(num_layers, batch_size, num_kv_heads, capacity, head_dim, device)
        self.kv = torch.zeros(
            2 * num_layers, batch_size, num_kv_heads, capacity, head_dim, dtype=dtype, device=device
        )

    @property
    def batch_size(self) -> int:
        return self.kv.shape[1]

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def device(self) -> torch.device:
        return self.kv.device

    def keys(self, layer: int) -> torch.Tensor:
        """[B, Hkv, Lmax, Dh] view of the keys of ``layer``."""
        return self.kv[2 * layer]

    def values(self, layer: int) -> torch.Tensor:
        """[B, Hkv, Lmax, Dh] view of the values of ``layer``."""
        return self.kv[2 * layer + 1]

    def write(self, layer: int, start, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ([B, Hkv, N, Dh]) of ``layer`` at slots start .. start + N - 1.

        ``start`` is an int (same slot for the batch), a list of B ints (one per sequence), or
        a [B] integer device tensor. The tensor form is a scatter that reads nothing on the
        host (CUDA-graph capturable); its capacity is not checked here, the caller sizes the
        cache so that every write fits.
        """
        n = k.shape[2]
        if isinstance(start, torch.Tensor):
            b, h, _, d = k.shape
            offs = torch.arange(n, device=start.device, dtype=torch.int64)
            idx = (start.to(torch.int64).view(b, 1, 1, 1) + offs.view(1, 1, n, 1)).expand(b, h, n, d)
            self.kv[2 * layer].scatter_(2, idx, k)
            self.kv[2 * layer + 1].scatter_(2, idx, v)
            return
        if isinstance(start, int) or len(set(start)) == 1:
            s0 = start if isinstance(start, int) else start[0]
            if s0 + n > self.capacity:
                raise ValueError(
                    f"StaticKVCache: writing {n} slots at {s0} exceeds the capacity {self.capacity}"
                )
            self.kv[2 * layer, :, :, s0 : s0 + n].copy_(k)
            self.kv[2 * layer + 1, :, :, s0 : s0 + n].copy_(v)
            return
        if max(start) + n > self.capacity:
            raise ValueError(
                f"StaticKVCache: writing {n} slots at {max(start)} exceeds the capacity {self.capacity}"
            )
        for b, s0 in enumerate(start):
            self.kv[2 * layer, b, :, s0 : s0 + n].copy_(k[b])
            self.kv[2 * layer + 1, b, :, s0 : s0 + n].copy_(v[b])

    def matches(self, batch_size: int, capacity: int, dtype: torch.dtype, device, block_size=None) -> bool:
        """True when this cache can serve a call with these needs without reallocation."""
        return (
            block_size is None
            and self.batch_size == batch_size
            and self.capacity >= capacity
            and self.dtype == dtype
            and self.device == torch.device(device)
        )

    # The two operations the decoder's target forwards need, whatever the storage.
    def attend(self, layer: int, q: torch.Tensor, tree_mask: torch.Tensor, tree_len: int, scale, backend=None,
               window=None, softcap=None, sinks=None):
        """Tree attention of q [B, Hq, N, Dh] over layer ``layer``'s prefix + tree slots, with the
        layer's optional sliding window, logit softcap and sinks (see ``ops.tree_attention``).
        The cache keeps every slot; a windowed layer's attention just does not read the old ones."""
        from eagle2_kernels.ops import tree_attention

        extra = _extra(backend, window, softcap, sinks)
        return tree_attention(q, self.keys(layer), self.values(layer), self.lengths, tree_mask, tree_len,
                              scale=scale, **extra)

    def compact(self, path: torch.Tensor, accept_len: torch.Tensor, backend=None) -> None:
        """Move the accepted path's KV (every layer) to the slots right after the prefix."""
        from eagle2_kernels.ops import kv_compact

        kv_compact(self.kv, self.lengths, path, accept_len, backend=backend)


class PagedKVCache(_Lengths):
    """The target's KV in fixed-size pages reached through a block table (vLLM's layout): a
    :class:`KVStore` like :class:`StaticKVCache` (write, lengths, attend, compact), without a
    dense tensor (no ``kv`` / ``keys`` / ``values``).

    Args: as :class:`StaticKVCache`, plus ``block_size`` (tokens per page). Each sequence gets
    ``ceil(capacity / block_size)`` pages, scattered over the pool in a fixed shuffled order
    (so that no code can rely on a sequence's pages being adjacent).

    Attributes:
        pages: [2 * layers, num_blocks, block_size, Hkv, Dh]; keys of layer l at 2l, values 2l+1.
        block_table: [B, max_blocks] int32, page of each block of each sequence.
        lengths, host_lengths: as in :class:`StaticKVCache`.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device, block_size: int = 16):
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"PagedKVCache: block_size must be a positive int, got {block_size!r}")
        super().__init__(num_layers, batch_size, num_kv_heads, capacity, head_dim, device)
        self.block_size = block_size
        blocks = -(-capacity // block_size)
        num_blocks = blocks * batch_size
        self.pages = torch.zeros(2 * num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                                 device=device)
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0))
        self.block_table = order.view(batch_size, blocks).to(torch.int32).to(device)
        self._batch, self._capacity = batch_size, blocks * block_size

    def __getattr__(self, name: str):
        # Only reached for a missing attribute: say where a dense store's views went.
        if name in ("kv", "keys", "values"):
            raise AttributeError(
                f"a PagedKVCache has no dense {name}: its KV lives in pages [2 * layers, blocks, block_size, "
                f"Hkv, Dh] reached through block_table; use write() / attend() / compact()"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def dtype(self) -> torch.dtype:
        return self.pages.dtype

    @property
    def device(self) -> torch.device:
        return self.pages.device

    def _flat_slots(self, start, n: int) -> torch.Tensor:
        """[B, n] int64 flat page-slot index (page * block_size + offset) of logical start + j."""
        dev = self.pages.device
        if isinstance(start, torch.Tensor):
            first = start.to(torch.int64).view(-1, 1)
        elif isinstance(start, int):
            first = torch.full((self._batch, 1), start, dtype=torch.int64, device=dev)
        else:
            first = torch.tensor(start, dtype=torch.int64, device=dev).view(-1, 1)
        if not isinstance(start, torch.Tensor):
            top = int(first.max()) + n
            if top > self._capacity:
                raise ValueError(f"PagedKVCache: writing {n} slots at {top - n} exceeds the capacity {self._capacity}")
        pos = first + torch.arange(n, device=dev, dtype=torch.int64)  # [B, n]
        page = self.block_table.to(torch.int64).gather(1, pos // self.block_size)
        return page * self.block_size + pos % self.block_size

    def write(self, layer: int, start, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v ([B, Hkv, N, Dh]) at logical slots start .. start + N - 1 (an int, a list
        of B ints, or a [B] device tensor: a scatter with no host read)."""
        b, h, n, d = k.shape
        idx = self._flat_slots(start, n).reshape(-1)
        for plane, x in ((2 * layer, k), (2 * layer + 1, v)):
            flat = self.pages[plane].view(-1, h, d)
            flat.index_copy_(0, idx, x.transpose(1, 2).reshape(b * n, h, d))

    def matches(self, batch_size: int, capacity: int, dtype: torch.dtype, device, block_size=None) -> bool:
        return (
            block_size == self.block_size
            and self._batch == batch_size
            and self._capacity >= capacity
            and self.dtype == dtype
            and self.device == torch.device(device)
        )

    def attend(self, layer: int, q: torch.Tensor, tree_mask: torch.Tensor, tree_len: int, scale, backend=None,
               window=None, softcap=None, sinks=None):
        from eagle2_kernels.ops import tree_attention_paged

        extra = _extra(backend, window, softcap, sinks)
        return tree_attention_paged(q, self.pages[2 * layer], self.pages[2 * layer + 1], self.block_table,
                                    self.lengths, tree_mask, tree_len, scale=scale, **extra)

    def compact(self, path: torch.Tensor, accept_len: torch.Tensor, backend=None) -> None:
        from eagle2_kernels.ops import kv_compact_paged

        kv_compact_paged(self.pages, self.block_table, self.lengths, path, accept_len, backend=backend)
