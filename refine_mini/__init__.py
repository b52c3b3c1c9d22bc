"""refine_mini: a minimal reference implementation of REFINE (arXiv 2602.16704) on fast-weight LMs."""
