"""`enable_sage` / `disable_sage`: switch the attention of diffusers models (or of every denoiser of a pipeline)
to comfy_sage, optionally following a `Schedule` (which steps, blocks and attention kinds run 8-bit).

Per attention module ("site"):
  * processors that call diffusers' dispatcher get `_attention_backend` = one of our registered backends;
  * processors that call F.scaled_dot_product_attention themselves are wrapped (`SageSDPAProcessor`);
  * anything else (e.g. a processor doing its own math) is left alone and listed in `SageReport.skipped`.
Wan's self-attention modules also get their q/k rotation in one Triton pass (`wan_rope`, `fuse_rope=True`).

Blocks are numbered as the shared schedule model expects: a flat index in forward order over the model's
top-level block lists (`blocks`, `transformer_blocks`, then `single_transformer_blocks`...), plus the group
("double" for the first list, "single" for a `single_*` list) and the index inside that list. Attention outside
those lists (HunyuanVideo's token refiner) has no block index.

Steps: before every forward of a denoiser, a pre-hook reads the pipeline scheduler's position (`step_index`, or
the model's `timestep` matched against `scheduler.timesteps` for schedulers without one) and sets each site's
variant for that step. A bare model (no pipeline) with a step-dependent schedule takes its step from
`set_step(model, step, num_steps)`.

Calibration (`calibrate=True`): the first forward of each denoiser loads the saved per-site decision for its
weights (`kernels.calibrate`), or, when there is none, runs every attention exactly while measuring the 8-bit
variants on a sample of query rows at each site; the decision becomes the schedule's `overrides` from the next
forward on, and is saved for later runs.

Sparse attention (`sparse=`): self-attention sites run the block-sparse 8-bit kernel, at a fixed level
("keep=F", "ratio=F") or at the level calibration measured per site ("auto": the sparsest within the budget, dense
where attention is not local); cross-attention stays dense, and so do the `dense_steps`. The density each sparse
site ran at is recorded after every call of the site (`SageReport.densities()`).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from ..kernels import fallback_reason
from ..kernels._sparse import last_density
from ..kernels.calibrate import DEFAULT_BUDGET, Calibrator, fingerprint
from ..kernels.schedule import Schedule, ScheduleError, parse_sparse
from .backend import (PV_BY_BACKEND, SageSDPAProcessor, backend_member, check_pv, is_sparse, kept_keys,
                      wrap_sdpa_processor)
from . import wan_rope

log = logging.getLogger("comfy_sage")

_STATE_ATTR = "_comfy_sage_state"
# pipeline components that are denoisers; VAEs, text and image encoders are never touched
_DENOISER_PREFIXES = ("transformer", "unet", "prior", "decoder_transformer")


@dataclass
class Site:
    name: str
    module: torch.nn.Module
    route: str                  # "dispatch" | "sdpa"
    kind: str                   # "self" | "cross"
    block: int | None
    group: str | None
    group_index: int | None
    original: object            # the processor's previous _attention_backend, or the processor itself
    variant: object = "unset"   # pv currently applied ("auto"/"fp16"/"fp8"/"sparse:keep=0.9"...) or None (exact)


@dataclass
class SageReport:
    """What `enable_sage` did to one model."""
    model: str
    sites: list = field(default_factory=list)      # [(name, route, kind, block)]
    skipped: list = field(default_factory=list)    # [(name, why)]
    num_blocks: int = 0
    groups: dict = field(default_factory=dict)
    calibrator: Calibrator | None = None           # with calibrate=True: status, decision per site (.describe())
    rope_fused: int = 0                            # Wan attention modules whose rotation runs in our pass
    sparse: str = ""                               # the sparse level asked for: "auto", "keep=F", "ratio=F"
    sparse_sites: dict = field(default_factory=dict)  # {site name: [variant, density sum, sparse calls]}

    def densities(self) -> dict:
        """{site name: mean density of its sparse calls (share of query x key blocks computed), None before any}
        for every site that has run a sparse variant."""
        return {name: (total / n if n else None) for name, (_, total, n) in self.sparse_sites.items()}

    def __str__(self):
        routes = {}
        for _, route, _, _ in self.sites:
            routes[route] = routes.get(route, 0) + 1
        s = f"{self.model}: {len(self.sites)} attention sites -> comfy_sage ({routes})"
        if self.rope_fused:
            s += f"; rotary embedding in one pass at {self.rope_fused}"
        if self.skipped:
            s += f"; left alone: {len(self.skipped)} ({self.skipped[0][1]})"
        if self.calibrator is not None:
            s += "\n" + "\n".join(self.calibrator.describe())
        if self.sparse_sites:
            s += f"\nsparse ({self.sparse or 'from the schedule'}) at {len(self.sparse_sites)} sites:"
            for name, (variant, total, n) in self.sparse_sites.items():
                s += f"\n  {name}: {variant}" + (f", mean density {total / n:.1%} over {n} calls" if n else "")
        return s


class _State:
    def __init__(self, model, sites, schedule, pv, step_source, report, calibrator=None):
        self.model = model
        self.sites = sites
        self.schedule = schedule
        self.base_schedule = schedule    # the user's schedule, before calibration's overrides
        self.calibrator = calibrator
        self.cal_hooks = []              # hooks of a calibration forward in progress
        self.pv = pv
        self.step_source = step_source   # callable(args, kwargs) -> (step, num_steps) or None
        self.manual_step = None
        self.report = report
        self.applied_for = object()
        self.hook = None
        self.ropes = []                  # wan_rope.FusedRope per Wan attention module
        self.trace = None                # list of (step, num_steps, site name, variant) when tracing
        self.density_hooks = []          # one per site, where the schedule may run sparse

    def resolve(self, step, num_steps):
        out = []
        for s in self.sites:
            if self.schedule is None:
                v = self.pv
            else:
                v = self.schedule.variant(step, num_steps, s.block, s.kind, group=s.group,
                                          group_index=s.group_index)
                if v == "auto":
                    v = self.pv
            out.append(v)
        return out

    def apply(self, step, num_steps):
        key = (step, num_steps)
        if key == self.applied_for:
            return
        for s, v in zip(self.sites, self.resolve(step, num_steps)):
            if v != s.variant:
                _set_site(s, v)
                if is_sparse(v):
                    self.report.sparse_sites.setdefault(s.name, [v, 0.0, 0])[0] = v
        self.applied_for = key
        if self.trace is not None:
            self.trace.append((step, num_steps, {s.name: s.variant for s in self.sites}))


def _set_site(site, pv):
    proc = site.module.processor
    if site.route == "dispatch":
        proc._attention_backend = backend_member(pv)
    else:
        proc.pv = pv
    site.variant = pv


def _density_hook(report, site):
    """After each call of a site: the density its sparse kernel call ran at (`kernels._sparse.last_density`, this
    thread's, read and cleared, so a call that ran no sparse kernel records nothing)."""

    def hook(module, args, output):
        if torch.compiler.is_compiling():
            return
        d = last_density()
        if d is not None and is_sparse(site.variant):
            entry = report.sparse_sites.setdefault(site.name, [site.variant, 0.0, 0])
            entry[1] += d
            entry[2] += 1

    return hook


def _may_run_sparse(schedule) -> bool:
    return schedule is not None and bool(schedule.sparse or any(map(is_sparse, schedule.overrides.values())))


def _step_dependent(schedule) -> bool:
    return schedule is not None and bool(schedule.steps or schedule.exact_steps
                                         or (schedule.dense_steps and _may_run_sparse(schedule)))


def _attention_classes():
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention

    return (Attention, MochiAttention, AttentionModuleMixin)


def _calls_sdpa(processor) -> bool:
    import inspect

    try:
        src = inspect.getsource(type(processor).__call__)
    except (OSError, TypeError):
        return False
    return "scaled_dot_product_attention" in src


def _block_lists(model):
    """[(attribute name, ModuleList, group)] of the model's top-level block lists, in registration order."""
    lists = [(n, m) for n, m in model.named_children()
             if isinstance(m, torch.nn.ModuleList) and re.search(r"blocks$", n) and len(m)]
    out = []
    for n, m in lists:
        group = "single" if n.startswith("single") else "double"
        out.append((n, m, group))
    return out


def _discover(model):
    classes = _attention_classes()
    lists = _block_lists(model)
    flat_base, offset = {}, 0
    groups = {}
    for n, m, g in lists:
        flat_base[n] = offset
        offset += len(m)
        groups[g] = groups.get(g, 0) + len(m)
    sites, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, classes):
            continue
        proc = getattr(module, "processor", None)
        if proc is None:
            continue
        parts = name.split(".")
        block = group = gidx = None
        if len(parts) >= 2 and parts[0] in flat_base and parts[1].isdigit():
            gidx = int(parts[1])
            block = flat_base[parts[0]] + gidx
            group = next(g for n, _, g in lists if n == parts[0])
        cross = getattr(module, "is_cross_attention", None)
        kind = "cross" if (cross if cross is not None else parts[-1] == "attn2") else "self"
        if isinstance(proc, SageSDPAProcessor):
            raise RuntimeError(f"{name} already runs comfy_sage (call disable_sage first)")
        if hasattr(proc, "_attention_backend"):
            sites.append(Site(name, module, "dispatch", kind, block, group, gidx, proc._attention_backend))
        elif _calls_sdpa(proc):
            sites.append(Site(name, module, "sdpa", kind, block, group, gidx, proc))
        else:
            skipped.append((name, f"{type(proc).__name__} neither dispatches nor calls SDPA"))
    return sites, skipped, offset, groups


