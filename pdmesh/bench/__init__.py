"""``pdmesh bench``: serving benchmarks (load generation, latency statistics, goodput, plots)."""
