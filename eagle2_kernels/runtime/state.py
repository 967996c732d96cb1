"""The explicit state the round's phase functions work on.

:class:`TreeConstants` are the per-batch constant tensors of the draft expansion (built once
per batch size and device); :class:`DecodeState` is everything a decoding call mutates or
reads: the target adapter, the draft head, the config, the target and draft KV caches and
the constants, built by one :meth:`DecodeState.ensure`. The decoder owns one; the phase
functions (``runtime/phases.py``) and the drivers (``runtime/drivers.py``, ``graphs.py``,
``lookup.py``) receive it explicitly and never see the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eagle2_kernels.cache import KVStore, StaticKVCache
from eagle2_kernels.ops.sampling import process_logits, sample_from_probs
from eagle2_kernels.ops.tree import pack_bits

__all__ = ["TreeConstants", "DecodeState"]

_CACHE_ROUND = 128  # caches sized per call grow in steps of this many slots


@dataclass
class TreeConstants:
    """Constant tensors of the draft expansion for ``batch`` sequences, K candidates per
    frontier node and D expansion levels.

    own_bits     [D, B, K, words] int32  level j's row r sees its own tree slot (j*K + r)
    chain        [D+2, words] int32      catch-up rows: row i sees rows 0..i
    zero_scores  [B, 1] float32          the root's path score
    root_parent  [B, K] int64            the root expansion's parents (-1 = the root)
    one_mask     [B, 1, 1] int32         a one-node tree (a plain step)
    error_flag   optional [B] int32      set by tree_build on a bad draft (the static round)
    """

    top_k: int
    depth: int
    backend: str | None
    own_bits: torch.Tensor
    chain: torch.Tensor
    zero_scores: torch.Tensor
    root_parent: torch.Tensor
    one_mask: torch.Tensor
    error_flag: torch.Tensor | None = None
    _chains: dict = field(default_factory=dict, repr=False)  # longer catch-up masks, by n

    @classmethod
    def build(cls, batch: int, top_k: int, depth: int, device, backend: str | None = None) -> "TreeConstants":
        K, D = top_k, depth
        words = (D * K + 31) // 32
        own = pack_bits(torch.eye(D * K, dtype=torch.bool).view(D, K, D * K))  # row (j, r): bit j*K + r
        n_max = D + 2
        return cls(
            top_k=K, depth=D, backend=backend,
            own_bits=own.to(device).unsqueeze(1).expand(D, batch, K, words).contiguous(),
            chain=pack_bits(torch.tril(torch.ones(n_max, n_max, dtype=torch.bool))).to(device),
            zero_scores=torch.zeros(batch, 1, dtype=torch.float32, device=device),
            root_parent=torch.full((batch, K), -1, dtype=torch.int64, device=device),
            one_mask=torch.ones(batch, 1, 1, dtype=torch.int32, device=device),
        )

    @property
    def batch(self) -> int:
        return self.zero_scores.shape[0]

    def chain_mask(self, n: int) -> torch.Tensor:
        """[n, ceil(n/32)] int32: row i sees rows 0..i (the catch-up's causal mask)."""
        if n <= self.chain.shape[0]:
            return self.chain[:n, : (n + 31) // 32]
        mask = self._chains.get(n)
        if mask is None:
            mask = self._chains[n] = pack_bits(torch.tril(torch.ones(n, n, dtype=torch.bool))).to(self.chain.device)
        return mask


class DecodeState:
    """Adapter, head, config, caches and constants of one decoder (see the module doc).

    ``epoch`` counts calls: a suspended stream compares it with its own to notice that a
    later call reused the caches.
    """

    def __init__(self, adapter, head, config):
        self.adapter = adapter
        self.head = head
        self.config = config
        self.tcache: KVStore | None = None  # target KV (StaticKVCache or PagedKVCache)
        self.dcache: KVStore | None = None  # the head's KV (a StaticKVCache)
        self.positions: torch.Tensor | None = None  # arange over the draft cache's slots
        self.consts: TreeConstants | None = None
        self.epoch = 0

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def ensure(self, batch: int, need: int) -> None:
        """Caches with room for ``need`` slots per sequence and constants for ``batch``
        sequences: the current ones when they fit, else new ones."""
        cfg, ad = self.config, self.adapter
        if cfg.max_length is not None:
            capacity = cfg.max_length
        else:
            if ad.compiled is not None:  # room for a padded bucket past the tree
                need += max(0, ad.compiled.buckets[-1] - cfg.total_tokens)
            capacity = -(-need // _CACHE_ROUND) * _CACHE_ROUND
            if self.tcache is not None and self.tcache.capacity >= capacity:
                capacity = self.tcache.capacity
        dev, dtype, block = ad.device, ad.dtype, cfg.kv_block_size
        if self.tcache is None or not self.tcache.matches(batch, capacity, dtype, dev, block):
            self.tcache = ad.new_cache(batch, capacity, block)
            d_cap = capacity + cfg.depth * cfg.top_k + cfg.depth + 2
            head = self.head
            self.dcache = None if head is None else StaticKVCache(1, batch, head.num_kv_heads, d_cap,
                                                                  head.head_dim, dtype, dev)
            self.positions = torch.arange(d_cap, device=dev, dtype=torch.int64)
        if self.consts is None or self.consts.batch != batch or self.consts.one_mask.device != dev:
            self.consts = TreeConstants.build(batch, cfg.top_k, cfg.depth, dev, cfg.backend)

    def release(self) -> None:
        self.tcache = self.dcache = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def uniforms(self, shape, generator) -> torch.Tensor:
        """Sampling draws on the target's device (from ``generator``'s device when given)."""
        if generator is None:
            return torch.rand(shape, device=self.device)
        return torch.rand(shape, generator=generator, device=generator.device).to(self.device)

    def pick(self, logits: torch.Tensor, sampling, generator) -> torch.Tensor:
        """First token / plain step from [B, V] logits: argmax or processed sampling. [B] int64."""
        if sampling.greedy:
            return logits.argmax(dim=-1)
        probs = process_logits(logits, *sampling.as_tuple())
        return sample_from_probs(probs, self.uniforms(logits.shape[:1], generator))
