"""pdmesh engine: the model runtime shared by the prefill and decode roles."""
