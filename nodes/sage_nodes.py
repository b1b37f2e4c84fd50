"""The node classes (classic ComfyUI node API, category "sageattention").

Importing this module never imports ComfyUI: `comfy` is touched only inside the node functions, through
`_runtime.install`.
"""
from __future__ import annotations

import logging

import torch

from ..kernels.calibrate import DEFAULT_BUDGET
from ..kernels.schedule import Schedule, ScheduleError
from . import _metrics, _runtime

log = logging.getLogger("comfy_sage")
CATEGORY = "sageattention"
SCHEDULE_TYPE = "SAGE_SCHEDULE"
PV = ["auto", "fp16", "fp8", "int8"]
_INT8_TIP = "int8 = INT8 P·V with Hadamard-rotated Q/K, the most accurate 8-bit path (auto on RTX 30xx/40xx/50xx)."


def _validate(**fields) -> bool | str:
    """VALIDATE_INPUTS helper: True, or the ScheduleError text (it names the bad token).

    ComfyUI files a failed VALIDATE_INPUTS under every input the method takes (execution.validate_inputs), so only a
    node with one schedule string validates it there; the step and block schedules, which have two, report a bad
    token when they run (build), once, naming the input that holds it."""
    try:
        Schedule.from_strings(**{k: v for k, v in fields.items() if isinstance(v, str)})
    except ScheduleError as e:
        return str(e)
    return True


