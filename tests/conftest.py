"""Shared pytest setup: Hypothesis profiles.

"ci" (default): modest example counts, no deadline (a shared 2-core CPU makes timings noisy).
"slow": more examples. Pick with HYPOTHESIS_PROFILE=slow.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
