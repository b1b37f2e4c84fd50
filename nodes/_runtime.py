"""What Apply SageAttention installs on a cloned model: the attention override, the per-forward state that tells it
which step and block a call belongs to, and the per-run record the report node reads.

Nothing here imports `comfy` at module level; `install()` does, and only inside ComfyUI.

How a call is located
---------------------
* step: from `transformer_options["sigmas"]` within `["sample_sigmas"]` (set by ComfyUI's sampler for every
  sampler and scheduler, CFG batches included) -> `kernels.schedule.step_index`.
* block, in order of preference:
  1. UNet (SD1.5/SDXL): ComfyUI's `transformer_options["block"]` = ("input"|"middle"|"output", id) and
     `["block_index"]`; each (block, block_index) pair is one transformer block, its first attention call is
     self-attention and later ones cross-attention.
  2. DiTs with block patches (Flux, HunyuanVideo, Wan, LTXV, Qwen-Image): we add a pass-through
     `patches_replace["dit"][("double_block"|"single_block", i)]` that records the block and then calls any patch
     that was already there, else the original block. First call in a block is self (or joint) attention, later
     calls are cross-attention.
  3. Anything else (e.g. SD3's MMDiT): counted per model forward; a call whose keys are as long as its queries is
     a self-attention call and starts a new block, any other call is cross-attention of the current block.

Calibration (SageAttention Calibrate): the first model call of the first sampling loads the saved per-site
decision for these weights, or runs every attention exactly while measuring each site (`kernels.calibrate`);
the decision becomes the schedule's overrides from the next call on.

Sparse attention (SageAttention Sparse): a schedule whose `sparse` level makes `variant()` return
"sparse:keep=F" for self-attention sites (or, calibrated, per-site "sparse:..." overrides). On a model that already
runs our attention the Sparse node's state takes the place of the one there, keeping its settings; Apply or
Calibrate after a Sparse node take its state's place and keep its rules: either order gives one override, not two
chained ones. Each sparse call's density (share of key blocks computed) is recorded per site for the report.

Current core (2026)
-------------------
* q, k, v reach attention functions in `AttentionTensorContainer`s; core's `wrap_attn` hands them to an override's
  `container_function` where it has one (ours: `SageState.container_function`), else takes the tensors out and calls
  the override as before. With plain tensors (0.3.6x) nothing changes.
* Our override is checked by core before a layer's `preferred_attention` (per-layer configs from the checkpoint) and
  before its global default (--use-ck-attention ...): where our node is applied it decides every call, and its exact
  calls go to the override that was there before (a Model Attention Backend, core's Model Sparse Attention), else to
  core's selected attention. We patch no globals: models without our node keep core's choices.
* `register_attention()` adds ours to core's registry as "comfy_sage"; `core_selection` records what core had selected
  when our node was applied, for the report.
"""
from __future__ import annotations

import contextvars
import importlib
import logging
import math
import os
import sys
import threading
import time
from collections import Counter, defaultdict
import dataclasses

import torch

from ..kernels import _sparse
from ..kernels import counters as kernel_counters
from ..kernels import fallback_reason, sage_sdpa
from ..kernels._sdpa import sdpa_taking
from ..kernels.calibrate import Calibrator, fingerprint
from ..kernels.schedule import ALL, Schedule, step_index

log = logging.getLogger("comfy_sage")

MIN_COMFYUI_VERSION = "0.3.60"  # transformer_options["optimized_attention_override"] landed after 0.3.59 (d7f4044)
WRAPPER_KEY = "comfy_sage"
MAX_HEAD_DIM = 256

_forward: contextvars.ContextVar = contextvars.ContextVar("comfy_sage_forward", default=None)


class HookMissing(RuntimeError):
    pass


class _Forward:
    """State of one model forward (one call of apply_model)."""
    __slots__ = ("step", "num_steps", "block", "block_calls", "unet_keys", "unet_calls", "counter", "calibrating")

    def __init__(self, step, num_steps, calibrating=False):
        self.step, self.num_steps = step, num_steps
        self.calibrating = calibrating  # this call runs exact attention and measures every site
        self.block = None          # (flat, group, group_index) set by our block patch
        self.block_calls = 0
        self.unet_keys: dict = {}
        self.unet_calls: Counter = Counter()
        self.counter = -1


