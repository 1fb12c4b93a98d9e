"""The drift lab: a synthetic multi-step reasoning task whose traces can be checked exactly."""
