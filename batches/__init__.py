"""Batch jobs: models, REST API, scheduler, output sinks, recovery (later issues)."""