class SageState:
    """Shared by a patched model and all its clones (deep copies return the same object): the schedule, what ran,
    and per-step timings of the current run."""

    def __init__(self, enabled: bool, pv: str, schedule: Schedule | None, verbose: bool, structure: dict,
                 previous_override=None, label: str = "sage", calibrator: Calibrator | None = None,
                 sparse: tuple | None = None, core: tuple = ()):
        self.enabled = enabled
        self.pv = pv
        self.schedule = (schedule or ALL)
        if pv != "auto":
            self.schedule = self.schedule.compose(Schedule(pv=pv))
        self.base_schedule = self.schedule  # before calibration's per-site overrides
        self.sparse = sparse  # (rules, budget) of SageAttention Sparse: what a later Apply or Calibrate keeps
        self.calibrator = calibrator
        self.verbose = verbose
        self.structure = structure
        self.previous = previous_override
        self.core = core  # what core had selected when the node was applied (`core_selection`), for the report
        self.label = label
        self._lock = threading.Lock()
        self.runs: list[dict] = []
        self.new_run()

    def __deepcopy__(self, memo):
        return self

    # ---- run records -----------------------------------------------------------------------------------
    def new_run(self, num_steps=None):
        self.run = {"paths": Counter(), "steps": defaultdict(float), "step_calls": defaultdict(Counter),
                    "blocks": defaultdict(Counter), "forwards": 0, "num_steps": num_steps, "wall": 0.0,
                    "finished": False, "density": defaultdict(lambda: [0.0, 0])}  # site -> [sum, sparse calls]
        self.runs.append(self.run)
        del self.runs[:-8]

    def record(self, path: str, step, block, kind, density: float | None = None):
        with self._lock:
            self.run["paths"][path] += 1
            self.run["step_calls"][step][path] += 1
            if block is not None:
                self.run["blocks"][(block, kind)][path] += 1
                if density is not None:
                    d = self.run["density"][(block, kind)]
                    d[0] += density
                    d[1] += 1

    # ---- the attention override --------------------------------------------------------------------------
    def _exact(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        """The override as core calls it with plain tensors: ComfyUI 0.3.60 to 0.3.x, and current core for an
        override without `container_function`. Core's wrapper holds q, k, v until this returns."""
        q, k, v = (_arg(args, kwargs, i, name) for i, name in enumerate("qkv"))
        variant, site = self._decide(q, k, v, args, kwargs)
        if variant is None:
            self.record(*site)
            return self._exact(func, args, kwargs)
        return self._attend(variant, site, [q, k, v], args, kwargs)

    def container_function(self, *args, **kwargs):
        """The override as current core calls it when q, k, v come in AttentionTensorContainers (there is no `func`:
        core's wrapper passes only the call's arguments). The decision reads the tensors in place (`peek`). An 8-bit
        call takes them out, so that our call holds their only references, and hands that ownership to the kernel
        (`kernels._sdpa.sdpa_taking`): on a config it has already run in this process, each 16-bit tensor is freed as
        soon as its 8-bit copy exists (q, then k, then v where P·V is 8-bit; the 16-bit P·V reads v to the end), so
        that the call's peak stays under SDPA's q+k+v+output; on a config's first call they are kept until the kernel
        returns, so that a failure can still fall back to exact attention on them. Either way they are gone before
        the output is reshaped. An exact call hands the containers on untouched (`_exact_containers`), so the next
        function may release them its own way."""
        variant, site = self._decide(*(c.peek() for c in args[:3]), args, kwargs)
        if variant is None:
            self.record(*site)
            return self._exact_containers(args, kwargs)
        return self._attend(variant, site, [c.take() for c in args[:3]], args, kwargs, owned=True)

    def _decide(self, q, k, v, args, kwargs):
        """(variant, site) of one call: the 8-bit variant it runs, or None when it runs exactly; site is what
        `record` takes (for an exact call, the reason first). Keeps no reference to q, k or v."""
        heads = _arg(args, kwargs, 3, "heads")
        mask = _arg(args, kwargs, 4, "mask")
        skip_reshape = bool(kwargs.get("skip_reshape", False))
        to = kwargs.get("transformer_options") or {}
        fw = _forward.get()
        if fw is None:
            fw = _Forward(*_step_of(to))
        nq = q.shape[2] if skip_reshape else q.shape[1]
        nk = k.shape[2] if skip_reshape else k.shape[1]
        block, group, gidx, kind = _locate(fw, to, nq, nk)
        step = fw.step
        if fw.calibrating:
            self._measure(q, k, v, heads, mask, skip_reshape, kwargs, block, group, gidx, kind)
            return None, ("exact:calibration", step, block, kind)
        variant = self.schedule.variant(step, fw.num_steps, block, kind, group=group, group_index=gidx)
        why = "exact:schedule" if variant is None else _why_exact(q, k, v, heads, mask, skip_reshape, kwargs)
        if why is not None:
            return None, (why, step, block, kind)
        return variant, (step, block, kind)

    def _attend(self, variant, site, qkv: list, args, kwargs, owned=False):
        """Run the kernel on `qkv` ([q, k, v], emptied on the way in; owned: its only references, taken out of core's
        containers) and record which path ran."""
        sparse = variant.startswith("sparse:")
        if sparse:
            _sparse.last_density()  # forget an earlier call's: a call that falls back to SDPA sets none
        before = kernel_counters()
        out = _sage_hnd(qkv, _arg(args, kwargs, 3, "heads"), bool(kwargs.get("skip_reshape", False)), variant,
                        bool(kwargs.get("enable_gqa", False)), kwargs.get("scale"), owned)
        after = kernel_counters()
        ran = [p for p in after if after[p] != before.get(p, 0)]
        self.record(ran[0] if len(ran) == 1 else f"8bit:{variant}", *site,
                    _sparse.last_density() if sparse else None)
        return _from_hnd(out, bool(kwargs.get("skip_output_reshape", False)))

    def _exact_containers(self, args, kwargs):
        """An exact call whose q, k, v are in containers. To an earlier override that takes containers, they go
        as they are; to any other earlier override, as tensors, with core's selected attention as its `func`;
        without one, to core's selected attention, whose own container path then runs (comfy-kitchen's INT8, for
        one, releases them once quantized). Core's wrapper set `_inside_attn_wrapper` in kwargs, so that function
        runs directly and does not come back to us."""
        previous = self.previous
        if previous is not None and getattr(previous, "container_function", None) is not None:
            return previous.container_function(*args, **kwargs)
        core = _core_attention()
        if previous is None:
            return core(*args, **kwargs)
        return previous(core, *(c.take() for c in args[:3]), *args[3:], **kwargs)

    def _measure(self, q, k, v, heads, mask, skip_reshape, kwargs, block, group, gidx, kind):
        """Calibration: measure the 8-bit variants on this call where the kernel would run it."""
        if block is None or _why_exact(q, k, v, heads, mask, skip_reshape, kwargs) is not None:
            return
        qh, kh, vh = _to_hnd(q, k, v, heads, skip_reshape)
        gqa, scale = bool(kwargs.get("enable_gqa", False)), kwargs.get("scale")
        if fallback_reason(qh, kh, vh, scale=scale, enable_gqa=gqa) is None:
            self.calibrator.observe(f"{block}:{kind}", qh, kh, vh, scale=scale, group=group, group_index=gidx)

    def _calibration_starts(self, x, step=None, num_steps=None) -> bool:
        """Before a model call: True when this call must measure (the first call, or with sparse calibration the
        first call of a later step range); installs a loaded or new decision."""
        cal = self.calibrator
        if cal is None or not self.enabled or not isinstance(x, torch.Tensor):
            return False
        if not cal.pending:
            clause = cal.range_due(step, num_steps)
            if clause is not None:
                cal.start_range(clause)
            return clause is not None
        if cal.start(x.device):
            return True
        self.schedule = self._calibrated()
        return False

    def _calibration_done(self, ok: bool) -> None:
        if not ok:
            self.calibrator.abort()  # interrupted: measure again on the next call
            return
        self.calibrator.finish()
        self.schedule = self._calibrated()

    def _calibrated(self) -> Schedule:
        """The base schedule with the calibration's decision (a manual sparse level stays on the self sites it
        runs 8-bit: `Calibration.merged`)."""
        return self.calibrator.schedule(self.base_schedule)

    # ---- wrappers: per forward and per sampling run ------------------------------------------------------
    def apply_model_wrapper(self, executor, *args, **kwargs):
        to = kwargs.get("transformer_options", args[5] if len(args) > 5 else None) or {}
        step, n = _step_of(to)
        x = args[0] if args else None
        calibrating = self._calibration_starts(x, step, n)
        token = _forward.set(_Forward(step, n, calibrating))
        ok = False
        sync = isinstance(x, torch.Tensor) and x.is_cuda
        if sync:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        try:
            out = executor(*args, **kwargs)
            ok = True
            return out
        finally:
            if sync:
                torch.cuda.synchronize(x.device)
            dt = time.perf_counter() - t0
            _forward.reset(token)
            if calibrating:
                self._calibration_done(ok)
            with self._lock:
                self.run["steps"][step] += dt
                self.run["forwards"] += 1

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        sigmas = kwargs.get("sigmas", args[3] if len(args) > 3 else None)
        n = int(sigmas.shape[-1]) - 1 if isinstance(sigmas, torch.Tensor) else None
        if self.enabled and n is not None and n > 0:
            self.schedule.check(num_steps=n)  # a step out of range fails before the first step runs
        self.new_run(n)
        t0 = time.perf_counter()
        try:
            return executor(*args, **kwargs)
        finally:
            self.run["wall"] = time.perf_counter() - t0
            self.run["finished"] = True
            if self.verbose:
                for line in summary(self).splitlines():
                    log.info(line)
                print(summary(self))

    def block_patch(self, flat, group, gidx, previous):
        def patch(args, extra):
            fw = _forward.get()
            saved = None
            if fw is not None:
                saved = (fw.block, fw.block_calls)
                fw.block, fw.block_calls = (flat, group, gidx), 0
            try:
                if previous is not None:
                    return previous(args, extra)
                return extra["original_block"](args)
            finally:
                if fw is not None:
                    fw.block, fw.block_calls = saved
        return patch


def _why_exact(q, k, v, heads, mask, skip_reshape, kwargs) -> str | None:
    """Why a call must run the original attention whatever the schedule says (None: the kernel may run)."""
    if kwargs.get("low_precision_attention", True) is False:
        return "exact:low_precision_off"
    if mask is not None:
        return "exact:mask"
    if q.dtype == torch.float32 or q.dtype not in (torch.float16, torch.bfloat16):
        return "exact:fp32" if q.dtype == torch.float32 else "exact:dtype"
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "exact:cpu"
    if q.device.type not in ("cpu", "cuda"):
        return "exact:device"
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] < 8:
        return "exact:gpu"
    dh = q.shape[-1] if skip_reshape else q.shape[-1] // heads
    if not 1 <= dh <= MAX_HEAD_DIM or (not skip_reshape and q.shape[-1] % heads):
        return "exact:head_dim"
    if v.shape[-1] != k.shape[-1]:
        return "exact:head_dim"
    return None


