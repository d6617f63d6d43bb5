"""Shared fixtures. One embedded Ray for the whole session (start-up costs ~3-5 s)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_local():
    """An embedded 2-CPU Ray, shut down after the session (by handle, never `ray stop`)."""
    import ray

    from userfm.runtime import init_ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False, logging_level="WARNING")
    init_ray()  # no-op once initialized; keeps the code path the CLI uses
    yield ray
    ray.shutdown()
