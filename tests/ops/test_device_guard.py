"""The CUDA device guard: every public op and every graph capture runs on its input's device.

Triton launches, ``torch.cuda.Stream()`` and ``torch.cuda.current_stream()`` use the *current*
device, which need not be the input's (a target on ``cuda:1`` while ``cuda:0`` is current). On
CPU the guard logic is checked with fake ``cuda:1`` tensors (``FakeTensorMode``: shapes and
devices without a GPU) and a recording stand-in for ``torch.cuda.device``; the cuda-marked test
runs the ops and a captured decoder on a non-default GPU where more than one exists.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from eagle2_kernels import _backend, ops
from eagle2_kernels._backend import device_guard
from eagle2_kernels.ops._dispatch import backend_module
from eagle2_kernels.ops.tree import DraftTree

CUDA1 = torch.device("cuda", 1)


class GuardRecorder:
    """Stands in for ``torch.cuda.device``: records which devices were entered and keeps the
    stack of the guards now open (``current`` is the innermost one's device)."""

    def __init__(self):
        self.entered: list[torch.device] = []
        self.stack: list[torch.device] = []

    @property
    def current(self):
        return self.stack[-1] if self.stack else None

    @contextlib.contextmanager
    def __call__(self, device):
        self.entered.append(torch.device(device))
        self.stack.append(torch.device(device))
        try:
            yield
        finally:
            self.stack.pop()


@pytest.fixture
def recorder(monkeypatch):
    rec = GuardRecorder()
    monkeypatch.setattr(torch.cuda, "device", rec)
    return rec


# ---------------------------------------------------------------------- the helper
def test_cpu_pays_no_guard(monkeypatch):
    def no_cuda(device):
        raise AssertionError("torch.cuda.device was called for a CPU input")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    x = torch.ones(2)
    assert device_guard(x) is device_guard(torch.device("cpu"))  # one shared no-op context
    with device_guard(x), device_guard(x):  # reentrant
        pass


def test_cuda_input_enters_its_device(recorder):
    with device_guard(CUDA1):
        assert recorder.current == CUDA1
    with FakeTensorMode():
        x = torch.empty(3, device=CUDA1)
    with device_guard(x):
        assert recorder.current == CUDA1
    assert recorder.entered == [CUDA1, CUDA1] and recorder.current is None


# ---------------------------------------------------------------------- every public op
def _fake_cuda_calls():
    """(op name, call) for each public op, on fake cuda:1 tensors of small valid shapes."""
    d = CUDA1
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    tree = DraftTree(tokens=torch.zeros(1, 3, dtype=i64, device=d),
                     parents=torch.zeros(1, 3, dtype=i32, device=d),
                     depth=torch.zeros(1, 3, dtype=i32, device=d),
                     mask=torch.zeros(1, 3, 1, dtype=i32, device=d))
    logits = torch.zeros(1, 3, 8, dtype=f32, device=d)
    return [
        ("tree_expand", lambda b: ops.tree_expand(
            torch.zeros(1, 2, 8, dtype=f32, device=d), torch.zeros(1, 2, dtype=f32, device=d), 2,
            backend=b)),
        ("tree_build", lambda b: ops.tree_build(
            torch.zeros(1, 4, dtype=i64, device=d), torch.zeros(1, 4, dtype=f32, device=d),
            torch.full((1, 4), -1, dtype=i64, device=d), torch.zeros(1, dtype=i64, device=d), 3,
            backend=b, error_flag=torch.zeros(1, dtype=i32, device=d))),
        ("tree_attention", lambda b: ops.tree_attention(
            torch.zeros(1, 2, 3, 16, dtype=f32, device=d), torch.zeros(1, 1, 8, 16, dtype=f32, device=d),
            torch.zeros(1, 1, 8, 16, dtype=f32, device=d), torch.zeros(1, dtype=i32, device=d),
            torch.zeros(1, 3, 1, dtype=i32, device=d), 3, backend=b)),
        ("verify_greedy", lambda b: ops.verify_greedy(tree, logits, backend=b)),
        ("verify_sample", lambda b: ops.verify_sample(
            tree, logits, torch.zeros(1, 3, dtype=f32, device=d), 1.0, backend=b)),
        ("kv_compact", lambda b: ops.kv_compact(
            torch.zeros(2, 1, 1, 8, 4, dtype=f32, device=d), torch.zeros(1, dtype=i64, device=d),
            torch.zeros(1, 3, dtype=i64, device=d), torch.ones(1, dtype=i64, device=d), backend=b)),
        # The paged ops: pools of 4 pages of 4 slots, one sequence over 2 pages.
        ("tree_attention_paged", lambda b: ops.tree_attention_paged(
            torch.zeros(1, 2, 3, 16, dtype=f32, device=d), torch.zeros(4, 4, 1, 16, dtype=f32, device=d),
            torch.zeros(4, 4, 1, 16, dtype=f32, device=d), torch.zeros(1, 2, dtype=i32, device=d),
            torch.zeros(1, dtype=i32, device=d), torch.zeros(1, 3, 1, dtype=i32, device=d), 3, backend=b)),
        ("kv_compact_paged", lambda b: ops.kv_compact_paged(
            torch.zeros(2, 4, 4, 1, 4, dtype=f32, device=d), torch.zeros(1, 2, dtype=i32, device=d),
            torch.zeros(1, dtype=i64, device=d), torch.zeros(1, 3, dtype=i64, device=d),
            torch.ones(1, dtype=i64, device=d), backend=b)),
        ("remap_slots", lambda b: ops.remap_slots(
            torch.zeros(1, 8, dtype=i32, device=d), torch.zeros(1, dtype=i64, device=d),
            torch.zeros(1, 3, dtype=i64, device=d), torch.ones(1, dtype=i64, device=d), backend=b)),
    ]


def _implementation(op: str, backend: str) -> tuple[object, str]:
    """(module, attribute) holding the function the public op calls for ``backend``."""
    return backend_module(op, backend), op


def _backend_params():
    def has_triton():
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True

    return [
        pytest.param("triton", id="triton", marks=pytest.mark.skipif(not has_triton(), reason="no triton")),
        pytest.param("ext", id="ext", marks=pytest.mark.skipif(not _backend.ext_available(),
                                                                reason="native extension not built")),
        pytest.param("reference", id="reference"),
    ]


@pytest.mark.parametrize("backend", _backend_params())
def test_every_public_op_runs_its_implementation_under_the_guard(recorder, monkeypatch, backend):
    # The implementations are stubbed (fake tensors have no data); each stub checks that it
    # runs inside torch.cuda.device(cuda:1).
    seen = {}
    with FakeTensorMode():
        cases = _fake_cuda_calls()
        for op, call in cases:
            module, attr = _implementation(op, backend)

            def stub(*args, _op=op, **kwargs):
                seen[_op] = recorder.current
                return "impl-result"

            monkeypatch.setattr(module, attr, stub)
            out = call(backend)
            assert recorder.current is None, op  # the guard was left
            if op in ("kv_compact", "kv_compact_paged"):
                assert out is not None  # the cache
            else:
                assert out == "impl-result", op
    assert seen == {op: CUDA1 for op, _ in cases}
    assert recorder.entered == [CUDA1] * len(cases)  # once per op call


def test_every_public_op_has_a_guard_case():
    with FakeTensorMode():
        covered = {op for op, _ in _fake_cuda_calls()}
    # The ops are the public functions (DraftTree is a dataclass, tree_formats a module of
    # host-side converters).
    public = {name for name in ops.__all__ if inspect.isfunction(getattr(ops, name))}
    # ngram_lookup is plain torch on its input's device (no kernel launch, no dispatch table:
    # the decoder keeps the context on the host), so there is no current device to guard.
    public -= {"ngram_lookup"}
    assert public <= covered, (
        f"public ops without a device-guard case: {sorted(public - covered)}; wrap their dispatch "
        f"in _backend.device_guard and add a call to _fake_cuda_calls"
    )


def test_cpu_ops_never_touch_torch_cuda(monkeypatch):
    def no_cuda(device):
        raise AssertionError("torch.cuda.device was called for a CPU op")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    logits = torch.randn(1, 1, 16)
    toks, scores, idx, nxt = ops.tree_expand(logits, torch.zeros(1, 1), 3)
    tree = ops.tree_build(toks[:, 0], scores[:, 0], torch.full((1, 3), -1), torch.zeros(1, dtype=torch.int64), 3)
    path, alen, bonus = ops.verify_greedy(tree, torch.randn(1, 3, 16))
    assert path.shape == (1, 3) and alen.shape == bonus.shape == (1,)


# ---------------------------------------------------------------------- graph captures
class FakeCuda:
    """The torch.cuda calls of a capture, recorded with the device current at each call (a
    ``GuardRecorder``'s innermost guard); the captured function runs eagerly on CPU."""

    NAMES = ("Stream", "current_stream", "stream", "CUDAGraph", "graph", "synchronize",
             "graph_pool_handle")

    def __init__(self, recorder: GuardRecorder):
        self.rec = recorder
        self.calls: list[tuple[str, object]] = []
        self.capture_streams: list[object] = []

    def _note(self, name):
        self.calls.append((name, self.rec.current))

    class _Stream:
        def __init__(self, device):
            self.device = device

        def wait_stream(self, other):
            pass

    class _Graph:
        def replay(self):
            raise AssertionError("not replayed in this test")

    def Stream(self, device=None):  # noqa: N802  (torch's name)
        self._note("Stream")
        return self._Stream(torch.device(device) if device is not None else self.rec.current)

    def current_stream(self, device=None):
        self._note("current_stream")
        return self._Stream(torch.device(device) if device is not None else self.rec.current)

    def stream(self, s):
        self._note("stream")
        return contextlib.nullcontext()

    def CUDAGraph(self):  # noqa: N802
        self._note("CUDAGraph")
        return self._Graph()

    def graph(self, g, pool=None, stream=None, **kw):
        self._note("graph")
        self.capture_streams.append(stream)
        return contextlib.nullcontext()

    def synchronize(self, device=None):
        self._note("synchronize")

    def graph_pool_handle(self):
        self._note("graph_pool_handle")
        return (0, 0)

    def install(self, monkeypatch):
        for name in self.NAMES:
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))


