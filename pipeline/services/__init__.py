"""The real-time path's writes and orchestration, by concern: ``start`` (the gateway's
side of a request), ``execute`` (a run in a worker), ``leases`` (runs that died),
``inline`` (the gateway's own runs while Redis is down), ``gates`` (limits,
admission, deduplication, breakers), ``sessions`` and ``documents``."""