def _to_hnd(q, k, v, heads, skip_reshape):
    """[B, H, N, D] views of ComfyUI's [B, N, H*D] (or already [B, H, N, D] with skip_reshape)."""
    if skip_reshape:
        return q, k, v
    b, dh = q.shape[0], q.shape[-1] // heads
    return tuple(t.view(b, -1, heads, dh).transpose(1, 2) for t in (q, k, v))


def _sage_hnd(qkv: list, heads, skip_reshape, pv, enable_gqa, scale=None, owned=False):
    """`sage_sdpa` on q, k, v taken out of `qkv` (emptied). owned: the list holds their only references (core's
    containers): `sdpa_taking` then releases each 16-bit tensor as soon as its 8-bit copy exists, where this config
    already ran in this process, else when the kernel returns. Otherwise (plain tensors, which the caller holds) the
    kernel gets them as `sage_sdpa` arguments. scale: current core's attention functions take one (None: 1/sqrt(head
    dim))."""
    qkv[:] = _to_hnd(*qkv, heads, skip_reshape)  # views replace the tensors: the list still holds the only references
    if owned:
        return sdpa_taking(qkv, scale=scale, enable_gqa=enable_gqa, pv=pv)
    qh, kh, vh = qkv
    qkv.clear()
    return sage_sdpa(qh, kh, vh, scale=scale, enable_gqa=enable_gqa, pv=pv)


