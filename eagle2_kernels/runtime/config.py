"""Decoding configuration: a frozen, validated dataclass."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from eagle2_kernels._backend import BACKENDS


# Upper bounds of the adaptive tree, (total_tokens, depth, top_k), by device type: the one
# source of defaults for TreeSpecDecoder(...), from_pretrained() and the CLI. The policy sizes
# each round within them from measured costs; the bounds only cap the draft work. CUDA: the
# paper's shape (a forward over 60 tokens costs about one over 1 on a GPU). CPU: a smaller cap,
# since the verified tree rarely exceeds ~10 nodes where a forward grows with its tokens.
DEFAULT_BOUNDS = {"cuda": (60, 5, 10), "cpu": (32, 5, 8)}


def default_tree(device) -> tuple[int, int, int]:
    """The default (total_tokens, depth, top_k) on ``device`` (a torch device or its name)."""
    import torch

    kind = torch.device(device).type
    return DEFAULT_BOUNDS.get(kind, DEFAULT_BOUNDS["cpu"])


def _positive_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"DecodeConfig: {name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"DecodeConfig: {name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class DecodeConfig:
    """Shape of the EAGLE-2 draft tree and of the decoder's static buffers.

    Attributes:
        total_tokens: T, tree nodes verified per round INCLUDING the root (>= 2). Paper default
            60 for 7B models on a GPU; small models on a CPU want 8-16.
        depth: D, draft expansion steps after the root expansion (>= 1); the deepest node is
            at depth D + 1.
        top_k: K, the tree's branching factor (>= 1): each expansion keeps the K best children
            per frontier node and the K best of those as the next frontier. Not the sampling
            filter (that is ``generate(top_k=...)``).
        max_length: capacity of the KV caches in tokens (prompt + new tokens + T must fit);
            None sizes the caches per call (grown when a call needs more, then reused).
        backend: force the ops' backend ("reference", "triton" or "ext"); None picks by device.
        static_round: run each round over preallocated static buffers with device-side
            lengths and no host reads inside the round (the GPU path, see
            ``runtime/graphs.py``). None (default) = on for CUDA targets, off on CPU, where
            the dynamic round is as fast with a fixed tree and faster with the adaptive
            policy (``bench/results/cpu/drivers/``); True forces it (also on CPU, eagerly), False the
            dynamic round.
        adaptive: size every round from the draft's scores and the machine's measured costs
            (default True; ``runtime/policy.py``): total_tokens, depth and top_k are then upper
            bounds, and a round may verify fewer nodes, expand fewer levels, or decode plainly
            when drafting does not pay. False pins the exact fixed shape. The static round
            keeps one captured shape per call and sizes each call from the draft confidence
            measured on the device during the earlier ones.
        kv_block_size: None (default) keeps the target's KV in one dense tensor; an int keeps it
            in pages of that many tokens behind a block table (``cache.PagedKVCache``).
        cuda_graphs: capture the static round's draft and verify phases as CUDA graphs and
            replay them. "auto" (default) = on when the static round runs on a CUDA target,
            falling back to eager replay (with a warning naming the reason) when capture
            fails; True = as "auto" but only valid for CUDA targets; False = never.
        lookup: merge continuations found in the context (n-gram / suffix lookup,
            ``runtime/lookup.py``) into each round's tree as extra candidates (default True);
            without a draft head the trees come from lookup alone. The dynamic round only
            (the CPU default); the static round drafts with the head alone.

        compile: compile the target's decode forwards (verify and plain step) and the draft
            head's tree step. "auto" (default) = on for CPU models when a C++ compiler is
            present and the forward can be exported, else eager, with the reason in
            ``decoder.compile_status`` / ``decoder.head_compile_status``; the environment
            variable ``EAGLE2_KERNELS_COMPILE=0`` turns "auto" off; True = on or raise;
            False = eager. Each graph is one AOTInductor package with frozen, prepacked
            weights, dynamic in batch and tokens (``models/compiled_aot.py``,
            ``models/compiled_head.py``), built once per machine (about a minute for the
            default model on 2 cores) and kept in ``$EAGLE2_KERNELS_CACHE/compiled/``, keyed
            by the weights, config, versions and CPU; later processes load it in a second or
            two. Where the export fails, or with ``EAGLE2_KERNELS_COMPILE_CACHE=0``, the target
            falls back to per-process Inductor graphs, one per bucket (``models/compiled.py``).
        compile_buckets: the per-process fallback's forward sizes (default (1, 4, 8)); a
            forward over n tokens runs the smallest bucket >= n with padded rows, larger ones
            run eagerly. The cached AOT graph ignores it.

    Invariant: T - 1 <= K + D*K*K (the draft must supply enough candidates).

    Example::

        cfg = DecodeConfig(total_tokens=16, depth=4, top_k=8)
    """

    total_tokens: int = 60
    depth: int = 5
    top_k: int = 10
    max_length: int | None = None
    backend: str | None = None
    static_round: bool | None = None
    cuda_graphs: bool | str = "auto"
    adaptive: bool = True
    kv_block_size: int | None = None
    lookup: bool = True
    compile: bool | str = "auto"
    compile_buckets: tuple[int, ...] | None = None

    def __post_init__(self):
        _positive_int("total_tokens", self.total_tokens, 2)
        _positive_int("depth", self.depth, 1)
        _positive_int("top_k", self.top_k, 1)
        candidates = self.top_k + self.depth * self.top_k * self.top_k
        if self.total_tokens - 1 > candidates:
            raise ValueError(
                f"DecodeConfig: total_tokens={self.total_tokens} needs {self.total_tokens - 1} draft "
                f"candidates but top_k={self.top_k}, depth={self.depth} supply only K + D*K*K = "
                f"{candidates}; lower total_tokens to <= {candidates + 1} or raise top_k/depth"
            )
        if self.max_length is not None:
            _positive_int("max_length", self.max_length, self.total_tokens + 2)
        if self.static_round not in (None, True, False):
            raise ValueError(f"DecodeConfig: static_round must be None, True or False, got {self.static_round!r}")
        if not (self.cuda_graphs is True or self.cuda_graphs is False or self.cuda_graphs == "auto"):
            raise ValueError(f"DecodeConfig: cuda_graphs must be 'auto', True or False, got {self.cuda_graphs!r}")
        if self.cuda_graphs is True and self.static_round is False:
            raise ValueError("DecodeConfig: cuda_graphs=True needs the static round (static_round None or True)")
        if self.kv_block_size is not None:
            _positive_int("kv_block_size", self.kv_block_size, 1)
        if self.adaptive not in (True, False):
            raise ValueError(f"DecodeConfig: adaptive must be True or False, got {self.adaptive!r}")
        if not (self.compile is True or self.compile is False or self.compile == "auto"):
            raise ValueError(f"DecodeConfig: compile must be 'auto', True or False, got {self.compile!r}")
        if self.compile_buckets is not None:
            buckets = tuple(self.compile_buckets)
            if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
                raise ValueError(
                    f"DecodeConfig: compile_buckets must be a non-empty tuple of positive ints, got "
                    f"{self.compile_buckets!r}"
                )
            object.__setattr__(self, "compile_buckets", tuple(sorted(set(buckets))))
        if self.lookup not in (True, False):
            raise ValueError(f"DecodeConfig: lookup must be True or False, got {self.lookup!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"DecodeConfig: backend {self.backend!r} is not one of {', '.join(BACKENDS)} or None")

    @property
    def num_candidates(self) -> int:
        """C = K + D*K*K, the draft candidates the reranking chooses from."""
        return self.top_k + self.depth * self.top_k * self.top_k
