"""Loaded with ``-p tests.testenv`` before pytest-django imports the settings:
points the suite at its own Redis databases and key prefix, so a running
``make run`` on the same machine is never disturbed."""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile

os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/14")
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("REDIS_KEY_PREFIX", f"orchtest{os.getpid()}")
os.environ.setdefault("PIPELINE_CONFIG", os.path.join(os.path.dirname(__file__), "pipeline.test.toml"))
os.environ.setdefault("LOG_LEVEL", "WARNING")
# The test process reads its config file; the processes it starts follow the stored
# versions (tests.conftest.process_env).
os.environ.setdefault("PIPELINE_CONFIG_FOLLOW", "0")
# The suite's own process keeps CPython's collector (orchestrator_site.gctune); the
# processes it starts set GC_FREEZE themselves where a test needs it.
os.environ.setdefault("GC_FREEZE", "0")
# One test database per checkout, so that a CI clone and a working tree can run side by side.
_checkout = hashlib.sha256(os.path.dirname(os.path.abspath(__file__)).encode()).hexdigest()[:8]
os.environ.setdefault("DATABASE_TEST_NAME", f"test_orchestrator_{_checkout}")
os.environ.setdefault("CELERY_BROKER_KEY_PREFIX", f"orchtest{_checkout}:")

# prometheus_client reads this when first imported: the suite's processes keep their
# metrics in a directory of their own, as under `make run`, and nothing outlives the run.
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="orchtest-metrics-")
    atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], True)