def _from_hnd(out, skip_output_reshape):
    """The kernel's [B, H, N, D] in the layout ComfyUI asked for ([B, N, H*D] is a copy)."""
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def _core_attention():
    """Core's selected attention function (`optimized_attention`: the default, or what --use-ck-attention,
    --use-sage-attention ... chose): what exact calls run where core gave us containers, and with them no `func`."""
    return importlib.import_module("comfy.ldm.modules.attention").optimized_attention


def _arg(args, kwargs, i, name):
    if len(args) > i:
        return args[i]
    return kwargs.get(name)


def _step_of(to: dict):
    sig, sample = to.get("sigmas"), to.get("sample_sigmas")
    if sig is None or sample is None:
        return None, None
    s = float(sig.max()) if isinstance(sig, torch.Tensor) else float(sig)
    return step_index(s, sample.tolist() if isinstance(sample, torch.Tensor) else sample)


def _locate(fw: _Forward, to: dict, nq: int, nk: int):
    """(flat block, group, group index, kind) of one attention call."""
    ub = to.get("block")
    if isinstance(ub, (tuple, list)) and len(ub) == 2:
        key = (ub[0], int(ub[1]), int(to.get("block_index", 0) or 0))
        if key not in fw.unet_keys:
            fw.unet_keys[key] = len(fw.unet_keys)
        calls = fw.unet_calls[key]
        fw.unet_calls[key] += 1
        return fw.unet_keys[key], str(ub[0]), int(ub[1]), ("self" if calls == 0 else "cross")
    if fw.block is not None:
        flat, group, gidx = fw.block
        kind = "self" if fw.block_calls == 0 else "cross"
        fw.block_calls += 1
        return flat, group, gidx, kind
    kind = "self" if nq == nk else "cross"
    if kind == "self" or fw.counter < 0:
        fw.counter += 1
    return fw.counter, None, None, kind


