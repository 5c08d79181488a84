"""Benchmarks (``mdh bench ...``): warm-up excluded, medians reported, never run as unit tests."""
