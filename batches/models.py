"""Batch jobs and their items arrive with the batch issue; the app is registered now
so that its queues (``batch.high``, ``batch.default``, ``batch.low``) have a home."""
