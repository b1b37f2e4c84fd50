"""The INT8 attention library. Imports torch and triton only (triton lazily, at first kernel launch).

Public: `sage_attention` (the quantized kernel), `sparse_attention` (its block-sparse variant), `sage_sdpa`
(drop-in for F.scaled_dot_product_attention with exact fallback), `counters` / `reset_counters` (which path ran;
adapters that run their own exact fallback report it with `count`, and ask `fallback_reason` whether the kernel
applies), `exact_sdpa` (SDPA as it was before anything replaced it: what every exact call of the pack runs),
`doctor` (what this machine gets), and per-site calibration (`variant_errors`, `Calibrator`, `Calibration`: see
`calibrate`).
"""
from ._counters import count, counters, reset_counters, sparse_density
from ._fallback import exact_sdpa
from ._api import sage_attention
from ._sparse import sparse_attention
from ._sdpa import fallback_reason, sage_sdpa
from ._arch import doctor
from .calibrate import Calibration, Calibrator, variant_errors

__all__ = ["sage_attention", "sparse_attention", "sage_sdpa", "counters", "reset_counters", "sparse_density", "count", "fallback_reason", "exact_sdpa",
           "doctor",
           "variant_errors", "Calibrator", "Calibration"]
