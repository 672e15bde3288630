"""Fixtures of this room: the launcher jobs' synthetic cache and their 2-rank reference losses
(tests/support/launch_jobs.py), shared with tests/e2e and tests/multinode."""

from tests.support.launch_jobs import reference_losses, synthetic_cache

__all__ = ["reference_losses", "synthetic_cache"]
