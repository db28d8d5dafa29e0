"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance of 2 CPUs (loopback, no dashboard), started once per test module
    that asks for it and stopped after it; the module is skipped where Ray is not installed."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level="ERROR")
    yield ray
    ray.shutdown()