class ApplySageAttention:
    DESCRIPTION = ("Clone the model and run its attention with 8-bit SageAttention (INT8 Q·K, INT8/FP8/FP16 P·V) "
                   "where it applies; masks, fp32, CPU, unsupported head dims and low_precision_attention=False run "
                   "the original attention. Removing the node restores default attention.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "enabled": ("BOOLEAN", {"default": True, "tooltip": "Off: default attention, but the run is still "
                                        "timed so a report or compare node can use it as the baseline."}),
                "pv": (PV, {"default": "auto", "tooltip": "P·V precision: auto = the GPU's choice (INT8 on RTX "
                            "30xx/40xx/50xx; on H100/H200 FP16 at head dims 64/128 with Triton 3.6 or 3.9, FP8 at others and "
                            "on other Tritons; FP16 on A100). fp8: the fastest on H100/H200. " + _INT8_TIP}),
                "print_summary": ("BOOLEAN", {"default": False, "tooltip": "Print what ran (8-bit/exact per step) "
                                              "to the console after each sampling."}),
            },
            "optional": {
                "schedule": (SCHEDULE_TYPE, {"tooltip": "From the SageAttention step/block schedule nodes; "
                                             "without it every step and block runs 8-bit."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, enabled=True, pv="auto", print_summary=False, schedule=None):
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must come from a SageAttention schedule node, got {type(schedule).__name__}")
        m, _ = _runtime.install(model, enabled=bool(enabled), pv=pv, schedule=schedule, verbose=bool(print_summary),
                                label="sage" if enabled else "default")
        return (m,)


class SageAttentionCalibrate:
    DESCRIPTION = ("Apply SageAttention, calibrated per attention site (block x self/cross): the first sampling "
                   "measures every site against exact attention (that model call runs exactly) and keeps exact "
                   "attention where 8-bit errs by more than the budget, FP8 or FP16 P·V (or the per-token-K 'fine' "
                   "variant) elsewhere. The decision is saved as JSON for these weights and reused by later runs; "
                   "the Report node lists it.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "budget": ("FLOAT", {"default": DEFAULT_BUDGET, "min": 0.0, "max": 1.0, "step": 0.005,
                                     "tooltip": "Largest relative L1 error (vs exact attention) a site may have "
                                     "and still run 8-bit. FP8 P·V measures about 0.038 on ordinary layers, "
                                     "FP16 about 0.011."}),
                "pv": (PV, {"default": "auto", "tooltip": "auto: the GPU's faster P·V where it is within "
                            "budget, else its other paths; fp16/fp8/int8: only that one; then the per-token-K "
                            "'fine' variant, else exact. " + _INT8_TIP}),
                "recalibrate": ("BOOLEAN", {"default": False, "tooltip": "Measure again even if a calibration "
                                            "for these weights is saved (and overwrite it)."}),
                "print_summary": ("BOOLEAN", {"default": False, "tooltip": "Print what ran and the per-site "
                                              "decisions to the console after each sampling."}),
            },
            "optional": {
                "schedule": (SCHEDULE_TYPE, {"tooltip": "Calibration only chooses among sites this schedule runs "
                                             "8-bit (and may keep any site exact)."}),
                "calibration_dir": ("STRING", {"default": "", "tooltip": "Where calibrations are saved; empty = "
                                               "$COMFY_SAGE_CALIBRATION_DIR or ~/.cache/comfy_sage/calibration."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, budget=DEFAULT_BUDGET, pv="auto", recalibrate=False, print_summary=False, schedule=None,
              calibration_dir=""):
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must come from a SageAttention schedule node, got {type(schedule).__name__}")
        opts = {"budget": float(budget), "recalibrate": bool(recalibrate),
                "directory": (calibration_dir or "").strip() or None}
        m, _ = _runtime.install(model, enabled=True, pv=pv, schedule=schedule, verbose=bool(print_summary),
                                label="sage-calibrated", calibrate=opts)
        return (m,)


class SageAttentionSparse:
    DESCRIPTION = ("Block-sparse attention on the self-attention sites: each query tile computes only the key "
                   "blocks that hold most of its attention, skipping the rest; cross-attention stays dense. "
                   "calibrated: the first sampling measures every self-attention site at several levels (that model "
                   "call runs exactly) and takes the sparsest within the budget, else dense (sites whose attention "
                   "is not local stay dense); the decision is saved like SageAttention Calibrate's. manual: `level` "
                   "on every self-attention site. With Apply SageAttention or Calibrate, before or after it, the "
                   "model keeps their settings and schedule plus these rules (with Apply's enabled off: default "
                   "attention); alone it is Apply with the defaults. The Report node shows each site's density.")
    MODES = ["calibrated", "manual"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "mode": (cls.MODES, {"default": "calibrated", "tooltip": "calibrated: per site, the sparsest level "
                                     "within budget (measured on the first sampling), else dense. manual: `level` "
                                     "on every self-attention site."}),
                "level": ("FLOAT", {"default": 0.9, "min": 0.05, "max": 1.0, "step": 0.01, "tooltip": "manual "
                                    "mode: the share of each query tile's attention mass whose key blocks it "
                                    "computes (keep); lower skips more."}),
                "dense_steps": ("STRING", {"default": "", "tooltip": "Steps that stay dense 8-bit, e.g. '0-1' (the "
                                           "first two) or '0.0-0.2'; empty = none."}),
                "budget": ("FLOAT", {"default": DEFAULT_BUDGET, "min": 0.0, "max": 1.0, "step": 0.005,
                                     "tooltip": "calibrated mode: the largest relative L1 error (vs exact attention) "
                                     "a site may have at a sparse level."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, dense_steps=""):
        return _validate(dense_steps=dense_steps)  # level and budget: ComfyUI checks their min and max

    @classmethod
    def schedule(cls, mode="calibrated", level=0.9, dense_steps="") -> Schedule:
        """The sparse rules of the node's inputs; ScheduleError names a bad one."""
        if mode not in cls.MODES:
            raise ScheduleError(f"mode: bad token {mode!r}: use calibrated or manual", token=str(mode), field="mode")
        if mode == "manual" and not 0.0 < float(level) <= 1.0:
            raise ScheduleError(f"level: bad value {level!r}: the share of attention mass kept must be in (0, 1]",
                                token=str(level), field="level")
        sparse = "auto" if mode == "calibrated" else f"keep={float(level):g}"
        return Schedule.from_strings(sparse=sparse, dense_steps=dense_steps)

    def apply(self, model, mode="calibrated", level=0.9, dense_steps="", budget=DEFAULT_BUDGET):
        m, _ = _runtime.install_sparse(model, self.schedule(mode, level, dense_steps), float(budget))
        return (m,)


class _ScheduleNode:
    """A schedule from this node's rules, composed with an optional incoming one (both must agree)."""
    RETURN_TYPES = (SCHEDULE_TYPE,)
    RETURN_NAMES = ("schedule",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, schedule=None, **rules):
        return (Schedule.from_strings(**rules).compose(schedule),)


class SageAttentionStepSchedule(_ScheduleNode):
    DESCRIPTION = ("Which sampling steps run 8-bit attention. Indices (0-based; -1 = last) or fractions of the "
                   "schedule (0.9-1.0 = last tenth). Empty = all steps. Steps come from the sampler's sigmas, so "
                   "every sampler, scheduler and CFG batch works.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "steps": ("STRING", {"default": "", "tooltip": "Steps that run 8-bit, e.g. '2-17' or '0.1-1.0'; "
                                     "empty = all."}),
                "exact_steps": ("STRING", {"default": "0-1, -1", "tooltip": "Steps kept exact, e.g. '0-1, -1' "
                                           "(the first two and the last)."}),
            },
            "optional": {"schedule": (SCHEDULE_TYPE, {"tooltip": "Compose with another schedule (both must "
                                                     "agree for a call to run 8-bit)."})},
        }


class SageAttentionBlockSchedule(_ScheduleNode):
    DESCRIPTION = ("Which blocks run 8-bit attention: flat indices in forward order ('0-3, 38-39'), or the "
                   "model's own groups ('input:4-8', 'middle', 'output', 'double:0-9', 'single'); and self- vs "
                   "cross-attention. Empty = all blocks.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "blocks": ("STRING", {"default": "", "tooltip": "Blocks that run 8-bit; empty = all."}),
                "exact_blocks": ("STRING", {"default": "", "tooltip": "Blocks kept exact, e.g. '0, 38-39'."}),
                "attention": (["all", "self", "cross"], {"default": "all", "tooltip": "Which attention kind runs "
                                                         "8-bit (joint DiT attention counts as self)."}),
            },
            "optional": {"schedule": (SCHEDULE_TYPE, {"tooltip": "Compose with another schedule (steps × blocks)."})},
        }


