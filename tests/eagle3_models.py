"""Tiny targets and EAGLE-3 heads shared by the EAGLE-3 tests.

EAGLE-3 heads read target layers 2, L//2, L-3, so their targets have 8 layers (real models:
28-80 layers, hidden 2-8k); otherwise the shapes of tiny_models.py (hidden 64, 4 query / 2 KV
heads). Every builder seeds itself, so a test sees the same weights whatever runs before it.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from eagle2_kernels import TreeSpecDecoder
from tiny_models import DECODER_VOCABS, NO_SPECIAL_TOKENS, tiny_model


def decoder(model, head, T, D, K, **kw):
    """A TreeSpecDecoder with exactly the tree (T, D, K) every round (an adaptive tree-size
    policy, where the decoder has one, is switched off)."""
    if "adaptive" in inspect.signature(TreeSpecDecoder.__init__).parameters:
        kw = {**kw, "adaptive": False}
    return TreeSpecDecoder(model, head, total_tokens=T, depth=D, top_k=K, **kw)


EAGLE3_LAYERS = 8


@functools.lru_cache(maxsize=None)
def deep_target(arch: str, peaked: bool = False):
    """tiny_target(arch) with EAGLE3_LAYERS layers (seed 4321); ``peaked`` as tiny_target."""
    torch.manual_seed(4321)
    model = tiny_model(arch, vocab_size=DECODER_VOCABS[arch], intermediate_size=128,
                       num_hidden_layers=EAGLE3_LAYERS, max_position_embeddings=512, **NO_SPECIAL_TOKENS)
    if peaked:
        with torch.no_grad():
            model.lm_head.weight.mul_(40.0)
    return model


def reduced_vocab(vocab: int, size: int, seed: int = 5) -> torch.Tensor:
    """A random reduced draft vocabulary: ``size`` distinct target ids, not sorted."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab, generator=g)[:size]


def random_eagle3_head(model, variant: str, seed: int = 99):
    """An untrained EAGLE-3 head for ``model``: variant "full" (draft vocab = the target's),
    "reduced" (a quarter of it, d2t map) or "narrow" (hidden 48 != the target's 64, its own
    embedding; reduced vocabulary too)."""
    from eagle2_kernels.models.eagle3_head import Eagle3DraftHead

    vocab = model.config.vocab_size
    torch.manual_seed(seed)
    if variant == "full":
        return Eagle3DraftHead.from_target(model)
    if variant == "reduced":
        return Eagle3DraftHead.from_target(model, draft_to_target=reduced_vocab(vocab, vocab // 4))
    if variant == "narrow":
        return Eagle3DraftHead.from_target(model, draft_to_target=reduced_vocab(vocab, vocab // 2),
                                           hidden_size=48, intermediate_size=80)
    raise ValueError(f"unknown variant {variant!r}; valid: full, reduced, narrow")


@functools.lru_cache(maxsize=None)
def eagle3_trained_setup():
    """A peaked 8-layer tiny Llama and an EAGLE-3 head (reduced vocabulary of the 160 most
    frequent tokens) trained for a few seconds on the target's greedy continuations with a
    3-step training-time test. Returns (model, head, prompts [8, 6] int64)."""
    from eagle2_kernels.models.eagle3_head import Eagle3DraftHead
    from eagle2_kernels.models.target import DecodeContext, TargetAdapter
    from eagle2_kernels.train.rollout import rollout

    model = deep_target("llama", peaked=True)
    torch.manual_seed(7)
    prompts = torch.randint(0, model.config.vocab_size, (8, 6))
    with torch.no_grad():
        seqs = model.generate(prompts, max_new_tokens=48, do_sample=False)
    counts = torch.bincount(seqs.flatten(), minlength=model.config.vocab_size)
    d2t = counts.argsort(descending=True, stable=True)[:160]
    torch.manual_seed(0)
    head = Eagle3DraftHead.from_target(model, draft_to_target=d2t)
    adapter = TargetAdapter(model, feature_layers=head.feature_layers)
    b, n = seqs.shape
    cache = adapter.new_cache(b, n)
    logits, feats = adapter.forward(seqs, torch.arange(n).expand(b, n), DecodeContext(cache, 0, None, n))
    # Draft-vocabulary targets: the target's greedy token where it lies in the draft vocabulary.
    t2d = torch.full((model.config.vocab_size,), -1, dtype=torch.int64)
    t2d[d2t] = torch.arange(d2t.numel())
    labels = t2d[logits.argmax(-1)]  # [B, N]: label of the token after position t
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(150):
        outs = rollout(head, feats, seqs, steps=3)
        loss = 0.0
        for j, pred in enumerate(outs, start=1):
            k = n - j  # index i predicts the token after position i + j
            lab = labels[:, j:j + k]
            loss = loss + 0.8 ** (j - 1) * F.cross_entropy(
                head.logits(pred[:, :k]).reshape(-1, d2t.numel()), lab.reshape(-1), ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return model, head, prompts
