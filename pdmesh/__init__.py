"""The product's top floor: the ``pdmesh`` command line (``pdmesh/cli.py``), the launcher
(``pdmesh up`` / ``pdmesh serve``), the in-process ``Mesh`` and the serving benchmarks. It may
import every other package and none imports it back, except for the generated wire contracts
(``pdmesh.v1``, from ``protos/``; regenerate with ``bash scripts/gen_protos.sh``), which sit
at the bottom of the stack under this name because the proto package is ``pdmesh.v1``."""