class SageAttentionReport:
    DESCRIPTION = ("After sampling: per-step time, attention calls by path (8-bit, or exact and why), the "
                   "per-site decisions of SageAttention Calibrate, the density of each sparse site (SageAttention "
                   "Sparse), what ComfyUI core had selected for attention when the node was applied (default "
                   "attention, attention backend, per-layer attention, Model Sparse Attention) and, with a "
                   "baseline model (Apply SageAttention with enabled off), the speed-up.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model from Apply SageAttention."}),
                "latent": ("LATENT", {"tooltip": "The sampler's output (makes the report run after sampling)."}),
            },
            "optional": {
                "baseline_model": ("MODEL", {"tooltip": "Apply SageAttention with enabled off, sampled with the "
                                             "same settings."}),
                "baseline_latent": ("LATENT", {"tooltip": "The baseline sampler's output."}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "report"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    def report(self, model, latent, baseline_model=None, baseline_latent=None):
        st = _runtime.state_of(model)
        if st is None:
            text = "comfy_sage: this model did not pass through Apply SageAttention; nothing to report"
        else:
            text = _runtime.summary(st, _runtime.state_of(baseline_model), model=model)
        print(text)
        return {"ui": {"text": [text]}, "result": (text,)}


def _compare(a, b, model_a, model_b, channels_last):
    m = _metrics.compare(a, b, channels_last=channels_last)
    heat, scale = _metrics.heatmap(m["diff"])
    ratio = _runtime.timing_ratio(_runtime.state_of(model_a), _runtime.state_of(model_b))
    text = _metrics.format_metrics(m, ratio, scale)
    print(f"comfy_sage compare: {text}")
    return {"ui": {"text": [text]}, "result": (heat, text)}


class _CompareNode:
    """Two outputs of the same seed (default attention vs SageAttention) -> heat-map IMAGE and metrics STRING."""
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("heatmap", "metrics")
    FUNCTION = "compare"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    OPTIONAL = {"model_a": ("MODEL",), "model_b": ("MODEL",)}


class SageAttentionCompareImages(_CompareNode):
    DESCRIPTION = ("Compare two images (default attention vs SageAttention, same seed): a difference heat-map and "
                   "PSNR, SSIM-like score, max abs error and the timing ratio of the two models' runs.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"image_a": ("IMAGE", {"tooltip": "Reference (default attention)."}),
                         "image_b": ("IMAGE", {"tooltip": "Test (SageAttention)."})},
            "optional": dict(cls.OPTIONAL),
        }

    def compare(self, image_a, image_b, model_a=None, model_b=None):
        return _compare(image_a, image_b, model_a, model_b, channels_last=True)


class SageAttentionCompareLatents(_CompareNode):
    DESCRIPTION = "Like Compare Images, on latents (video latents are compared frame by frame)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent_a": ("LATENT",), "latent_b": ("LATENT",)}, "optional": dict(cls.OPTIONAL)}

    def compare(self, latent_a, latent_b, model_a=None, model_b=None):
        a, b = latent_a["samples"], latent_b["samples"]
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise TypeError("latent inputs must carry a 'samples' tensor")
        return _compare(a, b, model_a, model_b, channels_last=False)


NODE_CLASS_MAPPINGS = {
    "ApplySageAttention": ApplySageAttention,
    "SageAttentionCalibrate": SageAttentionCalibrate,
    "SageAttentionSparse": SageAttentionSparse,
    "SageAttentionStepSchedule": SageAttentionStepSchedule,
    "SageAttentionBlockSchedule": SageAttentionBlockSchedule,
    "SageAttentionReport": SageAttentionReport,
    "SageAttentionCompareImages": SageAttentionCompareImages,
    "SageAttentionCompareLatents": SageAttentionCompareLatents,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ApplySageAttention": "Apply SageAttention",
    "SageAttentionCalibrate": "SageAttention Calibrate",
    "SageAttentionSparse": "SageAttention Sparse",
    "SageAttentionStepSchedule": "SageAttention Step Schedule",
    "SageAttentionBlockSchedule": "SageAttention Block Schedule",
    "SageAttentionReport": "SageAttention Report",
    "SageAttentionCompareImages": "SageAttention Compare Images",
    "SageAttentionCompareLatents": "SageAttention Compare Latents",
}
