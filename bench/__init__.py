"""Benchmarks run from a checkout (``python -m bench.<name>``): kernels, engine, KV store,
hand-off, tensor parallelism, quantization, offload and GPU serving layouts, each writing a
JSON result (``bench/results/``); ``bench/run_h200.sh`` runs them on a lent H200, and
``bench/ghz/`` holds the ghz configurations. They are not installed.

The serving load generator that a user runs against a mesh is part of the installed product:
``pdmesh bench serve|sweep|batch`` (``pdmesh/bench/``); the GPU serving scripts here drive it.
One-off investigations (probes) live in ``scripts/probes/``, not here."""