def test_graph_captures_run_under_the_guard(recorder, monkeypatch):
    pytest.importorskip("transformers")
    from tiny_models import prompt, random_head, tiny_target

    from eagle2_kernels import TreeSpecDecoder
    from eagle2_kernels.runtime import graphs

    model, head = tiny_target("llama"), random_head("llama")
    dec = TreeSpecDecoder(model, head, total_tokens=5, depth=2, top_k=2, static_round=True)
    ids = prompt(model.config.vocab_size, 4, 0)
    dec.generate(ids, 4)  # sets up the static round's buffers
    sr = dec._statics.last
    step = graphs.PlainStep(dec._state, 1)
    # Pretend the target is on cuda:1 (cuda:0 current): every CUDA call of the captures must
    # happen inside torch.cuda.device(cuda:1), and the graph gets a capture stream of cuda:1.
    sr.device = step.device = CUDA1
    fake = FakeCuda(recorder)
    fake.install(monkeypatch)
    monkeypatch.setattr(graphs, "graphs_supported", lambda device: (True, ""))
    assert sr.enable_graphs(), sr.graph_error  # the draft phase
    sr.set_sampling(0.7, 1.0, 0)  # a verify phase not built yet: captured on first use
    sr._verify_fn()
    step.capture()
    names = [n for n, _ in fake.calls]
    assert names.count("graph") == 3 and "graph_pool_handle" in names
    assert all(dev == CUDA1 for _, dev in fake.calls), fake.calls
    assert [s.device for s in fake.capture_streams] == [CUDA1] * 3
    assert recorder.current is None


