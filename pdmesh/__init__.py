"""Generated wire contracts (``pdmesh.v1``) from ``protos/``; regenerate with
``bash scripts/gen_protos.sh``."""