# ---- model structure ----------------------------------------------------------------------------------------
_DIT_LISTS = (("double_blocks", "double_block", "double"), ("single_blocks", "single_block", "single"),
              ("blocks", "double_block", "double"), ("transformer_blocks", "double_block", "double"))


def structure_of(diffusion_model) -> dict:
    """{"family": ..., "num_blocks": flat count or None, "groups": {group: count}, "patches": [(key, i, flat,
    group)]} read from the module tree (never changed)."""
    dm = diffusion_model
    if hasattr(dm, "input_blocks") and hasattr(dm, "output_blocks"):
        n_tb = sum(1 for m in dm.modules() if type(m).__name__ == "BasicTransformerBlock")
        return {"family": "unet", "num_blocks": n_tb or None,
                "groups": {"input": len(dm.input_blocks), "middle": 1, "output": len(dm.output_blocks)},
                "patches": []}
    patches, groups, flat = [], {}, 0
    seen_double = False
    for attr, key, group in _DIT_LISTS:
        blocks = getattr(dm, attr, None)
        if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks):
            continue
        if key == "double_block" and seen_double:
            continue
        seen_double = seen_double or key == "double_block"
        groups[group] = len(blocks)
        for i in range(len(blocks)):
            patches.append((key, i, flat, group))
            flat += 1
    if patches:
        return {"family": type(dm).__name__, "num_blocks": flat, "groups": groups, "patches": patches}
    joint = getattr(dm, "joint_blocks", None)
    if isinstance(joint, torch.nn.ModuleList):
        return {"family": type(dm).__name__, "num_blocks": len(joint), "groups": {}, "patches": []}
    return {"family": type(dm).__name__, "num_blocks": None, "groups": {}, "patches": []}


def check_hook():
    """Raise HookMissing on a ComfyUI without transformer_options["optimized_attention_override"]."""
    import inspect

    import comfy.ldm.modules.attention as attention

    try:
        src = inspect.getsource(attention)
    except (OSError, TypeError):
        src = ""
    if "optimized_attention_override" not in src:
        try:
            import comfyui_version

            have = comfyui_version.__version__
        except Exception:
            have = "unknown"
        raise HookMissing(f"Apply SageAttention needs ComfyUI {MIN_COMFYUI_VERSION} or newer (it uses "
                          f"transformer_options['optimized_attention_override']); this ComfyUI is {have}. "
                          "Update ComfyUI.")


# ---- current core: its registry of named attention functions, and what it had selected -----------------------------
ATTENTION_NAME = "comfy_sage"  # our attention's name in core's registry
CORE_SPARSE_CALLBACK = "block_sparse_attention"  # key of core's Model Sparse Attention's per-step re-install
_FLAGS = {"comfy_kitchen_int8": "--use-ck-attention", "sage": "--use-sage-attention",
          "flash": "--use-flash-attention"}  # core's flags that make these its default attention
_NAMED = SageState(True, "auto", None, False, {"family": None, "num_blocks": None}, label="registered")


def _named_attention(*args, **kwargs):
    """Our attention as a function of core's registry: 8-bit wherever the kernel applies, with the pack's defaults
    (pv auto, every call, no schedule and nobody to report to); core's selected attention elsewhere."""
    return _NAMED(_core_attention(), *args, **kwargs)


def register_attention() -> bool:
    """Put our attention in core's registry under ATTENTION_NAME (`register_attention_function`), so that tools
    selecting attention by name (`get_attention_function`, then `set_model_optimized_attention`, as the Model
    Attention Backend node does) can pick it. Once per process: a name already taken, by us or by someone else, is
    left alone (core would warn). Reads core from sys.modules and never imports it; False where core is not loaded
    or has no registry."""
    core = sys.modules.get("comfy.ldm.modules.attention")
    register, wrap = getattr(core, "register_attention_function", None), getattr(core, "wrap_attn", None)
    get = getattr(core, "get_attention_function", None)
    if register is None or wrap is None or get is None:
        return False
    have = get(ATTENTION_NAME, None)
    if have is not None:
        return bool(getattr(have, "comfy_sage", False))
    fn = wrap(_named_attention)  # core's own dispatch in front of it: overrides, containers, _inside_attn_wrapper
    fn.container_function = _NAMED.container_function  # what set_model_optimized_attention carries over
    fn.comfy_sage = True
    register(ATTENTION_NAME, fn)
    return True


def _attention_name(fn) -> str:
    """Core's registry name of an attention function, else its own name."""
    core = sys.modules.get("comfy.ldm.modules.attention")
    for name, f in (getattr(core, "REGISTERED_ATTENTION_FUNCTIONS", None) or {}).items():
        if f is fn:
            return name
    return getattr(fn, "__name__", type(fn).__name__)


