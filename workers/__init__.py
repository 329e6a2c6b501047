"""Model workers: one module per provider protocol, chosen through ``workers.registry``.

Knows nothing of Django. Every failure leaves a worker as an
``orchestrator_site.errors.WorkerError`` (that module is plain Python).
"""
