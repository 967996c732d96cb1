"""The KV-store protocol: the dense and the paged cache are siblings that both satisfy it, and
a draft head runs the same over either."""

from __future__ import annotations

import pytest
import torch

from eagle2_kernels.cache import KVStore, KVView, PagedKVCache, StaticKVCache

# Layers, batch, KV heads, capacity, head dim: odd sizes, a capacity that is no multiple of
# the page size.
L, B, H, CAP, D = 2, 3, 2, 11, 4


def _stores():
    return (StaticKVCache(L, B, H, CAP, D, torch.float32, "cpu"),
            PagedKVCache(L, B, H, CAP, D, torch.float32, "cpu", block_size=4))


def test_both_caches_are_kv_stores_and_siblings():
    dense, paged = _stores()
    for store in (dense, paged):
        assert isinstance(store, KVStore) and isinstance(store, KVView)
    assert not issubclass(PagedKVCache, StaticKVCache) and not issubclass(StaticKVCache, PagedKVCache)
    assert not isinstance(paged, StaticKVCache)
    # Only the dense store has dense views; the paged one says where its KV lives.
    assert dense.keys(1).shape == (B, H, CAP, D)
    for name in ("kv", "keys", "values"):
        assert not hasattr(paged, name)
        with pytest.raises(AttributeError, match="pages .* block_table"):
            getattr(paged, name)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        paged.nothing

    class ForwardOnly:  # what a forward needs (write / attend / lengths), no round-level API
        lengths = torch.zeros(B, dtype=torch.int32)

        def write(self, layer, start, k, v):
            pass

        def attend(self, layer, q, tree_mask, tree_len, scale, backend=None, window=None, softcap=None,
                   sinks=None):
            pass

    assert isinstance(ForwardOnly(), KVView) and not isinstance(ForwardOnly(), KVStore)
    assert not isinstance(object(), KVView)


def test_shared_lengths_and_checks():
    for store in _stores():
        store.set_lengths([2, 5, 3])
        assert store.host_lengths == [2, 5, 3] and store.lengths.tolist() == [2, 5, 3]
        assert store.lengths.dtype == torch.int32
        store.set_length(4)
        assert store.host_lengths == [4, 4, 4] and store.lengths.tolist() == [4, 4, 4]
        store.set_lengths([1, 1, 1])
        assert store.host_lengths == [1, 1, 1] and store.lengths.tolist() == [1, 1, 1]
        assert store.num_layers == L and store.batch_size == B
    assert _stores()[0].capacity == CAP and _stores()[1].capacity == 12  # whole pages
    for cls, extra in ((StaticKVCache, {}), (PagedKVCache, {"block_size": 4})):
        with pytest.raises(ValueError, match=f"{cls.__name__}: capacity must be a positive int, got 0"):
            cls(L, B, H, 0, D, torch.float32, "cpu", **extra)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        PagedKVCache(L, B, H, CAP, D, torch.float32, "cpu", block_size=0)
    dense, paged = _stores()
    assert dense.matches(B, CAP, torch.float32, "cpu") and not dense.matches(B, CAP, torch.float32, "cpu", 4)
    assert paged.matches(B, CAP, torch.float32, "cpu", 4) and not paged.matches(B, CAP, torch.float32, "cpu")


def test_write_attend_compact_agree_across_stores():
    dense, paged = _stores()
    g = torch.Generator().manual_seed(3)
    prefix = [3, 5, 4]
    for layer in range(L):
        for store in (dense, paged):
            store.set_length(0)
        k, v = torch.randn(B, H, 6, D, generator=g), torch.randn(B, H, 6, D, generator=g)
        for store in (dense, paged):
            store.write(layer, 0, k, v)
            store.set_lengths(prefix)
    # Three tree rows after each prefix: a root and two children.
    t = 3
    k, v = torch.randn(B, H, t, D, generator=g), torch.randn(B, H, t, D, generator=g)
    q = torch.randn(B, 2 * H, t, D, generator=g)
    mask = torch.tensor([[1], [3], [5]], dtype=torch.int32).expand(B, t, 1).contiguous()
    outs = []
    for store in (dense, paged):
        store.write(1, prefix, k, v)
        outs.append(store.attend(1, q, mask, t, D ** -0.5, backend="reference"))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    path = torch.tensor([[0, 2, -1], [0, 1, -1], [0, -1, -1]])
    alen = torch.tensor([2, 2, 1])
    for store in (dense, paged):
        store.compact(path, alen, backend="reference")
        store.set_lengths([p + int(a) for p, a in zip(prefix, alen)])
    # After the commit both stores answer a query over the new prefix alike.
    q1 = torch.randn(B, 2 * H, 1, D, generator=g)
    one = torch.ones(B, 1, 1, dtype=torch.int32)
    got = [store.attend(layer, q1, one, 0, D ** -0.5, backend="reference") for store in (dense, paged)
           for layer in range(L)]
    for a, b in zip(got[:L], got[L:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
def test_a_head_runs_the_same_over_a_paged_store(kind):
    pytest.importorskip("transformers")
    from eagle3_models import deep_target
    from eagle2_kernels.models.draft_head import EagleDraftHead
    from eagle2_kernels.models.eagle3_head import Eagle3DraftHead

    model = deep_target("llama")
    head = EagleDraftHead.from_target(model) if kind == "eagle2" else Eagle3DraftHead.from_target(model)
    feats, ids = torch.randn(2, 7, head.target_feature_size), torch.randint(0, 320, (2, 7))
    outs = []
    for store in (StaticKVCache(1, 2, head.num_kv_heads, 16, head.head_dim, torch.float32, "cpu"),
                  PagedKVCache(1, 2, head.num_kv_heads, 16, head.head_dim, torch.float32, "cpu", block_size=3)):
        with torch.no_grad():
            first = head.prefill(feats[:, :4], ids[:, :4], store)
            store.set_length(4)
            chain = torch.tensor([[1], [3], [7]], dtype=torch.int32).expand(2, 3, 1).contiguous()
            rest = head.tree_step(feats[:, 4:], ids[:, 4:], torch.arange(4, 7).expand(2, 3), store, 4, chain, 3,
                                  backend="reference", from_target=True)
        outs.append(torch.cat([first, rest], 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(outs[0], head(feats, ids), rtol=1e-5, atol=1e-5)