def _scheduler_step(pipe):
    """A step source reading the pipeline's scheduler at each denoiser forward."""

    def source(args, kwargs):
        sched = getattr(pipe, "scheduler", None)
        ts = getattr(sched, "timesteps", None)
        if ts is None:
            return None
        n = len(ts)
        idx = getattr(sched, "step_index", None) if hasattr(type(sched), "step_index") else None
        if idx is None and hasattr(type(sched), "step_index"):
            idx = getattr(sched, "begin_index", None) or 0
        if idx is None:  # schedulers without step_index (DDIM...): match the timestep the model is given
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            if t is None:
                return None
            t = torch.as_tensor(t).flatten()[:1].to(ts.device, torch.float64)
            idx = int(torch.argmin((ts.to(torch.float64) - t).abs()))
        return min(int(idx), n - 1), n

    return source


def _pre_hook(state):
    def hook(module, args, kwargs):
        cal, measuring = state.calibrator, False
        if cal is not None and cal.pending:  # first forward: load the saved decision, or measure this one
            measuring = cal.start(_input_device(module, args, kwargs))
            if not measuring:
                _install_decision(state)
        if state.schedule is None:
            if measuring:
                _begin_measuring(state)
            return None
        step = state.manual_step or (state.step_source(args, kwargs) if state.step_source else None)
        if step is None:
            if _step_dependent(state.schedule):
                raise RuntimeError(
                    f"comfy_sage: the schedule selects steps ({state.schedule.describe()}) but "
                    f"{type(module).__name__} runs outside a pipeline: enable_sage(pipeline, ...) or call "
                    "comfy_sage.pipelines.set_step(model, step, num_steps) before each step")
            step = (None, None)
        state.apply(*step)
        clause = None if measuring or cal is None else cal.range_due(*step)
        if clause is not None:  # sparse calibration: the first forward of a later step range measures it again
            cal.start_range(clause)
            measuring = True
        if measuring:
            _begin_measuring(state)
        return None

    return hook


