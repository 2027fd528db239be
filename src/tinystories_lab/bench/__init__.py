"""Benchmarks that print numbers: token-file encoding here, training speed in `training`."""
