"""Benchmarks: speed and memory figures, printed; not tests (`make bench`)."""
