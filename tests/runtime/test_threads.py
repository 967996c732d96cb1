"""Threads sharing a decoder (or a target model): every call returns what it returns alone.

The decoder serialises calls per target model (``runtime/locking.py``): ``generate`` holds the
lock for the whole call, a ``stream`` from its first ``next()`` until it is exhausted, closed or
collected. These tests run several threads over several prompts and call kinds at once, many
times over, against each call's output alone (fp32 greedy and seeded sampling), and check that an
abandoned, closed or handed-over stream lets the others go on."""

from __future__ import annotations

import functools
import threading
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eagle2_kernels import TreeSpecDecoder  # noqa: E402
from eagle2_kernels.runtime.costmodel import CostModel  # noqa: E402
from eagle2_kernels.runtime.locking import CallLock, lock_for  # noqa: E402
from tiny_models import one_thread, prompt, tiny_target, trained_setup  # noqa: E402, F401  (autouse fixture)

# Costs under which the adaptive policy varies the tree from round to round (and takes plain
# steps), so rounds of concurrent calls would differ in shape if they ever mixed.
MIXED = CostModel.synthetic([0.04 + 0.03 * i for i in range(8)], draft_s=0.002)
WAIT_S = 30.0  # generous bound on a thread's join: a deadlock fails instead of hanging


def _run_threads(targets, timeout=WAIT_S):
    """Start one thread per callable behind a barrier; re-raise the first failure."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(targets))

    def wrap(fn):
        def run():
            try:
                barrier.wait()
                fn()
            except BaseException as exc:  # noqa: BLE001  (reported to the test below)
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread is still running: deadlock"
    if errors:
        raise errors[0]


@functools.lru_cache(maxsize=None)
def _calls():
    """(model, head, calls): each call is (kind, args, kwargs); kinds generate / stream / plain.
    Trained prompts (long accepted paths) and fresh ones, batches of one and ragged pairs,
    greedy and seeded sampling, different lengths."""
    model, head, prompts = trained_setup("llama")
    vocab = model.config.vocab_size
    fresh = prompt(vocab, 9, seed=41)
    ragged = [prompts[3, :4], prompts[4]]
    calls = [
        ("generate", (prompts[0:1], 24), {}),
        ("generate", (prompts[1:3], 18), {}),
        ("stream", (prompts[2:3], 20), {}),
        ("generate", (ragged, 16), {}),
        ("plain", (fresh, 12), {}),
        ("stream", (fresh, 15), {}),
        ("generate", (prompts[5:6], 14), {"temperature": 0.8, "seed": 7}),
        ("stream", (prompts[6:8], 12), {}),
    ]
    return model, head, calls


def _do(dec, call):
    """Run one call; its output as a comparable Python value."""
    kind, args, kw = call
    kw = dict(kw)
    if "seed" in kw:
        kw["generator"] = torch.Generator().manual_seed(kw.pop("seed"))
    if kind == "generate":
        return dec.generate(*args, **kw).sequences.tolist()
    if kind == "plain":
        return dec.generate_plain(*args, **kw).sequences.tolist()
    return list(dec.stream(*args, **kw))


def _decoders(model, head):
    return [TreeSpecDecoder(model, head, total_tokens=10, depth=3, top_k=3, cost_model=MIXED),
            TreeSpecDecoder(model, head, total_tokens=7, depth=4, top_k=2, adaptive=False)]


@pytest.mark.parametrize("which", ["adaptive", "fixed"])
def test_threads_on_one_decoder_get_their_own_outputs(which):
    model, head, calls = _calls()
    dec = _decoders(model, head)[0 if which == "adaptive" else 1]
    alone = [_do(dec, c) for c in calls]
    for repeat in range(3):
        got: dict[int, object] = {}

        def worker(w):
            # Every worker runs every call, in an order of its own, so all pairs overlap.
            order = list(range(len(calls)))
            shift = (w * 3 + repeat) % len(order)
            for i in order[shift:] + order[:shift]:
                got[(w, i)] = _do(dec, calls[i])

        _run_threads([functools.partial(worker, w) for w in range(4)])
        for (w, i), out in got.items():
            assert out == alone[i], f"repeat {repeat}, thread {w}, call {i} ({calls[i][0]}) differs from alone"
        assert len(got) == 4 * len(calls)


def test_threads_on_two_decoders_of_one_model():
    """Decoders sharing a target take turns too: the attention switch is the model's."""
    model, head, calls = _calls()
    decs = _decoders(model, head)
    alone = {(d, i): _do(decs[d], c) for d in range(2) for i, c in enumerate(calls[:5])}
    impl = model.config._attn_implementation
    got = {}

    def worker(d, w):
        for i in range(5):
            got[(d, w, i)] = _do(decs[d], calls[(i + w) % 5])

    _run_threads([functools.partial(worker, d, w) for d in range(2) for w in range(2)])
    for (d, w, i), out in got.items():
        assert out == alone[(d, (i + w) % 5)]
    assert model.config._attn_implementation == impl  # the user's model is as it was


