"""The INT8 attention library. Imports torch and triton only (triton lazily, at first kernel launch).

Public: `sage_attention` (the quantized kernel), `sage_sdpa` (drop-in for F.scaled_dot_product_attention with
exact fallback), `counters` / `reset_counters` (which path ran), `doctor` (what this machine gets).
"""
from ._counters import counters, reset_counters
from ._api import sage_attention
from ._sdpa import sage_sdpa
from ._arch import doctor

__all__ = ["sage_attention", "sage_sdpa", "counters", "reset_counters", "doctor"]