# ---- calibration ---------------------------------------------------------------------------------------------
_SDPA = torch._C._nn.scaled_dot_product_attention  # what both routes end in when a site runs exact


class _MeasureSDPA(TorchFunctionMode):
    """Active during one site's attention-module forward in the calibration forward: each SDPA call there runs
    exactly as asked (its result is the model's), and its q, k, v are measured for the site."""

    def __init__(self, calibrator, site):
        super().__init__()
        self.calibrator, self.site = calibrator, site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _SDPA:
            self._observe(*args, **kwargs)
        return out

    def _observe(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        calls = [(query, key, value)]
        kept = None if is_causal else kept_keys(attn_mask, query, key)
        if kept is not None:
            # a key-padding mask: the same softmax as leaving the masked keys out, which is what 8-bit runs
            calls = [(query[b:b + 1], *(t[b:b + 1] if idx is None else t[b:b + 1].index_select(2, idx)
                                        for t in (key, value)))
                     for b, idx in enumerate(kept) if idx is None or idx.numel()]
            attn_mask = None
        s = self.site
        for q, k, v in calls:
            if fallback_reason(q, k, v, attn_mask, dropout_p, scale, enable_gqa, is_causal) is None:
                self.calibrator.observe(f"{s.block}:{s.kind}", q, k, v, is_causal=is_causal, scale=scale,
                                        group=s.group, group_index=s.group_index)


def _input_device(module, args, kwargs):
    for t in (kwargs.get("hidden_states"), *args, *kwargs.values()):
        if isinstance(t, torch.Tensor):
            return t.device
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _begin_measuring(state):
    """This forward runs every site exactly and measures each site with a block index."""
    cal = state.calibrator
    for s in state.sites:
        if s.variant is not None:
            _set_site(s, None)
    state.applied_for = object()  # the next forward applies the decided variants

    def enter(site):
        stack = []

        def pre(module, args):
            mode = _MeasureSDPA(cal, site)
            mode.__enter__()
            stack.append(mode)

        def post(module, args, output):
            if stack:
                stack.pop().__exit__(None, None, None)
        return pre, post

    hooks = []
    for s in state.sites:
        if s.block is None:
            continue
        pre, post = enter(s)
        hooks.append(s.module.register_forward_pre_hook(pre))
        hooks.append(s.module.register_forward_hook(post, always_call=True))

    def done(module, args, kwargs, output):
        _remove_cal_hooks(state)
        if output is None:  # the forward raised: measure again next time
            cal.abort()
            return
        cal.finish()
        _install_decision(state)

    hooks.append(state.model.register_forward_hook(done, with_kwargs=True, always_call=True))
    state.cal_hooks = hooks


def _remove_cal_hooks(state):
    for h in state.cal_hooks:
        h.remove()
    state.cal_hooks = []


def _install_decision(state):
    """From now on: the user's schedule with the calibrated per-site overrides (a fixed sparse level stays on the
    self sites calibration leaves 8-bit: `Calibration.merged`)."""
    sched = state.calibrator.schedule(state.base_schedule or Schedule())
    if sched != state.schedule:
        state.schedule = sched
        state.applied_for = object()


def _models_of(target):
    """[(label, model, step_source)] for a diffusers model or pipeline."""
    from diffusers import DiffusionPipeline
    from diffusers.models.modeling_utils import ModelMixin

    if isinstance(target, DiffusionPipeline):
        out = []
        for name, comp in target.components.items():
            if isinstance(comp, ModelMixin) and name.startswith(_DENOISER_PREFIXES):
                out.append((name, comp, _scheduler_step(target)))
        if not out:
            raise ValueError(f"{type(target).__name__} has no denoiser (transformer/unet) component to switch: "
                             f"its components are {', '.join(target.components)}")
        return out
    if isinstance(target, torch.nn.Module):
        return [(type(target).__name__, target, None)]
    raise TypeError(f"enable_sage takes a diffusers pipeline or model, got {type(target).__name__}")


def _sparse_level(sparse) -> str:
    """enable_sage's `sparse` as a Schedule's: "" (dense), "auto", or a normalized "keep=F" / "ratio=F"."""
    if sparse is None or (isinstance(sparse, str) and not sparse.strip()):
        return ""
    if isinstance(sparse, str) and sparse.strip().lower() == "auto":
        return "auto"
    try:
        if isinstance(sparse, (int, float)) and not isinstance(sparse, bool) and math.isfinite(sparse):
            mode, share = parse_sparse(f"keep={float(sparse):g}")
        elif isinstance(sparse, str):
            mode, share = parse_sparse(sparse)
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"sparse={sparse!r}: use None (dense), 'auto', 'keep=F', 'ratio=F' or a number F "
                         "(= keep=F), with F in (0, 1]") from None
    return f"{mode}={share:g}"