def test_a_suspended_stream_holds_the_others_until_closed():
    model, head, calls = _calls()
    dec = _decoders(model, head)[1]
    ids = calls[0][1][0]
    alone = dec.generate(ids, 10).sequences.tolist()
    stream = dec.stream(ids, 30)
    first = next(stream)  # the stream now holds the lock, suspended
    done = []
    other = threading.Thread(target=lambda: done.append(dec.generate(ids, 10).sequences.tolist()), daemon=True)
    other.start()
    other.join(0.5)
    assert other.is_alive() and not done  # waits for the stream
    stream.close()  # releases it
    other.join(WAIT_S)
    assert done == [alone]
    assert first == alone[0][ids.shape[1]:][: len(first)]


def test_abandoned_stream_is_released_when_collected():
    model, head, calls = _calls()
    dec = _decoders(model, head)[0]
    ids = calls[0][1][0]
    alone = dec.generate(ids, 8).sequences.tolist()

    def abandon():
        s = dec.stream(ids, 40)
        next(s)
        next(s)
        # returns without closing: the generator is collected here, its finally releases the lock

    _run_threads([abandon])
    assert not dec._lock.locked
    out = []
    _run_threads([lambda: out.append(dec.generate(ids, 8).sequences.tolist())])
    assert out == [alone]
    # Leaving a for loop by break and dropping the stream releases it the same way.
    for chunk in dec.stream(ids, 40):
        break
    del chunk
    assert not dec._lock.locked


def test_stream_never_started_holds_nothing_and_handover_releases():
    model, head, calls = _calls()
    dec = _decoders(model, head)[1]
    ids = calls[0][1][0]
    alone_stream = list(dec.stream(ids, 16))
    idle = dec.stream(ids, 16)  # checked, not started: holds no lock
    out = []
    _run_threads([lambda: out.append(dec.generate(ids, 16).sequences[0, ids.shape[1]:].tolist())])
    assert out == [sum(alone_stream, [])]
    # Started in this thread, finished in another: released there (a lock owned elsewhere).
    first = next(idle)
    rest = []
    _run_threads([lambda: rest.extend(idle)])
    assert [first] + rest == alone_stream and not dec._lock.locked
    # A new call in the thread of a suspended stream proceeds (no self-deadlock); the stream is
    # then overtaken and says so.
    s = dec.stream(ids, 16)
    next(s)
    assert dec.generate(ids, 16).sequences[0, ids.shape[1]:].tolist() == sum(alone_stream, [])
    with pytest.raises(RuntimeError, match="overtaken"):
        next(s)
    assert not dec._lock.locked


def test_close_waits_for_a_running_call():
    model, head, calls = _calls()
    dec = TreeSpecDecoder(model, head, total_tokens=7, depth=4, top_k=2, adaptive=False)
    ids = calls[0][1][0]
    alone = dec.generate(ids, 20).sequences.tolist()
    stream = dec.stream(ids, 20)
    chunks = [next(stream)]
    closer = threading.Thread(target=dec.close, daemon=True)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # the stream being read holds the decoder
    chunks.extend(stream)  # finishes normally, then close runs
    closer.join(WAIT_S)
    assert not closer.is_alive() and sum(chunks, []) == alone[0][ids.shape[1]:]
    with pytest.raises(RuntimeError, match="closed"):
        dec.generate(ids, 3)


# ------------------------------------------------------------------------------ the lock itself
def test_call_lock_is_reentrant_and_releasable_anywhere():
    lock = CallLock()
    lock.acquire()
    lock.acquire()  # the owner again: no deadlock
    entered = threading.Event()

    def contender():
        with lock.held():
            entered.set()

    t = threading.Thread(target=contender, daemon=True)
    t.start()
    assert not entered.wait(0.2)
    lock.release()
    assert not entered.wait(0.1)  # still held once
    releaser = threading.Thread(target=lock.release)  # from another thread
    releaser.start()
    releaser.join()
    assert entered.wait(WAIT_S)
    t.join(WAIT_S)
    assert not lock.locked
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()


def test_lock_is_per_model():
    model, head, _ = _calls()
    a, b = _decoders(model, head)
    assert a._lock is b._lock is lock_for(model)
    other = tiny_target("qwen2")
    assert lock_for(other) is not lock_for(model)
    assert isinstance(lock_for("not a model"), CallLock)
    start = time.perf_counter()
    with lock_for(other).held():  # another model's lock does not block this one
        a.generate(_calls()[2][0][1][0], 2)
    assert time.perf_counter() - start < WAIT_S
