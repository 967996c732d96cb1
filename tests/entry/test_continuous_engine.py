"""The continuous-batching engine (examples/continuous_engine.py): staggered arrivals, ragged
prompts, requests finishing at different times over a paged pool, each request's output equal
to its own plain greedy decoding (transformers generate) in float32, token for token."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import hf_greedy, one_thread, trained_setup  # noqa: F401  (one_thread: autouse)
from tolerances import EXACT

ENGINE = Path(__file__).resolve().parents[2] / "examples" / "continuous_engine.py"


def _engine_module():
    spec = importlib.util.spec_from_file_location("example_continuous_engine", ENGINE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ce = _engine_module()


def _workload(prompts: torch.Tensor):
    """(prompt, max_new_tokens, arrival step) for 6 requests of lengths 3..12 arriving at steps
    0, 0, 1, 2, 4, 7: short and long budgets, so requests finish at different times."""
    p = prompts.tolist()
    return [
        (p[0], 30, 0),
        (p[1][:3], 12, 0),
        (p[2] + p[3], 24, 1),  # 12 tokens: longer than a 4-slot block many times over
        (p[4][:5], 5, 2),
        (p[5], 40, 4),
        (p[6][:4], 17, 7),
    ]


def _drive(eng, work):
    """Add each request at its arrival step, step until idle; returns {rid: (prompt, n)}."""
    ids, step = {}, 0
    pending = sorted(work, key=lambda w: w[2])
    while pending or eng.has_work():
        while pending and pending[0][2] <= step:
            prompt, n, _ = pending.pop(0)
            ids[eng.add_request(prompt, n)] = (prompt, n)
        eng.step()
        step += 1
    return ids


def _check_exact(model, eng, ids):
    for rid, (prompt, n) in ids.items():
        ref = hf_greedy(model, torch.tensor([prompt]), n)[0, len(prompt):].tolist()
        assert eng.requests[rid].output == ref, f"request {rid} (prompt {len(prompt)}, {n} new)"


@pytest.mark.parametrize(
    "T, D, K, block_size, commit",
    [
        pytest.param(10, 3, 3, 4, "compact", id="T10-D3-K3-bs4"),
        pytest.param(16, 4, 4, 1, "compact", id="T16-D4-K4-bs1"),  # pages of one token
        pytest.param(7, 5, 1, 16, "compact", id="T7-D5-K1-chain-bs16"),
        pytest.param(40, 5, 4, 8, "compact", id="T40-D5-K4-bs8"),  # two mask words
        # SGLang's way: token slots remapped, nothing moved (D*K = 16 > T: draft-only slots kept)
        pytest.param(10, 4, 4, 1, "remap", id="T10-D4-K4-bs1-remap"),
        pytest.param(7, 5, 1, 1, "remap", id="T7-D5-K1-chain-bs1-remap"),
    ],
)
def test_staggered_requests_equal_plain_greedy(T, D, K, block_size, commit):
    model, head, prompts = trained_setup("llama")
    eng = ce.ContinuousEngine(model, head, total_tokens=T, depth=D, top_k=K, block_size=block_size,
                              max_batch=3, max_model_len=96, commit=commit)
    ids = _drive(eng, _workload(prompts))
    _check_exact(model, eng, ids)
    st = eng.stats
    # continuous batching really happened: full rounds, newcomers prefilled while others decoded,
    # a queue (6 requests, 3 rows), requests leaving at different steps
    assert max(st.batch_sizes) == 3 and st.mixed_steps >= 1 and st.prefills >= 3
    assert any(r.admitted_step > 1 for r in eng.requests.values())
    assert len({r.finished_step for r in eng.requests.values()}) >= 4
    # drafted tokens were accepted (the trained head on its own prompts)
    lengths = [a for r in eng.requests.values() for a in r.accept_lengths]
    assert max(lengths) >= 3 and sum(lengths) / len(lengths) > 1.5
    # every block came back
    assert eng.pool.free_blocks == eng.pool.capacity and eng.pool.reserved == 0 and not eng.running


def test_small_pool_queues_and_reuses_blocks():
    """A pool that fits only two requests' worst case: the rest wait for blocks, and freed
    blocks are handed to later requests."""
    model, head, prompts = trained_setup("llama")
    T, D, K, bs = 10, 3, 3, 4
    per_request = -(-(12 + 40 + max(T, D * K)) // bs)  # the largest request's reservation
    eng = ce.ContinuousEngine(model, head, total_tokens=T, depth=D, top_k=K, block_size=bs,
                              num_blocks=1 + 2 * per_request, max_batch=8, max_model_len=96)
    users: dict[int, set] = {}
    ids, step = {}, 0
    work = sorted(_workload(prompts), key=lambda w: w[2])
    while work or eng.has_work():
        while work and work[0][2] <= step:
            prompt, n, _ = work.pop(0)
            ids[eng.add_request(prompt, n)] = (prompt, n)
        eng.step()
        assert eng.pool.reserved <= eng.pool.capacity
        for r in eng.running:
            for blk in r.blocks:
                users.setdefault(blk, set()).add(r.rid)
        step += 1
    _check_exact(model, eng, ids)
    assert max(eng.stats.batch_sizes) < len(ids)  # not everyone fit at once
    assert any(len(u) > 1 for u in users.values())  # a block served two requests over time
    assert eng.pool.free_blocks == eng.pool.capacity and eng.pool.reserved == 0


def test_eos_stops_each_request_on_its_own():
    model, head, prompts = trained_setup("llama")
    p = prompts.tolist()
    work = [(p[0], 30), (p[1], 30), (p[2][:4], 30)]
    refs = [hf_greedy(model, torch.tensor([q]), n)[0, len(q):].tolist() for q, n in work]
    eos = refs[0][6]  # request 0 stops at its 7th token; the others stop wherever eos first appears
    eng = ce.ContinuousEngine(model, head, total_tokens=10, depth=3, top_k=3, block_size=4, max_batch=4,
                              max_model_len=96)
    rids = [eng.add_request(q, n, eos_token_id=eos) for q, n in work]
    eng.run()
    for rid, ref in zip(rids, refs):
        want = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert eng.requests[rid].output == want
    assert len(eng.requests[rids[0]].output) == 7
    assert eng.pool.free_blocks == eng.pool.capacity


def test_model_untouched_outside_engine_forwards():
    model, head, prompts = trained_setup("llama")
    ids = prompts[:1]
    impl = model.config._attn_implementation
    with torch.no_grad():
        before = model(ids).logits
    eng = ce.ContinuousEngine(model, head, total_tokens=10, depth=3, top_k=3, block_size=4, max_model_len=64)
    eng.add_request(ids[0], 6)
    eng.step()
    with torch.no_grad():
        mid = model(ids).logits  # between two engine steps
    eng.run()
    assert model.config._attn_implementation == impl
    torch.testing.assert_close(mid, before, **EXACT)


def test_add_request_rejects_bad_input():
    model, head, _ = trained_setup("llama")
    eng = ce.ContinuousEngine(model, head, total_tokens=10, depth=3, top_k=3, block_size=4, max_model_len=32)
    with pytest.raises(ValueError, match="non-empty prompt"):
        eng.add_request([], 4)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request([1, 2, 3], 30)
    with pytest.raises(ValueError, match="1-D"):
        eng.add_request(torch.zeros(1, 3, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="candidates"):
        ce.ContinuousEngine(model, head, total_tokens=30, depth=1, top_k=2)
    with pytest.raises(ValueError, match="block_size=1"):
        ce.ContinuousEngine(model, head, total_tokens=10, depth=3, top_k=3, block_size=4, commit="remap")


def test_block_pool_and_page_writes():
    pool = ce.BlockPool(5, 2)
    assert pool.capacity == 4 and pool.can_reserve(4) and not pool.can_reserve(5)
    got = [pool.alloc() for _ in range(4)]
    assert sorted(got) == [1, 2, 3, 4]  # the scratch page 0 is never handed out
    pool.free(got[:2])
    assert pool.free_blocks == 2
    # a write through the block table lands at page table[pos // bs], slot pos % bs
    k_pages = torch.zeros(5, 2, 1, 1)
    v_pages = torch.zeros(5, 2, 1, 1)
    table = torch.tensor([[3, 1, 4]], dtype=torch.int32)
    k = torch.arange(1.0, 5.0).view(1, 1, 4, 1)  # positions 1..4
    ce.write_pages(k_pages, v_pages, table, torch.tensor([1]), k, -k)
    assert k_pages.flatten().tolist() == [0, 0, 2, 3, 0, 0, 0, 1, 4, 0]
    assert v_pages.flatten().tolist() == [0, 0, -2, -3, 0, 0, 0, -1, -4, 0]


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_equal_plain_greedy(arch):
    """Qwen2 (q/k/v biases) and Mistral targets through the same paged attention function."""
    model, head, prompts = trained_setup(arch)
    eng = ce.ContinuousEngine(model, head, total_tokens=12, depth=3, top_k=4, block_size=4, max_batch=4,
                              max_model_len=96)
    ids = _drive(eng, _workload(prompts)[:4])
    _check_exact(model, eng, ids)
    assert eng.pool.free_blocks == eng.pool.capacity


def test_self_check_script_passes(capsys):
    assert ce.main(["--requests", "3", "--max-batch", "2"]) == 0
    assert capsys.readouterr().out.count("equals HF greedy: True") == 3


def test_remap_commit_moves_no_kv(monkeypatch):
    """commit='remap': the round never calls kv_compact_paged; rejected tree slots return to
    the pool while their request still runs."""
    model, head, prompts = trained_setup("llama")

    def no_compaction(*args, **kwargs):
        raise AssertionError("kv_compact_paged called in remap mode")

    monkeypatch.setattr(ce, "kv_compact_paged", no_compaction)
    eng = ce.ContinuousEngine(model, head, total_tokens=12, depth=3, top_k=4, block_size=1, max_batch=2,
                              max_model_len=96, commit="remap")
    rid = eng.add_request(prompts[0].tolist(), 30)
    frees = []  # (was the request still running, slots handed back)
    pool_free = eng.pool.free
    eng.pool.free = lambda slots: (frees.append((not eng.requests[rid].done, list(slots))), pool_free(slots))
    while eng.has_work():
        eng.step()
        r = eng.requests[rid]
        if not r.done:
            # the committed positions map to distinct slots, none of them the scratch page
            assert len(set(r.blocks[: r.prefix])) == r.prefix and ce.SCRATCH_BLOCK not in r.blocks
    freed_early = any(running and slots for running, slots in frees)
    assert freed_early
    _check_exact(model, eng, {rid: (prompts[0].tolist(), 30)})
    assert eng.pool.free_blocks == eng.pool.capacity
