"""Create the database named by DATABASE_URL if it does not exist (idempotent)."""

from __future__ import annotations

import os
import sys

import psycopg
from psycopg import sql

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from orchestrator_site.env import parse_database_url


def main() -> int:
    db = parse_database_url(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/orchestrator"))
    with psycopg.connect(dbname="postgres", user=db.user, password=db.password, host=db.host, port=db.port, autocommit=True, connect_timeout=5) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db.name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db.name)))
            sys.stderr.write(f"created database {db.name}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
