"""Project wiring: settings, URLs, ASGI/WSGI entry points, the Celery app and the error tree.

Kept free of import side effects so that ``orchestrator_site.errors`` can be
imported by ``workers`` (which knows nothing of Django). The Celery app is
loaded by ``OrchestratorSiteConfig.ready`` and found by ``celery -A
orchestrator_site`` through the ``orchestrator_site.celery`` submodule.
"""