def _closure_value(fn, var):
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    for name, cell in zip(code.co_freevars if code is not None else (), cells):
        if name == var:
            try:
                return cell.cell_contents
            except ValueError:  # an empty cell
                return None
    return None


def _core_sparse(fn) -> bool:
    """Whether `fn` (an override or a block patch) comes from core's Model Sparse Attention node."""
    return "nodes_sparse_attention" in (getattr(fn, "__module__", None) or "")


def _sparse_settings(patch) -> str:
    """The method and level of core's Model Sparse Attention, from the options object its override closes over."""
    ratio, tau = getattr(patch, "topk_ratio", None), getattr(patch, "tau", None)
    if getattr(patch, "vsa", False) and ratio:
        return f" (vsa, keep {ratio:.0%})"
    if ratio:
        return f" (sla, keep {ratio:.0%})"
    return f" (sol-attn, tau {tau:g})" if isinstance(tau, (int, float)) else ""


def describe_override(fn) -> str:
    """A transformer_options["optimized_attention_override"] in words, for the report."""
    if isinstance(fn, SageState):
        return f"comfy_sage [{fn.label}]"
    module, qual = getattr(fn, "__module__", None) or "", getattr(fn, "__qualname__", None) or type(fn).__qualname__
    if _core_sparse(fn):
        return "core's Model Sparse Attention" + _sparse_settings(_closure_value(fn, "patch"))
    if "set_model_optimized_attention" in qual:  # ModelPatcher's setter, which the Model Attention Backend node uses
        chosen = _closure_value(fn, "optimized_attention")
        return "the model's attention backend" + (f" {_attention_name(chosen)}" if chosen is not None else "")
    return f"{module}.{qual}".strip(".")


def core_selection(diffusion_model, previous, enabled=True) -> tuple:
    """What core had selected for a model's attention when our node was applied, one line each: core's default
    attention function (set by flags such as --use-ck-attention), the override that was on the hook, and the
    per-layer attention configs the checkpoint carries (core's `preferred_attention`)."""
    lines = []
    default = getattr(sys.modules.get("comfy.ldm.modules.attention"), "optimized_attention", None)
    if default is not None:
        name = _attention_name(default)
        lines.append(f"default attention {name}" + (f" ({_FLAGS[name]})" if name in _FLAGS else ""))
    if previous is not None:
        lines.append(f"override before ours: {describe_override(previous)} "
                     + ("(our exact calls go to it)" if enabled else "(it runs every call: this node is off)"))
    configs, usable = Counter(), Counter()
    for m in diffusion_model.modules():
        config = getattr(m, "config", None) if type(m).__name__ == "ComfyAttention" else None
        if isinstance(config, dict):
            configs[str(config.get("attention"))] += 1
            usable[str(config.get("attention"))] += getattr(m, "function", None) is not None
    lines += [f"checkpoint's per-layer attention: {method} on {n} layers ({usable[method]} usable on this device), "
              "used where no override is on the hook" for method, n in sorted(configs.items())]
    return tuple(lines)


