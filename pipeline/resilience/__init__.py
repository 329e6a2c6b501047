"""Keeping the service up: retry backoff, deduplication keys, bounded admission (load shedding)."""
