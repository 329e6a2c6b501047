"""Garbage collection for the long-lived processes (gateway, workers).

A process of this platform holds about 150,000 objects once Django, DRF, Celery
and the pipeline are imported, nearly all of them for its whole life. CPython's
collector still walks them on every full collection: about 40 ms here, during
which every stream the process carries stops. ``settle()`` moves what exists at
start-up out of the collector's reach (``gc.freeze``: a full collection then
walks only what was made since) and lets the youngest generation grow larger
before it is collected, so that the many short-lived objects of a request are
collected less often, in fewer passes.
"""

from __future__ import annotations

import gc

from orchestrator_site.env import env_bool

YOUNG_THRESHOLD = 10_000  # CPython's default is 700


def settle() -> None:
    """Call once the process has imported what it will run (not per request).
    ``GC_FREEZE=0`` leaves the collector as CPython sets it (the test suite's own
    process: frozen objects are invisible to ``gc.get_referrers``, which Hypothesis
    relies on)."""
    if not env_bool("GC_FREEZE", default=True):
        return
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
