"""diffusers adapters: comfy_sage as a diffusers attention backend, `enable_sage` / `disable_sage` (with step and
block schedules), and one-call generation (`sage_video.generate`, `sage_image.generate`).

Importing this package registers the backends `comfy_sage`, `comfy_sage_fp16`, `comfy_sage_fp8`,
`comfy_sage_fine`, `comfy_sage_int8` and `comfy_sage_exact` with diffusers' attention dispatcher (sparse levels,
`comfy_sage_sparse_keep_0_9` and the like, are registered when first used).
"""
from .backend import register_backends
from .enable import SageReport, disable_sage, enable_sage, sage_state, set_step
from ..kernels.calibrate import DEFAULT_BUDGET, Calibration
from ..kernels.schedule import Schedule, ScheduleError

register_backends()

__all__ = ["enable_sage", "disable_sage", "set_step", "sage_state", "SageReport", "Schedule", "ScheduleError",
           "register_backends", "Calibration", "DEFAULT_BUDGET"]
