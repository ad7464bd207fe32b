"""Shared fixtures. One local Ray session serves the whole test run (ray.init costs seconds)."""

from __future__ import annotations

import os

import pytest

# Worker prints would otherwise show twice on the driver.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Ray Train's controller polls its workers every 2 s by default; each fit() waits up to one interval to
# see its workers start, report and finish. Tests run some 35 short fits: poll faster (test speed only).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Fail fast instead of waiting 30 minutes when a test deadlocks Ray Data.
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with more logical CPUs than cores, so 2 Train workers and Ray Data tasks both fit."""
    import ray

    from raytrain_ssl.launch import embedded_ray_environment

    if not ray.is_initialized():
        embedded_ray_environment()
        ray.init(
            num_cpus=4,
            object_store_memory=300 * 1024 * 1024,
            # As `raytrain-ssl` starts it: Ray Train's placement-group cleaner asks the dashboard's State
            # API whether a run's controller died; without it, the worker groups of sweep trials stopped by
            # an interruption keep their CPUs for good, and later trials' Ray Data tasks never start.
            include_dashboard=True,
            log_to_driver=True,
            configure_logging=False,
        )
    yield ray
    # Left running for the other tests; Ray shuts down when the pytest process exits.
