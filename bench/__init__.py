"""Benchmark scripts (run as `python bench/<name>.py`) and the plain baselines they time."""