# ---------------------------------------------------------------------- on a non-default GPU
@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_ops_and_captured_round_on_a_non_default_device():
    import copy
    import warnings

    pytest.importorskip("transformers")
    from tiny_models import hf_greedy, trained_setup

    from eagle2_kernels import TreeSpecDecoder

    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    # Ops on cuda:1 with cuda:0 current equal the CPU reference (tree_expand -> tree_build ->
    # verify_greedy), and leave cuda:0 current.
    logits = torch.randn(2, 1, 300)
    want = ops.tree_expand(logits, torch.zeros(2, 1), 4, backend="reference")
    got = ops.tree_expand(logits.to(dev), torch.zeros(2, 1, device=dev), 4)
    assert all(a.device == dev for a in got)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[2].cpu(), want[2])  # tokens, picks
    torch.testing.assert_close(got[1].cpu(), want[1])
    roots = torch.zeros(2, dtype=torch.int64)
    parents = torch.full((2, 4), -1)
    tree = ops.tree_build(want[0][:, 0].to(dev), want[1][:, 0].to(dev), parents.to(dev), roots.to(dev), 4,
                          error_flag=torch.zeros(2, dtype=torch.int32, device=dev))
    ref = ops.tree_build(want[0][:, 0], want[1][:, 0], parents, roots, 4, backend="reference")
    assert torch.equal(tree.tokens.cpu(), ref.tokens) and torch.equal(tree.mask.cpu(), ref.mask)
    target = torch.randn(2, 4, 300)
    for a, b in zip(ops.verify_greedy(tree, target.to(dev)), ops.verify_greedy(ref, target, backend="reference")):
        assert torch.equal(a.cpu(), b)
    assert torch.cuda.current_device() == 0
    # The captured static round of a decoder whose target is on cuda:1 (a trained head: deep
    # paths, so compaction and multi-row catch-up run there too).
    cpu_model, cpu_head, prompts = trained_setup()
    model = copy.deepcopy(cpu_model).to(dev)
    head = copy.deepcopy(cpu_head).to(dev)
    head.attach_target(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="TreeSpecDecoder: CUDA graph capture failed")
        dec = TreeSpecDecoder(model, head, total_tokens=16, depth=5, top_k=4, cuda_graphs=True)
        ids = prompts[:1].to(dev)
        out = dec.generate(ids, 24)
    assert dec.graph_status == "graphs"
    assert torch.equal(out.sequences, hf_greedy(model, ids, 24))
    assert max(out.stats.accept_lengths) >= 3
    assert torch.cuda.current_device() == 0