def install(model, *, enabled=True, pv="auto", schedule: Schedule | None = None, verbose=False, label="sage",
            calibrate: dict | None = None, sparse: tuple | None = None, replace: SageState | None = None):
    """Clone a ComfyUI ModelPatcher and install our override and wrappers on the clone; return (clone, state).
    calibrate: None, or `Calibrator` options (budget, directory, recalibrate, sparse) to calibrate per site.
    sparse: (rules, budget) of SageAttention Sparse: a schedule holding only a sparse level and dense steps, and the
    budget of its calibration (level "auto").
    replace: the state `model` carries, whose place the new one takes (its wrappers go; the override it chained to
    is chained to) instead of being chained to: chained states would each decide every call. Apply or Calibrate on
    a model a Sparse node patched replace its state the same way and keep its rules."""
    import comfy.patcher_extension as pe

    prior = state_of(model)
    if replace is None and sparse is None and prior is not None and prior.sparse is not None:
        replace, sparse = prior, prior.sparse
        if sparse[0].sparse == "auto":  # the levels still need measuring; a Calibrate node's own options win
            calibrate = {"budget": sparse[1], **_kept(prior.calibrator), **(calibrate or {}), "sparse": True}
    if sparse is not None:
        schedule = sparse[0].compose(schedule)
        if enabled and not label.endswith("+sparse"):
            label += "+sparse"
    if enabled:
        check_hook()
        register_attention()
    dm = model.get_model_object("diffusion_model")
    structure = structure_of(dm)
    calibrator = None
    if calibrate is not None and enabled:
        calibrator = Calibrator(weights_fingerprint(model, dm), model=structure["family"], pv=pv, **calibrate)
    sched = schedule or ALL
    if enabled:
        sched.check(num_blocks=structure["num_blocks"], groups=structure["groups"] or None)
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    previous = replace.previous if replace is not None else to.get("optimized_attention_override")
    core = core_selection(dm, previous, enabled)
    # Core's Model Sparse Attention puts its override back on top of the hook before every step; on this clone that
    # would put it in front of ours. Ours decides here: the re-install goes (the model it came from keeps it), and
    # its override stays where it was, below ours, running our exact calls.
    prepare = getattr(getattr(pe, "CallbacksMP", None), "ON_PREPARE_STATE", "on_prepare_state")
    if enabled and CORE_SPARSE_CALLBACK in (getattr(m, "callbacks", None) or {}).get(prepare, {}):
        m.remove_callbacks_with_key(prepare, CORE_SPARSE_CALLBACK)
        core += ("core's Model Sparse Attention re-installs itself each step: dropped on this model, ours stays "
                 "on top",)
    dit_below = to.get("patches_replace", {}).get("dit", {}).values()
    if enabled and (replace is None or not replace.enabled) and any(_core_sparse(p) for p in dit_below):
        core += ("core's Model Sparse Attention's block patches (MiniMax-H3: attention outside the hook): dropped on "
                 "this model",)
    state = SageState(enabled, pv, sched, verbose, structure, previous_override=previous, label=label,
                      calibrator=calibrator, sparse=sparse, core=core)
    if replace is not None:  # the clone's copies of its wrapper lists; the original model keeps its own
        for kind in (pe.WrappersMP.APPLY_MODEL, pe.WrappersMP.OUTER_SAMPLE):
            to.get("wrappers", {}).get(kind, {}).pop(WRAPPER_KEY, None)
    if enabled:
        to["optimized_attention_override"] = state
        # block patches only mark the block of the current forward, for whichever state runs it: an enabled
        # replaced state's stay
        if replace is None or not replace.enabled:
            dit = to.setdefault("patches_replace", {}).setdefault("dit", {})
            for key, i, flat, group in structure["patches"]:
                below = dit.get((key, i))  # core's sparse block patch would bypass the hook: ours decides here
                dit[(key, i)] = state.block_patch(flat, group, i, None if _core_sparse(below) else below)
    elif replace is not None:  # default attention: what the replaced state chained to
        to.pop("optimized_attention_override", None)
        if previous is not None:
            to["optimized_attention_override"] = previous
    pe.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, state.apply_model_wrapper, m.model_options,
                            is_model_options=True)
    pe.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, state.outer_sample_wrapper, m.model_options,
                            is_model_options=True)
    to["comfy_sage_state"] = state
    return m, state


def install_sparse(model, rules: Schedule, budget: float):
    """SageAttention Sparse: `rules` hold a manual level, or "auto" (calibrate the levels per site at `budget`).
    On a model that already runs our attention (Apply, Calibrate, another Sparse) the new state takes that one's
    place and settings: enabled, pv, print_summary, its schedule (an earlier Sparse node's rules give way to
    `rules`), the override it chained to, and its calibration's directory and recalibrate (with a manual level, its
    dense calibration too). Without one it is Apply SageAttention with the defaults, plus `rules`."""
    prior = state_of(model)
    old = prior.calibrator if prior is not None else None
    calibrate = {"budget": budget, "sparse": True} if rules.sparse == "auto" else None
    if old is not None:
        calibrate = {**_kept(old), **calibrate} if calibrate else {**_kept(old), "budget": old.budget}
    if prior is None:
        return install(model, calibrate=calibrate, sparse=(rules, budget))
    return install(model, enabled=prior.enabled, pv=prior.pv, verbose=prior.verbose, label=prior.label,
                   schedule=dataclasses.replace(prior.base_schedule, sparse="", dense_steps=()), calibrate=calibrate,
                   sparse=(rules, budget), replace=prior)


def _kept(calibrator: Calibrator | None) -> dict:
    """The options of a replaced state's calibration that a new one keeps."""
    return {} if calibrator is None else {"directory": calibrator.directory, "recalibrate": calibrator.recalibrate}


def weights_fingerprint(model, diffusion_model) -> str:
    """`kernels.calibrate.fingerprint` of the weights the sampler will see, the same whether or not ComfyUI has
    merged the model's patches (LoRAs) into them yet: merged weights are read from the patcher's backup of the
    originals, and the patches themselves (keys, strengths, a sample of their tensors) are hashed as `extra`."""
    backup = getattr(model, "backup", None) or {}  # keyed by the BaseModel's state-dict names

    def tensors():
        for name, t in list(diffusion_model.named_parameters()) + list(diffusion_model.named_buffers()):
            bk = backup.get("diffusion_model." + name)
            yield name, getattr(bk, "weight", bk) if bk is not None else t

    patches = getattr(model, "patches", None) or {}
    extra = [(str(key), _describe_patch(patches[key])) for key in sorted(patches, key=str)]
    return fingerprint(tensors(), extra=extra or None)


