"""``pdmesh bench serve|sweep|batch``: argument parsers and dispatch (pdmesh/cli.py adds
these under ``pdmesh bench``)."""

from __future__ import annotations

import argparse
import importlib

COMMANDS = {
    "serve": "load a gateway at request rates or concurrencies; latency, goodput, plots",
    "sweep": "colocated vs disaggregated with the same workers: SLO attainment vs rate",
    "batch": "engine ms per token for batch sizes 1..128 (the BLOOM-inference table)",
}


def add_bench_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = commands.add_parser("bench", help="serving and batch benchmarks")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"pdmesh.bench.{name}")
        parser = kinds.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_args(parser)
        parser.set_defaults(func=module.main)
