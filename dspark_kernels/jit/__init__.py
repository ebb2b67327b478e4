"""Triton JIT kernels. Every module here imports ``triton`` at import time.

Import these modules only from inside the public wrappers (``dspark_kernels.verify_attention``
and friends), never at package import: ``import dspark_kernels`` must work without triton.
"""
