"""remap_slots: exact against a list-based model of a token-slot pool; the remapped table reads
the same KV as kv_compact_paged's moved pool; fresh outputs poisoned so unwritten entries fail."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import requires_triton, triton_device
from eagle2_kernels.ops.remap_slots.reference import remap_slots as ref_remap

import eagle2_kernels.ops as ops


def model(table: list[list[int]], prefixes, paths, accepts, tree_len):
    """(new table, accepted, free, num_free) with lists: the page-size-1 commit, slot by slot."""
    new = [row[:] for row in table]
    accepted, free, num_free = [], [], []
    T = len(paths[0])
    for b, row in enumerate(table):
        P, a = prefixes[b], accepts[b]
        nodes = paths[b][:a]
        acc = [row[P + n] for n in nodes]
        fr = [row[P + n] for n in range(tree_len) if n not in nodes]
        for j, s in enumerate(acc):
            new[b][P + j] = s
        accepted.append(acc + [-1] * (T - a))
        free.append(fr + [-1] * (tree_len - len(fr)))
        num_free.append(len(fr))
    return new, accepted, free, num_free


def make_case(B, T, tree_len, rng, max_context=None, dtype=torch.int32, shuffle_path=False):
    """Distinct slot ids per position (a random pool permutation), random prefixes, paths."""
    prefixes = [rng.randrange(0, 30) for _ in range(B)]
    max_context = max_context or max(prefixes) + tree_len + rng.randrange(0, 5)
    slots = list(range(B * max_context * 2))
    rng.shuffle(slots)
    table = [[slots.pop() for _ in range(max_context)] for _ in range(B)]
    accepts = [rng.randrange(0, min(T, tree_len) + 1) for _ in range(B)]
    paths = []
    for a in accepts:
        nodes = [0] + sorted(rng.sample(range(1, tree_len), a - 1)) if a else []
        if shuffle_path and len(nodes) > 1:
            rest = nodes[1:]
            rng.shuffle(rest)
            nodes = [0] + rest
        paths.append(nodes + [-1] * (T - len(nodes)))
    t = dict(req_to_token=torch.tensor(table, dtype=dtype), prefix_len=torch.tensor(prefixes),
             path=torch.tensor(paths), accept_len=torch.tensor(accepts))
    return t, (table, prefixes, paths, accepts)


def check(out, table_after, want, dtype):
    new, acc, free, nf = want
    a, f, n = out
    assert a.dtype == dtype and f.dtype == dtype and n.dtype == torch.int64
    assert a.tolist() == acc and f.tolist() == free and n.tolist() == nf
    assert table_after.tolist() == new


# ----------------------------------------------------------------------------- reference


def test_reference_by_hand():
    table = torch.tensor([[40, 41, 42, 50, 51, 52, 53, -1]], dtype=torch.int32)
    acc, free, n = ref_remap(table, torch.tensor([3]), torch.tensor([[0, 2, 3, -1]]),
                             torch.tensor([3]), 4)
    assert acc.tolist() == [[50, 52, 53, -1]] and free.tolist() == [[51, -1, -1, -1]]
    assert n.tolist() == [1] and table.tolist() == [[40, 41, 42, 50, 52, 53, 53, -1]]


@pytest.mark.parametrize(
    "B, T, tree_len, shuffle",
    [
        pytest.param(1, 1, 1, False, id="one-node"),
        pytest.param(3, 7, 7, False, id="B3-T7"),
        pytest.param(2, 4, 13, False, id="path-shorter-than-tree"),
        pytest.param(4, 60, 60, True, id="B4-T60-unsorted-path"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_reference_matches_model(B, T, tree_len, shuffle, dtype):
    rng = random.Random(B * 100 + T)
    for _ in range(3):
        t, lists = make_case(B, T, tree_len, rng, dtype=dtype, shuffle_path=shuffle)
        want = model(*lists, tree_len)
        out = ref_remap(**t, tree_len=tree_len)
        check(out, t["req_to_token"], want, dtype)


def test_update_false_leaves_the_table():
    rng = random.Random(3)
    t, lists = make_case(2, 6, 6, rng)
    before = t["req_to_token"].clone()
    for backend in ["reference"] + (["triton"] if _triton_here() else []):
        a, f, n = ops.remap_slots(**t, update=False, backend=backend)
        assert torch.equal(t["req_to_token"], before)
        want = model(*lists, 6)
        assert a.tolist() == want[1] and f.tolist() == want[2] and n.tolist() == want[3]


def test_reference_rejects_bad_paths():
    table = torch.arange(10, dtype=torch.int32)[None]
    with pytest.raises(ValueError, match="outside"):
        ref_remap(table, torch.tensor([2]), torch.tensor([[0, 5]]), torch.tensor([2]), 4)
    with pytest.raises(ValueError, match="repeats"):
        ref_remap(table, torch.tensor([2]), torch.tensor([[0, 0]]), torch.tensor([2]), 4)
    with pytest.raises(ValueError, match="passes"):
        ref_remap(table, torch.tensor([8]), torch.tensor([[0, 1]]), torch.tensor([2]), 4)
    with pytest.raises(ValueError, match="accept_len"):
        ref_remap(table, torch.tensor([0]), torch.tensor([[0, 1]]), torch.tensor([3]), 4)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        pytest.param(dict(req_to_token=torch.zeros(1, 8)), TypeError, "req_to_token", id="table-float"),
        pytest.param(dict(req_to_token=torch.zeros(2, 8, dtype=torch.int32)), ValueError, "req_to_token",
                     id="table-batch"),
        pytest.param(dict(path=torch.zeros(1, 3)), TypeError, "path", id="path-float"),
        pytest.param(dict(prefix_len=torch.zeros(2, dtype=torch.int64)), ValueError, "prefix_len",
                     id="prefix-shape"),
        pytest.param(dict(accept_len=torch.zeros(1, dtype=torch.int16)), TypeError, "accept_len",
                     id="accept-int16"),
        pytest.param(dict(tree_len=9), ValueError, "tree_len", id="tree-len-too-big"),
        pytest.param(dict(tree_len=2.0), TypeError, "tree_len", id="tree-len-float"),
        pytest.param(dict(update=1), TypeError, "update", id="update-int"),
    ],
)
def test_public_input_checks(args, exc, match):
    kw = dict(req_to_token=torch.arange(8, dtype=torch.int32)[None], prefix_len=torch.tensor([2]),
              path=torch.tensor([[0, 1, -1]]), accept_len=torch.tensor([2]))
    kw.update(args)
    with pytest.raises(exc, match=match):
        ops.remap_slots(**kw, backend="reference")


def test_remapped_table_reads_what_kv_compact_paged_moves():
    # Page size 1: remapping slot ids and moving the KV give the same logical cache.
    rng = random.Random(5)
    B, T = 3, 9
    t, (table, prefixes, paths, accepts) = make_case(B, T, T, rng)
    num_slots = B * t["req_to_token"].shape[1] * 2
    pool = torch.randn(4, num_slots, 1, 2, 8)
    moved = pool.clone()
    ops.kv_compact_paged(moved, t["req_to_token"], t["prefix_len"], t["path"], t["accept_len"],
                         backend="reference")
    ops.remap_slots(**t, backend="reference")
    for b in range(B):
        n = prefixes[b] + accepts[b]
        via_table = pool[:, t["req_to_token"][b, :n].long()]
        via_moves = moved[:, torch.tensor(table[b][:n])]
        assert torch.equal(via_table, via_moves)


def test_torch_op_registration():
    import eagle2_kernels  # noqa: F401  (registers the ops)

    rng = random.Random(4)
    t, _ = make_case(2, 5, 7, rng)
    op = torch.ops.eagle2.remap_slots
    rest = (t["prefix_len"], t["path"], t["accept_len"])
    torch.library.opcheck(op.default, (t["req_to_token"].clone(), *rest), {"tree_len": 7})
    a, b = t["req_to_token"].clone(), t["req_to_token"].clone()
    for got, want in zip(op(a, *rest, 7), ops.remap_slots(b, *rest, 7)):
        assert torch.equal(got, want)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- triton


def _triton_here() -> bool:
    from conftest import triton_runs_here

    return triton_runs_here()


def _poisoned_empty(orig):
    def empty(*args, **kwargs):
        t = orig(*args, **kwargs)
        return t.fill_(7777) if not t.is_floating_point() else t.fill_(float("nan"))
    return empty


@requires_triton
@pytest.mark.parametrize(
    "B, T, tree_len, shuffle",
    [
        pytest.param(1, 1, 1, False, id="one-node"),
        pytest.param(3, 7, 7, False, id="B3-T7"),
        pytest.param(2, 4, 13, False, id="path-shorter-than-tree"),
        pytest.param(4, 60, 60, True, id="B4-T60-unsorted-path"),
        pytest.param(2, 33, 70, False, id="T33-tree70"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_triton_matches_model_with_poisoned_outputs(B, T, tree_len, shuffle, dtype, monkeypatch):
    rng = random.Random(B * 100 + T + 1)
    dev = triton_device()
    monkeypatch.setattr(torch, "empty", _poisoned_empty(torch.empty))
    for _ in range(2):
        t, lists = make_case(B, T, tree_len, rng, dtype=dtype, shuffle_path=shuffle)
        want = model(*lists, tree_len)
        args = {k: v.to(dev) for k, v in t.items()}
        out = ops.remap_slots(**args, tree_len=tree_len, backend="triton")
        check([x.cpu() for x in out], args["req_to_token"].cpu(), want, dtype)


@requires_triton
def test_triton_strided_table_and_int32_indices():
    # req_to_token rows as a column-major view (stride_l != 1) with an offset into a big table.
    rng = random.Random(9)
    dev = triton_device()
    t, lists = make_case(3, 8, 8, rng, max_context=40)
    big = torch.zeros(5, 50, dtype=torch.int32)
    big[1:4, 5:45] = t["req_to_token"]
    view = big.t().contiguous().t()[1:4, 5:45]
    assert view.stride() == (1, 5)
    args = dict(prefix_len=t["prefix_len"].int(), path=t["path"].int(),
                accept_len=t["accept_len"].int())
    view = view.to(dev)
    out = ops.remap_slots(view, **{k: v.to(dev) for k, v in args.items()}, backend="triton")
    check([x.cpu() for x in out], view.cpu(), model(*lists, 8), torch.int32)


@requires_triton
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU tensors go to the interpreter only without a GPU test run")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.remap_slots(torch.arange(4)[None], torch.tensor([0]), torch.tensor([[0]]),
                        torch.tensor([1]), backend="triton")


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.cuda
def test_cuda_batch64_no_sync_and_graph():
    rng = random.Random(1)
    t, lists = make_case(64, 60, 60, rng, max_context=4096)
    want = model(*lists, 60)
    args = {k: v.cuda() for k, v in t.items()}
    before = args["req_to_token"].clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ops.remap_slots(**args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check([x.cpu() for x in out], args["req_to_token"].cpu(), want, torch.int32)
    args["req_to_token"].copy_(before)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.remap_slots(**args)
    args["req_to_token"].copy_(before)
    graph.replay()
    torch.cuda.synchronize()
    check([x.cpu() for x in out], args["req_to_token"].cpu(), want, torch.int32)
