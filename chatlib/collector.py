"""How ``python -m chatlib serve`` sets Python's cyclic garbage collector.

CPython's collector runs a *full* collection, which walks every object it tracks, after
every 10 middle collections (and once the objects that survived those grew by a quarter
since the last full one). A server's tracked objects are its imported stack and its
connections, and each client that joins adds a hundred or so (coroutines, closures, dicts):
while clients join by the thousand, full collections come one after another, each stops the
event loop for as long as it walks them all, and every client that arrives meanwhile waits
(bench/README.md, "Join storm").

:func:`settle` is called once the server is up. It freezes what exists then (the imported
stack lives as long as the process) and makes automatic full collections rare
(:data:`FULL_EVERY` middle collections apart). That costs no memory that matters: a closed
WebSocket connection is freed by reference counting as soon as it ends (chatlib.protocols
breaks the reference cycles it would otherwise leave), and the young and middle
collections, which walk only recent objects, run as often as before.

A notebook's kernel is the learner's process, with the learner's objects: the server
started in a kernel (chatlib.start_server) leaves its collector alone.
"""

from __future__ import annotations

import gc

FULL_EVERY = 1000
"""Middle collections between two automatic full ones (CPython's default: 10)."""


def settle() -> None:
    """Collect once, freeze the survivors (no collection walks them again), and make full
    collections :data:`FULL_EVERY` middle collections apart. Young and middle thresholds
    are kept."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_EVERY)