def with_sparse(schedule: Schedule | None, sparse=None, dense_steps: str = "") -> Schedule | None:
    """`schedule` with enable_sage's `sparse` level (over the schedule's own) and `dense_steps` added; ValueError
    names a bad argument."""
    level = _sparse_level(sparse)
    if not (level or dense_steps):
        return schedule
    extra = Schedule.from_strings(sparse=level, dense_steps=dense_steps or "")
    schedule = extra if schedule is None else extra.compose(schedule)
    if dense_steps and not _may_run_sparse(schedule):
        raise ValueError(f"dense_steps={dense_steps!r} only applies with sparse attention (sparse=...)")
    return schedule


def enable_sage(model_or_pipeline, schedule: Schedule | None = None, pv: str = "auto", *, calibrate: bool = False,
                budget: float = DEFAULT_BUDGET, calibration_dir=None, recalibrate: bool = False,
                fuse_rope: bool = True, sparse=None, dense_steps: str = "") -> list[SageReport]:
    """Route every attention of a diffusers model (or of each denoiser of a pipeline: Wan 2.2's `transformer`
    and `transformer_2` included; VAE and text encoders untouched) through comfy_sage.

    schedule: a `kernels.schedule.Schedule` (steps/blocks/kinds that run 8-bit; elsewhere exact attention), or
    None for 8-bit everywhere. pv: P·V precision where the schedule says "auto" ("auto", "fp16", "fp8", "int8",
    "fine").
    calibrate: keep exact attention at the sites (block x self/cross) where 8-bit errs by more than `budget`
    (relative L1 against exact attention), FP8 or FP16 P·V elsewhere (the fastest within budget). The first
    forward of each model measures (and runs exactly) unless a decision for its weights is saved in
    `calibration_dir` (default `kernels.calibrate.default_dir()`); `recalibrate=True` measures anyway.
    fuse_rope: rotate Wan's q and k in one Triton pass instead of diffusers' torch ops (the same values but for
    one bf16 unit in the last place in ~2e-5 of them; `pipelines.wan_rope`); False keeps diffusers' rotation.
    sparse: None or "" (dense attention), "keep=F" (every 8-bit self-attention site visits the key blocks holding a
    share F of each query tile's pooled attention mass; a number F means the same), "ratio=F" (a fixed share F of
    the key blocks), or "auto" (calibration, turned on by it, also measures the self-attention sites at sparse
    levels and takes the sparsest within `budget`; sites whose attention is not local stay dense). Cross-attention
    stays dense. It sets the schedule's `sparse` (over the `schedule`'s own); with `calibrate` and a fixed level,
    calibration decides exact or 8-bit per site and the 8-bit self-attention sites run the level. dense_steps: steps
    (the `steps` grammar, e.g. "0-1" or "0.0-0.1") that run dense 8-bit attention although `sparse` is set.
    Returns one `SageReport` per model (`.calibrator.describe()`: the per-site decisions once made;
    `.densities()`: the mean density of each site's sparse calls so far). Masks are honoured (exact fallback),
    never dropped.
    """
    check_pv(pv)
    if is_sparse(pv):
        raise ValueError(f"pv={pv!r}: pass the level as sparse={pv[len('sparse:'):]!r} (pv is the P·V precision; "
                         "sparse runs at self-attention sites only)")
    if schedule is not None and not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a comfy_sage Schedule (Schedule.from_strings(...)), got "
                        f"{type(schedule).__name__}")
    schedule = with_sparse(schedule, sparse, dense_steps)
    if schedule is not None and schedule.sparse == "auto":
        calibrate = True  # the per-site levels are what calibration measures
    reports = []
    for label, model, source in _models_of(model_or_pipeline):
        if getattr(model, _STATE_ATTR, None) is not None:
            disable_sage(model)
        sites, skipped, num_blocks, groups = _discover(model)
        if not sites:
            raise ValueError(f"{label} ({type(model).__name__}) has no attention that comfy_sage can route: "
                             + ("; ".join(f"{n}: {w}" for n, w in skipped[:3]) or "no attention modules"))
        if schedule is not None:
            schedule.check(num_blocks=num_blocks if num_blocks else None, groups=groups or None)
        for s in sites:
            if s.route == "sdpa":
                s.module.set_processor(wrap_sdpa_processor(s.original, pv))
                s.variant = pv
        cal = None
        if calibrate:
            cal = Calibrator(fingerprint(model), model=type(model).__name__, budget=budget, pv=pv,
                             directory=calibration_dir, recalibrate=recalibrate,
                             sparse=schedule is not None and schedule.sparse == "auto")
        report = SageReport(label, [(s.name, s.route, s.kind, s.block) for s in sites], skipped, num_blocks, groups,
                            cal, sparse=schedule.sparse if schedule is not None else "")
        state = _State(model, sites, schedule, pv, source, report, cal)
        # Static part now: without a schedule every site runs `pv`; with one, step 0 of an unknown count until
        # the first forward tells the step.
        if not _step_dependent(schedule):
            state.apply(None, None)
        for s in sites:
            if s.variant == "unset":
                _set_site(s, None)
        state.hook = model.register_forward_pre_hook(_pre_hook(state), with_kwargs=True)
        if _may_run_sparse(schedule):
            state.density_hooks = [s.module.register_forward_hook(_density_hook(report, s)) for s in sites]
        if fuse_rope:
            state.ropes = [wan_rope.FusedRope(s.module) for s in sites
                           if s.kind == "self" and wan_rope.applies(s.module)]
            report.rope_fused = len(state.ropes)
        setattr(model, _STATE_ATTR, state)
        if skipped:
            log.warning("comfy_sage: %s", report)
        reports.append(report)
    return reports


