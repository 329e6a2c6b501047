"""Django's PostgreSQL backend, measured: django-prometheus's ``django_db_*`` metrics
(statements, their duration, errors by type, connections opened) under its names.

Not django-prometheus's own backend: it wraps the psycopg connection's
``cursor_factory`` each time Django takes a connection, and with Django's
connection pool (``OPTIONS["pool"]``, which the gateway uses) the same
connection comes back again and again, so the wrappers would nest, counting
each statement once per checkout. Here the wrapping is Django's own
``make_cursor``, once per cursor, and a connection counts as new once, the
first time Django is given it."""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator
from typing import Any

from django.db import Error as DatabaseErrors  # what Django makes of the driver's errors
from django.db.backends.postgresql import base
from django.db.backends.utils import CursorWrapper
from django_prometheus.db import connection_errors_total, connections_total, errors_total, execute_many_total, execute_total, query_duration_seconds


class MeteredCursorWrapper(CursorWrapper):
    def execute(self, sql: Any, params: Any = None) -> Any:
        with self._metered(1):
            return super().execute(sql, params)

    def executemany(self, sql: Any, param_list: Any) -> Any:
        count = len(param_list) if hasattr(param_list, "__len__") else 1
        execute_many_total.labels(self.db.alias, self.db.vendor).inc(count)
        with self._metered(count):
            return super().executemany(sql, param_list)

    @contextlib.contextmanager
    def _metered(self, statements: int) -> Iterator[None]:
        alias, vendor = self.db.alias, self.db.vendor
        execute_total.labels(alias, vendor).inc(statements)
        started = time.perf_counter()
        try:
            yield
        except DatabaseErrors as exc:  # counted by type, then raised unchanged
            errors_total.labels(alias, vendor, type(exc).__name__).inc()
            raise
        finally:
            query_duration_seconds.labels(alias, vendor).observe(time.perf_counter() - started)


class DatabaseWrapper(base.DatabaseWrapper):
    _seen: weakref.WeakSet[Any] = weakref.WeakSet()  # connections counted, pooled ones included

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        try:
            connection = super().get_new_connection(conn_params)
        except self.Database.Error:  # psycopg's, before Django wraps it: counted, raised unchanged
            connection_errors_total.labels(self.alias, self.vendor).inc()
            raise
        if connection not in self._seen:
            self._seen.add(connection)
            connections_total.labels(self.alias, self.vendor).inc()
        return connection

    def make_cursor(self, cursor: Any) -> CursorWrapper:
        return MeteredCursorWrapper(cursor, self)
