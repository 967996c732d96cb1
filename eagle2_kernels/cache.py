"""The static KV cache shared by the target adapter, the draft head and the decoder.

All keys and values of a model live in ONE preallocated tensor ``kv`` of shape
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

import torch


class StaticKVCache:
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
        for name, value in (
            ("num_layers", num_layers),
            ("batch_size", batch_size),
            ("num_kv_heads", num_kv_heads),
            ("capacity", capacity),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"StaticKVCache: {name} must be a positive int, got {value!r}")
        self.num_layers = num_layers
        self.kv = torch.zeros(
            2 * num_layers, batch_size, num_kv_heads, capacity, head_dim, dtype=dtype, device=device
        )
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.host_lengths = [0] * batch_size

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

    def reset(self) -> None:
        """Forget every sequence (lengths to 0); the storage is kept and overwritten later."""
        self.lengths.zero_()
        self.host_lengths = [0] * self.batch_size

    def set_length(self, length: int) -> None:
        """Set every sequence's committed length to ``length`` (host and device)."""
        self.lengths.fill_(length)
        self.host_lengths = [length] * self.batch_size

    def set_lengths(self, lengths: list[int]) -> None:
        """Set each sequence's committed length (host list and device tensor)."""
        if len(set(lengths)) == 1:
            self.set_length(lengths[0])
            return
        self.lengths.copy_(torch.tensor(lengths, dtype=torch.int32))
        self.host_lengths = list(lengths)

    def matches(self, batch_size: int, capacity: int, dtype: torch.dtype, device) -> bool:
        """True when this cache can serve a call with these needs without reallocation."""
        return (
            self.batch_size == batch_size
            and self.capacity >= capacity
            and self.dtype == dtype
            and self.device == torch.device(device)
        )