def disable_sage(model_or_pipeline) -> None:
    """Undo `enable_sage`: original backends and processors back, hooks removed. A no-op where not enabled."""
    for _, model, _ in _models_of(model_or_pipeline):
        state = getattr(model, _STATE_ATTR, None)
        if state is None:
            continue
        state.hook.remove()
        for h in (*state.ropes, *state.density_hooks):
            h.remove()
        _remove_cal_hooks(state)
        for s in state.sites:
            if s.route == "dispatch":
                s.module.processor._attention_backend = s.original
            else:
                s.module.set_processor(s.original)
        delattr(model, _STATE_ATTR)


def sage_state(model):
    """The enable_sage state of a model (None when not enabled); `.report`, `.sites`, `.trace`."""
    return getattr(model, _STATE_ATTR, None)


def set_step(model, step: int, num_steps: int) -> None:
    """For a bare model with a step-dependent schedule: the step the next forwards belong to."""
    state = sage_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not enabled: call enable_sage(model, schedule) first")
    if not (isinstance(step, int) and isinstance(num_steps, int) and 0 <= step < num_steps):
        raise ValueError(f"set_step needs 0 <= step < num_steps (integers), got step={step!r}, "
                         f"num_steps={num_steps!r}")
    state.manual_step = (step, num_steps)


def is_sage_backend(value) -> bool:
    return getattr(value, "value", value) in PV_BY_BACKEND


__all__ = ["enable_sage", "disable_sage", "set_step", "sage_state", "SageReport", "Schedule", "ScheduleError"]