def _describe_patch(x, depth=0):
    """A short, deterministic description of a ModelPatcher patch entry (tensors by shape and a few values)."""
    if isinstance(x, torch.Tensor):
        try:
            flat = x.detach().reshape(-1)
            values = flat[:: max(1, flat.numel() // 8)][:8].float().tolist()
        except Exception:  # noqa: BLE001 - unreadable (quantized, meta): shape and dtype still count
            values = None
        return tuple(x.shape), str(x.dtype), values
    if isinstance(x, (bool, int, float, str, type(None))):
        return x
    if depth > 4:
        return type(x).__name__
    if isinstance(x, (list, tuple)):
        return tuple(_describe_patch(y, depth + 1) for y in x)
    weights = getattr(x, "weights", None)  # comfy.weight_adapter adapters keep their tensors here
    return (type(x).__name__, _describe_patch(weights, depth + 1)) if weights is not None else type(x).__name__


def state_of(model) -> SageState | None:
    if model is None:
        return None
    to = getattr(model, "model_options", {}).get("transformer_options", {})
    st = to.get("comfy_sage_state")
    return st if isinstance(st, SageState) else None


# ---- reporting -----------------------------------------------------------------------------------------------
def _total_time(run) -> float:
    return float(sum(run["steps"].values()))


def summary(state: SageState, baseline: SageState | None = None, model=None) -> str:
    """The report. model: the model the report node got; a note when a node after ours put another override on its
    attention hook (that one then decides first)."""
    run = state.run
    name = f"comfy_sage [{state.label}]"
    if not state.enabled:
        name += " (disabled: default attention)"
    lines = [f"{name}: schedule {state.schedule.describe()}; model {state.structure.get('family')}, "
             f"{state.structure.get('num_blocks')} blocks"]
    if state.core:
        lines += ["  core's attention when applied:"] + [f"    {line}" for line in state.core]
    hook = getattr(model, "model_options", {}).get("transformer_options", {}).get("optimized_attention_override")
    if state.enabled and hook is not None and hook is not state:
        lines.append(f"  note: a node after this one put {describe_override(hook)} on this model's attention hook: "
                     "it decides first, ours runs only the calls it hands on, if any")
    if state.calibrator is not None:
        lines += ["  " + line for line in state.calibrator.describe()]
    if not run["forwards"]:
        lines.append("  no sampling recorded yet")
        return "\n".join(lines)
    total = _total_time(run)
    lines.append(f"  {run['forwards']} model calls, model time {total:.3f}s, sampling wall {run['wall']:.3f}s")
    paths = run["paths"]
    eight = sum(c for p, c in paths.items() if p.startswith(("int8", "8bit")))
    if paths:
        lines.append(f"  attention calls: {sum(paths.values())} ({eight} 8-bit): "
                     + ", ".join(f"{p}={c}" for p, c in sorted(paths.items())))
    dens = {site: s / n for site, (s, n) in run["density"].items() if n}
    if dens:
        calls = sum(n for _, n in run["density"].values())
        mean = sum(s for s, _ in run["density"].values()) / calls
        lines.append(f"  sparse: {paths.get('int8-sparse', 0)} int8-sparse calls on {len(dens)} sites, mean density "
                     f"{mean:.1%} (share of key blocks computed); per site:")
        sites = [f"{b}:{k} {d:.1%}" for (b, k), d in sorted(dens.items())]
        lines += ["    " + ", ".join(sites[i:i + 8]) for i in range(0, len(sites), 8)]
    for step in sorted(run["steps"], key=lambda s: (s is None, s if s is not None else 0)):
        calls = run["step_calls"].get(step, {})
        e = sum(c for p, c in calls.items() if p.startswith(("int8", "8bit")))
        n = sum(calls.values())
        lines.append(f"  step {step if step is not None else '?'}: {run['steps'][step] * 1000:.1f} ms"
                     + (f", attention {e}/{n} 8-bit" if n else ""))
    if baseline is not None and baseline.run["forwards"]:
        bt = _total_time(baseline.run)
        if total > 0:
            lines.append(f"  speed-up vs {baseline.label}: {bt / total:.3f}x (model time {bt:.3f}s -> {total:.3f}s)")
    return "\n".join(lines)


def timing_ratio(reference: SageState | None, test: SageState | None) -> float | None:
    if reference is None or test is None:
        return None
    a, b = _total_time(reference.run), _total_time(test.run)
    if a <= 0 or b <= 0 or not math.isfinite(a / b):
        return None
    return a / b
