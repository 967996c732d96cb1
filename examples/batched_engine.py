"""A minimal batched serving-engine step built directly on the eagle2_kernels ops.

This is what a serving stack does with the ops when it keeps its own model, KV cache and batch
state (it does not use ``TreeSpecDecoder``). One speculative step for a batch of B sequences, each
with its own committed length, is:

    draft   tree_expand (root, then D times)  -> candidates            [B, C]
    build   tree_build(candidates)            -> DraftTree              tokens/parents/depth/mask [B, T]
    verify  target forward over the T nodes at positions prefix_len + depth, attention by
            tree_attention over the static cache (prefix + packed tree mask)
    accept  verify_greedy(tree, logits)       -> path [B, T], accept_len [B], bonus [B]
    commit  kv_compact(cache, prefix_len, path, accept_len); prefix_len += accept_len

The target here is a toy decoder (random weights, RoPE, GQA, RMSNorm, 2 layers) written in a few
lines of torch, with all layers' K and V in one [2 * layers, B, Hkv, Lmax, Dh] tensor, the layout
``kv_compact`` moves in one launch. The drafter is the target's own zero-layer approximation
(embedding -> final norm -> lm_head, a bigram table), which agrees with the target often enough
to give multi-token acceptances. Prompts of different lengths share one batch (right-padded
prefill with a causal tree mask), and every sequence advances by its own acceptance length.

The script checks losslessness: each sequence's speculative output must equal plain greedy
decoding of the same toy target (recomputed from scratch, token by token) in float32.

Run:  python examples/batched_engine.py [--batch 3] [--new-tokens 24] [--tree 10,3,3] [--backend reference]
(add TRITON_INTERPRET=1 and --backend triton to run the Triton kernels on CPU tensors, slowly).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from eagle2_kernels.ops import kv_compact, tree_attention, tree_build, tree_expand, verify_greedy
from eagle2_kernels.ops.tree import pack_bits


# ------------------------------------------------------------------------------------------------
# A toy target with a static cache (stands in for the engine's own model)


class ToyTarget(torch.nn.Module):
    """Llama-like decoder: V=96, H=64, 2 layers, Hq=4, Hkv=2, Dh=16 (random weights)."""

    def __init__(self, vocab=96, hidden=64, layers=2, heads=4, kv_heads=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.V, self.H, self.L, self.Hq, self.Hkv = vocab, hidden, layers, heads, kv_heads
        self.Dh = hidden // heads

        def w(*shape, scale=1.0):
            return torch.nn.Parameter(torch.randn(*shape, generator=g) * scale / math.sqrt(shape[-1]))

        self.embed = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g))
        self.wq = torch.nn.ParameterList([w(heads * self.Dh, hidden) for _ in range(layers)])
        self.wk = torch.nn.ParameterList([w(kv_heads * self.Dh, hidden) for _ in range(layers)])
        self.wv = torch.nn.ParameterList([w(kv_heads * self.Dh, hidden) for _ in range(layers)])
        self.wo = torch.nn.ParameterList([w(hidden, heads * self.Dh, scale=0.5) for _ in range(layers)])
        self.w_up = torch.nn.ParameterList([w(2 * hidden, hidden) for _ in range(layers)])
        self.w_down = torch.nn.ParameterList([w(hidden, 2 * hidden, scale=0.5) for _ in range(layers)])
        self.lm_head = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g) * 2.0 / math.sqrt(hidden))

    def new_cache(self, batch: int, max_len: int, dtype=torch.float32) -> torch.Tensor:
        """[2 * layers, B, Hkv, Lmax, Dh]: K of layer l at 2l, V at 2l + 1."""
        return torch.zeros(2 * self.L, batch, self.Hkv, max_len, self.Dh, dtype=dtype)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # x [B, heads, Tq, Dh], pos [B, Tq]
        half = self.Dh // 2
        freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
        ang = pos.float()[:, None, :, None] * freq  # [B, 1, Tq, half]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    @staticmethod
    def _norm(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def forward(self, tokens, positions, cache, prefix_len, tree_mask):
        """Run Tq new tokens per sequence, write their K/V at slots prefix_len + 0..Tq-1, attend.

        tokens, positions: [B, Tq] int64; cache [2L, B, Hkv, Lmax, Dh]; prefix_len [B] int32
        (committed slots); tree_mask [B, Tq, W] int32 (which of the new slots each row sees).
        Returns logits [B, Tq, V].
        """
        B, Tq = tokens.shape
        slots = prefix_len.long()[:, None] + torch.arange(Tq)  # [B, Tq]
        x = self.embed[tokens]
        for l in range(self.L):
            h = self._norm(x)
            q = (h @ self.wq[l].T).view(B, Tq, self.Hq, self.Dh).transpose(1, 2)
            k = (h @ self.wk[l].T).view(B, Tq, self.Hkv, self.Dh).transpose(1, 2)
            v = (h @ self.wv[l].T).view(B, Tq, self.Hkv, self.Dh).transpose(1, 2)
            q, k = self._rope(q, positions), self._rope(k, positions)
            for b in range(B):  # an engine would scatter with one kernel; clarity wins here
                cache[2 * l, b][:, slots[b]] = k[b]
                cache[2 * l + 1, b][:, slots[b]] = v[b]
            attn = tree_attention(q, cache[2 * l], cache[2 * l + 1], prefix_len, tree_mask, tree_len=Tq)
            x = x + attn.transpose(1, 2).reshape(B, Tq, -1) @ self.wo[l].T
            up = self._norm(x) @ self.w_up[l].T
            x = x + F.silu(up) @ self.w_down[l].T
        return self._norm(x) @ self.lm_head.T

    def bigram_logits(self) -> torch.Tensor:
        """[V, V] logits of the zero-layer approximation: next-token logits from the token alone."""
        return self._norm(self.embed) @ self.lm_head.T


def causal_mask(batch: int, n: int) -> torch.Tensor:
    """[B, n, ceil(n/32)] int32 packed mask of a causal (lower-triangular) block."""
    mask = pack_bits(torch.tril(torch.ones(n, n, dtype=torch.bool)))
    return mask.expand(batch, *mask.shape).contiguous()


# ------------------------------------------------------------------------------------------------
# The engine


class SpecEngine:
    """Static-batch speculative engine: per-sequence lengths, one shared cache, greedy."""

    def __init__(self, target: ToyTarget, total_tokens=10, depth=3, top_k=3, max_len=256):
        self.target, self.T, self.D, self.K = target, total_tokens, depth, top_k
        self.max_len = max_len
        self.draft_table = target.bigram_logits()  # [V, V]

    def prefill(self, prompts: list[list[int]]):
        """Right-padded batched prefill; returns the first new token (root) per sequence."""
        B, n = len(prompts), max(len(p) for p in prompts)
        self.cache = self.target.new_cache(B, self.max_len)
        tokens = torch.zeros(B, n, dtype=torch.long)
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = torch.tensor(p)
        positions = torch.arange(n).expand(B, n)
        zero = torch.zeros(B, dtype=torch.int32)
        logits = self.target(tokens, positions, self.cache, zero, causal_mask(B, n))
        # padded rows wrote garbage past each prompt; those slots are overwritten by the next tree
        self.prefix_len = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
        last = self.prefix_len.long() - 1
        return logits[torch.arange(B), last].argmax(-1)  # [B]

    def draft(self, root: torch.Tensor):
        """Candidates [B, C] (tokens, scores, parents) by D+1 tree_expand calls."""
        B, K = root.shape[0], self.K
        logits = self.draft_table[root][:, None, :]  # [B, 1, V]
        child_tok, child_score, next_idx, next_score = tree_expand(logits, torch.zeros(B, 1), K)
        toks, scores = [child_tok.reshape(B, K)], [child_score.reshape(B, K)]
        parents = [torch.full((B, K), -1, dtype=torch.long)]
        offset, rows = 0, torch.arange(B)[:, None]
        for _ in range(self.D):
            # frontier = the K best of the previous level's children (flat indices into it)
            frontier_tok = toks[-1][rows, next_idx]  # [B, K]
            frontier_cand = offset + next_idx  # their candidate indices
            offset += toks[-1].shape[1]
            logits = self.draft_table[frontier_tok]  # [B, K, V]
            child_tok, child_score, next_idx, next_score = tree_expand(logits, next_score, K)
            toks.append(child_tok.reshape(B, K * K))
            scores.append(child_score.reshape(B, K * K))
            parents.append(frontier_cand.repeat_interleave(K, dim=1))
        return torch.cat(toks, 1), torch.cat(scores, 1), torch.cat(parents, 1)

    def step(self, root: torch.Tensor, active: torch.Tensor):
        """One draft-build-verify-accept-commit step for the batch.

        root: [B] int64, the last committed token of each sequence (its KV is not cached yet);
        active: [B] bool, sequences still generating (finished ones ride along and commit
        nothing: accept_len 0 makes kv_compact leave them alone).
        Returns (committed token lists, next root [B]).
        """
        cand_tok, cand_score, cand_parent = self.draft(root)
        tree = tree_build(cand_tok, cand_score, cand_parent, root, self.T)
        positions = self.prefix_len.long()[:, None] + tree.depth.long()  # [B, T]
        logits = self.target(tree.tokens, positions, self.cache, self.prefix_len, tree.mask)
        path, accept_len, bonus = verify_greedy(tree, logits)
        accept_len = torch.where(active, accept_len, torch.zeros_like(accept_len))
        kv_compact(self.cache, self.prefix_len, path, accept_len)
        committed = []
        for b in range(root.shape[0]):
            a = int(accept_len[b])
            nodes = path[b, 1:a]  # the root was committed last step
            committed.append(tree.tokens[b, nodes].tolist() + [int(bonus[b])] if a else [])
        self.prefix_len = self.prefix_len + accept_len.to(torch.int32)
        return committed, torch.where(active, bonus, root)

    def generate(self, prompts: list[list[int]], max_new_tokens: int):
        """Greedy speculative generation for the batch; returns (new tokens, tokens per step)."""
        root = self.prefill(prompts)
        out = [[int(r)] for r in root]
        per_step = []
        # static batch: step until every sequence has its tokens; a finished sequence stops
        # growing (the last step may overshoot by up to D tokens, which are dropped)
        while min(len(o) for o in out) < max_new_tokens:
            active = torch.tensor([len(o) < max_new_tokens for o in out])
            committed, root = self.step(root, active)
            for o, c in zip(out, committed):
                o.extend(c)
            per_step.append([len(c) if a else None for c, a in zip(committed, active.tolist())])
        return [o[:max_new_tokens] for o in out], per_step


def plain_greedy(target: ToyTarget, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Reference: recompute the whole sequence each token (no cache reuse, causal mask)."""
    seq = list(prompt)
    for _ in range(max_new_tokens):
        n = len(seq)
        cache = target.new_cache(1, n)
        logits = target(torch.tensor([seq]), torch.arange(n)[None], cache,
                        torch.zeros(1, dtype=torch.int32), causal_mask(1, n))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=3, help="sequences in the batch (>= 1)")
    parser.add_argument("--new-tokens", type=int, default=24, help="new tokens per sequence")
    parser.add_argument("--tree", default="10,3,3", help="T,D,K: tree nodes, depth, top-k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (tiny shapes gain nothing from more, and lose a "
                             "lot when the cores are busy)")
    args = parser.parse_args(argv)
    try:
        T, D, K = (int(x) for x in args.tree.split(","))
    except ValueError:
        parser.error(f"--tree must be three integers T,D,K, got {args.tree!r}")
    if args.batch < 1 or args.new_tokens < 1:
        parser.error("--batch and --new-tokens must be >= 1")

    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    target = ToyTarget(seed=args.seed).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    # prompts of different lengths: every sequence has its own prefix length
    prompts = [torch.randint(0, target.V, (5 + 3 * b,), generator=gen).tolist() for b in range(args.batch)]
    engine = SpecEngine(target, total_tokens=T, depth=D, top_k=K,
                        max_len=max(map(len, prompts)) + args.new_tokens + D + 1 + T)
    with torch.no_grad():
        start = time.perf_counter()
        outputs, per_step = engine.generate(prompts, args.new_tokens)
        elapsed = time.perf_counter() - start
        ok = True
        for b, (prompt, out) in enumerate(zip(prompts, outputs)):
            ref = plain_greedy(target, prompt, args.new_tokens)
            same = out == ref
            ok &= same
            lengths = [s[b] for s in per_step if s[b] is not None]
            print(f"seq {b}: prompt {len(prompt):2d} tokens, {len(out)} new, {len(lengths)} steps, "
                  f"tokens/step {sum(lengths) / len(lengths):.2f}, equals plain greedy: {same}")
    print(f"{len(per_step)} batched steps in {elapsed * 1e3:.0f} ms (tree T={T}, D={D}, K={K})")
    if not ok:
        print("MISMATCH: speculative output differs from plain greedy decoding", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
