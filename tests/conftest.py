"""Shared pytest setup: Hypothesis profiles and single-threaded torch.

"ci" (default): modest example counts, no deadline (a shared 2-core CPU makes timings noisy), derandomized so that
a CI run is reproducible and never red by the luck of the draw.
"slow": more examples, freshly random every run: the exploring profile. Pick with HYPOTHESIS_PROFILE=slow.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=10, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a shared 2-core machine are ~1000x faster single-threaded (no OpenMP spin contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
