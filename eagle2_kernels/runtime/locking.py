"""One decoding call at a time per target model, from any number of threads.

A decoder's calls share mutable state: its KV caches, its static-round buffers, the cost-model
table, and, above all, the target model's attention setting, which every forward of ours
switches to tree attention and back (``models/target.py``). Two calls running at once would
overwrite each other's caches (a silently wrong output) and could leave the model switched.
So ``generate`` / ``generate_plain`` / ``cost_model`` hold a lock for the whole call, and a
``stream`` holds it from its first ``next()`` until it is exhausted, closed or garbage
collected. The lock belongs to the *target model*: decoders built on one model (say, two tree
shapes of one model in a server) take turns as well, since the attention switch is the model's.

:class:`CallLock` is used instead of ``threading.RLock`` for two reasons:

* It is re-entrant for the thread that holds it: a thread that starts a new call while one of
  its own streams is suspended goes ahead (that stream then raises "overtaken" if resumed), the
  behaviour of a single-threaded program, instead of deadlocking on itself.
* It can be released from any thread. A stream's lock is released in its generator's
  ``finally``, which runs wherever the generator is closed, exhausted or collected: in a worker
  thread the stream was handed to, or in whichever thread the cyclic garbage collector happens
  to run. ``RLock.release`` from another thread raises and would leave the lock held forever.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

__all__ = ["CallLock", "lock_for"]


class CallLock:
    """A lock held by one thread at a time, re-entrant for that thread, releasable from any.

    Example::

        lock = CallLock()
        with lock.held():
            ...  # one call
    """

    def __init__(self):
        # An RLock under the condition: a generator finaliser (release) may run in the middle of
        # acquire's critical section in the same thread, when the garbage collector fires there.
        self._cond = threading.Condition(threading.RLock())
        self._owner: int | None = None
        self._depth = 0

    def acquire(self) -> None:
        """Wait until no other thread holds the lock, then hold it (once more)."""
        me = threading.get_ident()
        with self._cond:
            while self._depth and self._owner != me:
                self._cond.wait()
            self._owner = me
            self._depth += 1

    def release(self) -> None:
        """Undo one :meth:`acquire` (from any thread); the last one lets a waiting thread in."""
        with self._cond:
            if self._depth == 0:
                raise RuntimeError("CallLock.release: the lock is not held")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    @property
    def locked(self) -> bool:
        """Whether some thread holds the lock now."""
        with self._cond:
            return self._depth > 0

    @contextlib.contextmanager
    def held(self):
        """``with lock.held():`` holds the lock for the body."""
        self.acquire()
        try:
            yield
        finally:
            self.release()


_locks: "weakref.WeakKeyDictionary[object, CallLock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def lock_for(model) -> CallLock:
    """The :class:`CallLock` of ``model`` (one per model object, dropped with it). An object
    that cannot be weakly referenced (not a torch module: the decoder rejects it right after)
    gets a lock of its own."""
    with _locks_guard:
        try:
            lock = _locks.get(model)
        except TypeError:
            return CallLock()
        if lock is None:
            lock = _locks[model] = CallLock()
        return lock
