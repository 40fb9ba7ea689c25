"""Benchmarks that reproduce every performance figure of the README (`python -m benchmarks`)."""
