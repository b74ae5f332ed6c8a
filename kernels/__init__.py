"""pdmesh kernels: each op has a torch reference (``*_ref``) and, where written, a Triton kernel.

Model code calls the wrappers through ``engine.ops``; it never launches ``@triton.jit`` functions.
This package is pdmesh's own; it is not the Hugging Face kernel hub (also importable as
``kernels``), and pdmesh's version stays outside the range transformers accepts for that hub.
"""
