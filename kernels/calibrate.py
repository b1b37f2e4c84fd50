"""Per-site calibration: measure how far each 8-bit variant lands from exact attention, keep 8-bit only where it
stays under an error budget, and remember the decision per model.

Three layers, all torch-only (no comfy, no diffusers):

* `variant_errors(q, k, v, ...)` — one attention call: relative L1 error of each P·V variant of the real kernel
  against fp32 attention, on a sample of query rows (all keys). Q is quantized per token, and K's smoothing mean
  and scales come from all keys, so a sampled row is computed exactly as it is in the full call.
* `Calibrator` — one model: load a saved decision, or measure every site of one forward, decide per site
  (`choose`), save the result as JSON. A site is "<flat block>:<self|cross>", the key of `Schedule.overrides`.
* `Calibration` — the saved result: the decision as a `Schedule` whose `overrides` say fp8 / fp16 / fine / exact per
  site (edit the file to change a decision), plus the measured errors, so a new budget re-decides without
  measuring again.

Files live in `$COMFY_SAGE_CALIBRATION_DIR`, else `$XDG_CACHE_HOME/comfy_sage/calibration` (default
`~/.cache/comfy_sage/calibration`), named `<model>-<weights fingerprint>-<arch>.json` (`-<arch>-fp16.json` for a
forced P·V): the decision depends on the weights (see `fingerprint`) and on the GPU arch (which variants exist
and which is faster).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import _arch, _fallback
from ._api import sage_attention
from ._counters import _store as _counter_store
from .schedule import Schedule, _parse_steps, _step_matches

log = logging.getLogger("comfy_sage")

# Relative L1 against fp32 attention. FP8 P·V measures ~0.037 and FP16 P·V ~0.011 on randn inputs, ~0.02-0.04
# with the key offsets of real diffusion layers (README's accuracy table); 0.05 keeps both on ordinary layers and
# sends a layer to exact attention only when 8-bit is clearly off (planted outliers measure 0.3 and more).
DEFAULT_BUDGET = 0.05
DEFAULT_ROWS = 256          # query rows sampled per (batch, head)
FORMAT = "comfy_sage.calibration/1"
ENV_DIR = "COMFY_SAGE_CALIBRATION_DIR"
_REF_CHUNK_ELEMS = 1 << 26  # bounds the fp32 scores (and K/V copies) of the reference: 256 MiB per chunk
_RE_SITE = re.compile(r"^(\d+):(self|cross)$")
# Sparse calibration measures the self-attention sites again at the first forward in each of these step ranges
# (grammar of Schedule.steps): early, noisy steps and late ones can differ in how local attention is. The first
# forward's levels hold for every step; a range whose sparsest level within budget differs gets its own.
SPARSE_RANGES = ("0.5-1.0",)
RANGE_MIN_STEPS = 8  # the range's exact forward costs at most an eighth of sampling; shorter runs keep one level


# ---- one attention call --------------------------------------------------------------------------------------
def sample_rows(n: int, rows: int = DEFAULT_ROWS) -> torch.Tensor:
    """Up to `rows` evenly spaced row indices of 0..n-1, first and last included."""
    if n <= rows:
        return torch.arange(n)
    return torch.linspace(0, n - 1, rows).round().long().unique()


@contextlib.contextmanager
def _uncounted():
    """Calibration's kernel runs are not calls of the model: keep them out of `kernels.counters()` (counts other
    threads make meanwhile are lost too; calibration runs once per model)."""
    with _counter_store.lock:
        saved, density = dict(_counter_store.calls), list(_counter_store.density)
    try:
        yield
    finally:
        with _counter_store.lock:
            _counter_store.calls.clear()
            _counter_store.calls.update(saved)
            _counter_store.density[:] = density


def _fallback_calls() -> int:
    with _counter_store.lock:
        return _counter_store.calls[_fallback.KERNEL_ERROR] + _counter_store.calls[_fallback.OUT_OF_MEMORY]


def _reference(q, k, v, idx, scale, is_causal):
    """fp32 attention of the query rows `q` ([B, H, R, D], rows `idx` of the full query) over all keys;
    [B, H, R, D] fp32. Chunked over (batch, head) so the fp32 scores and K/V copies stay bounded."""
    B, H, R, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    flat = torch.arange(B * H, device=q.device)
    b_of, h_of = flat // H, flat % H
    kvh_of = h_of // (H // Hkv)
    mask = None
    if is_causal:
        mask = torch.arange(Nk, device=q.device)[None, :] > idx.to(q.device)[:, None]  # query i sees keys <= i
    chunk = max(1, _REF_CHUNK_ELEMS // (R * Nk + 2 * Nk * D))
    outs = []
    for s0 in range(0, B * H, chunk):
        b, h, kvh = b_of[s0:s0 + chunk], h_of[s0:s0 + chunk], kvh_of[s0:s0 + chunk]
        s = torch.matmul(q[b, h].float(), k[b, kvh].float().transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(mask, float("-inf"))
        outs.append(torch.matmul(torch.softmax(s, dim=-1), v[b, kvh].float()))
    return torch.cat(outs).reshape(B, H, R, D)


def _as_hnd(layout, *ts):
    if layout == "NHD":
        return tuple(t.transpose(1, 2) for t in ts)
    if layout != "HND":
        raise ValueError(f"unknown layout {layout!r}: use 'HND' or 'NHD'")
    return ts


def _rel_l1(out, ref) -> float:
    if not bool(torch.isfinite(out).all()):
        return math.inf
    den = float(ref.abs().sum(dtype=torch.float64))
    num = float((out.float() - ref).abs().sum(dtype=torch.float64))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def variant_errors(q, k, v, *, is_causal=False, scale=None, variants=("fp8", "fp16", "fine"), rows=DEFAULT_ROWS,
                   layout="HND") -> dict[str, float]:
    """Relative L1 error (sum |out - exact| / sum |exact|) of `sage_attention(..., pv=variant)` against fp32
    attention, for each variant, on up to `rows` evenly spaced query rows per head (all keys).

    q, k, v as `sage_attention` takes them (HND [B, H, N, D] or NHD), fp16/bf16. A variant whose output has a
    NaN or Inf measures `inf` (so does every variant when the exact output itself is not finite). Causal calls
    run the kernel on every row (a row's mask depends on its position) and compare the sampled rows only.
    The kernel calls are not counted in `kernels.counters()`. A variant whose kernel failed here (it ran exact
    SDPA instead: `_fallback`) measures `inf`, so calibration never picks it.
    """
    q, k, v = _as_hnd(layout, q, k, v)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, N, D], got shape {tuple(q.shape)}")
    Nq, D = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    idx = sample_rows(Nq, rows).to(q.device)
    qs = q.index_select(2, idx)
    with torch.no_grad():
        ref = _reference(qs, k, v, idx, scale, is_causal)
        ref_ok = bool(torch.isfinite(ref).all())
        errors = {}
        with _uncounted():
            for pv in variants:
                fell_back = _fallback_calls()
                if is_causal:
                    out = sage_attention(q, k, v, is_causal=True, scale=scale, pv=pv).index_select(2, idx)
                else:
                    out = sage_attention(qs, k, v, scale=scale, pv=pv)
                ran = _fallback_calls() == fell_back
                errors[pv] = _rel_l1(out, ref) if ref_ok and ran else math.inf
    return errors


def candidates(device, head_dim: int, pv: str = "auto") -> tuple[str, ...]:
    """The 8-bit variants worth measuring on `device` at `head_dim`, fastest first: what `pv="auto"` runs there
    (the arch table's choice per head dim), then the arch's other paths in its `pv_order` (FP8 only where the GPU
    has it; "fine" and "int8" are the most accurate, "int8" also where a q channel carries an outlier).
    A forced `pv` is measured before "fine". () where the 8-bit kernel does not run."""
    entry = _arch.arch_of(torch.device(device))
    if entry is None:
        return ()
    if pv in ("fp16", "fp8", "int8", "fine"):
        return tuple(dict.fromkeys((pv, "fine"))) if pv != "fp8" or entry.fp8 else ("fine",)
    return tuple(dict.fromkeys((entry.pv_for(head_dim), *(p for p in entry.pv_order if p != "fp8" or entry.fp8))))


def choose(errors: dict[str, float], budget: float = DEFAULT_BUDGET) -> str:
    """The first variant (errors are in preference order) whose error is within `budget`, else "exact"."""
    for pv, err in errors.items():
        if err <= budget:
            return pv
    return "exact"


# Sparse attention (_sparse.py): the levels a self-attention site is measured at, densest first, and the density
# above which a site stays dense (skipping less would not repay the selection's cost; random q/k keep > 85% at 0.9).
# Pooled scores are flatter than the rows they average, so `keep` overestimates the mass a level needs; the low
# levels reach the sparse ones. H200, Wan 720p shape, local inputs (bench/results/sparse-*): keep 0.4 / 0.3 / 0.25 /
# 0.2 computed 29 / 21 / 17 / 13% of the blocks at relative L1 0.014 / 0.020 / 0.024 / 0.030.
SPARSE_LEVELS = (0.99, 0.9, 0.8, 0.6, 0.4, 0.3, 0.25, 0.2)
SPARSE_MAX_DENSITY = 0.85


def sparse_errors(q, k, v, *, is_causal=False, scale=None, levels=SPARSE_LEVELS, pv="auto", rows=DEFAULT_ROWS,
                  layout="HND") -> dict[str, tuple[float, float]]:
    """"sparse:keep=F" -> (relative L1 against fp32 attention on up to `rows` evenly spaced query rows per head,
    density) of `sparse_attention` at each `keep` level (pv "auto": the arch's sparse P·V path). The calls run whole
    (a tile's selection pools all its rows) and are not counted; a call that fell back to exact attention measures
    (inf, 1.0)."""
    from ._sparse import sparse_attention

    q, k, v = _as_hnd(layout, q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    idx = sample_rows(q.shape[2], rows).to(q.device)
    out = {}
    with torch.no_grad():
        ref = _reference(q.index_select(2, idx), k, v, idx, scale, is_causal)
        ref_ok = bool(torch.isfinite(ref).all())
        with _uncounted():
            for keep in levels:
                o, density = sparse_attention(q, k, v, keep=keep, is_causal=is_causal, scale=scale, pv=pv,
                                              return_density=True)
                ok = ref_ok and density is not None
                out[f"sparse:keep={keep:g}"] = (_rel_l1(o.index_select(2, idx), ref) if ok else math.inf,
                                                 density if ok else 1.0)
    return out


def choose_sparse(errors: dict[str, tuple[float, float]], budget: float = DEFAULT_BUDGET,
                  max_density: float = SPARSE_MAX_DENSITY) -> str | None:
    """The sparsest measured level (lowest density) within `budget` and at most `max_density`, or None: dense."""
    ok = [(density, lvl) for lvl, (err, density) in errors.items() if err <= budget and density <= max_density]
    return min(ok)[1] if ok else None


# ---- one model -----------------------------------------------------------------------------------------------
def fingerprint(model, *, extra=None, samples: int = 64) -> str:
    """A cheap, deterministic hash of a model's weights (hex, 20 chars). `model`: a torch module, or an iterable
    of (name, tensor).

    Hashes every parameter's and buffer's name, shape and dtype, plus `samples` evenly strided values of each
    tensor (read as fp32), and `repr(extra)` (e.g. LoRA patches not yet merged into the weights). This is not a
    full checksum: it reads a few values per tensor so that a 14B model hashes in well under a second, yet any
    other checkpoint, fine-tune, dtype or merged LoRA changes it. Tensors whose values cannot be read (meta,
    quantized subclasses) count by name, shape and dtype only.
    """
    h = hashlib.sha256()
    if isinstance(model, torch.nn.Module):
        model = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in model:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        try:
            flat = t.detach().reshape(-1)
            n = flat.numel()
            if n:
                step = max(1, n // samples)
                h.update(flat[::step][:samples].float().cpu().numpy().tobytes())
        except Exception:  # noqa: BLE001 - unreadable values: name/shape/dtype still count
            h.update(b"?")
    if extra is not None:
        h.update(repr(extra).encode())
    return h.hexdigest()[:20]


def default_dir() -> Path:
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comfy_sage" / "calibration"


def cache_path(fingerprint: str, arch: str, model: str = "", directory=None) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.]+", "_", model)[:60].strip("_")
    stem = f"{name}-{fingerprint}-{arch}" if name else f"{fingerprint}-{arch}"
    return Path(directory).expanduser() / f"{stem}.json" if directory else default_dir() / f"{stem}.json"


def _site_key(site: str) -> tuple[int, str]:
    m = _RE_SITE.match(site)
    if not m:
        raise ValueError(f"bad site {site!r}: use '<block>:self' or '<block>:cross'")
    return int(m.group(1)), m.group(2)


def _num(x) -> float | str:
    return x if math.isfinite(x) else "inf"  # JSON has no Infinity


@dataclass
class Calibration:
    """A model's per-site decision (`schedule.overrides`) and what it was based on.

    sites: {"<block>:<kind>": {"errors": {variant: rel L1, fastest first}, "group": ..., "group_index": ...,
    and where sparse levels were measured "sparse": {"sparse:keep=F": [rel L1, density]}}}: a site whose dense choice
    is 8-bit takes the sparsest level within the budget (`choose_sparse`).
    """
    schedule: Schedule
    sites: dict = field(default_factory=dict)
    budget: float = DEFAULT_BUDGET
    fingerprint: str = ""
    arch: str = ""
    model: str = ""
    rows: int = DEFAULT_ROWS
    seconds: float = 0.0

    @classmethod
    def decide(cls, sites: dict, budget: float = DEFAULT_BUDGET, **meta) -> "Calibration":
        overrides, ranges = {}, {}
        for s, info in sites.items():
            dense = overrides[s] = choose(info["errors"], budget)
            if dense == "exact" or not info.get("sparse"):
                continue
            overrides[s] = choose_sparse(info["sparse"], budget) or dense
            for clause, levels in (info.get("sparse_ranges") or {}).items():
                v = choose_sparse(levels, budget) or dense
                if v != overrides[s]:
                    ranges.setdefault(clause, {})[s] = v
        return cls(Schedule(overrides=overrides, step_overrides=ranges), sites, float(budget), **meta)

    def ranges_measured(self) -> set:
        """The step ranges (SPARSE_RANGES) whose sparse levels were measured."""
        return {c for info in self.sites.values() for c in (info.get("sparse_ranges") or {})}

    def redecide(self, budget: float) -> "Calibration":
        return Calibration.decide(self.sites, budget, fingerprint=self.fingerprint, arch=self.arch,
                                  model=self.model, rows=self.rows, seconds=self.seconds)

    def merged(self, base: Schedule | None) -> Schedule:
        """`base` with this decision as its overrides. "exact" always applies; an 8-bit choice only where `base`
        runs 8-bit on that block and kind (calibration never turns 8-bit on where the user keeps it exact);
        sites `base` already overrides keep the user's value; `base`'s step rules still apply to every site. Where
        `base` sets a fixed sparse level, the self-attention sites decided 8-bit run that level (a dense override
        would otherwise hide it)."""
        base = base or Schedule()
        level = f"sparse:{base.sparse}" if base.sparse not in ("", "auto") else None

        def kept(overrides):
            add = {}
            for site, val in overrides.items():
                if site in base.overrides:
                    continue
                block, kind = _site_key(site)
                info = self.sites.get(site, {})
                allowed = base.attention in ("all", kind) and base.block_uses_8bit(
                    block, info.get("group"), info.get("group_index"))
                if val == "exact" or allowed:
                    add[site] = level if level and kind == "self" and val != "exact" else val
            return add
        # per step range levels only where calibration chose the levels (a fixed level holds on every step)
        ranges = {} if level else {c: kept(ov) for c, ov in self.schedule.step_overrides.items()}
        return base.with_overrides(kept(self.schedule.overrides), {c: ov for c, ov in ranges.items() if ov})

    def lines(self) -> list[str]:
        """One line per site: decision and measured errors."""
        out = []
        for site in sorted(self.schedule.overrides, key=_site_key):
            errs = self.sites.get(site, {}).get("errors", {})
            e = ", ".join(f"{pv} {err:.4f}" if math.isfinite(err) else f"{pv} non-finite" for pv, err in errs.items())
            sp = self.sites.get(site, {}).get("sparse", {})
            e += "".join(f", {lvl[7:]} {err:.4f} at {d:.0%}" for lvl, (err, d) in sp.items() if math.isfinite(err))
            out.append(f"{site:>10} -> {self.schedule.overrides[site]:5}  ({e})" if e else
                       f"{site:>10} -> {self.schedule.overrides[site]}")
            for clause, levels in (self.sites.get(site, {}).get("sparse_ranges") or {}).items():
                v = self.schedule.step_overrides.get(clause, {}).get(site, "the same")
                e = ", ".join(f"{lvl[7:]} {err:.4f} at {d:.0%}" for lvl, (err, d) in levels.items()
                              if math.isfinite(err))
                out.append(f"{'':>10}    steps {clause}: {v}" + (f"  ({e})" if e else ""))
        return out

    def summary(self) -> str:
        ov = self.schedule.overrides
        n = {v: sum(1 for x in ov.values() if x == v) for v in ("fp8", "fp16", "int8", "fine", "exact")}
        sparse = [x for x in ov.values() if x.startswith("sparse:")]
        ranges = "".join(f"; steps {c}: {len(o)} sites at another level" for c, o in
                         self.schedule.step_overrides.items())
        return (f"{len(ov)} sites, budget {self.budget:g} rel L1: fp8 {n['fp8']}, fp16 {n['fp16']}, int8 {n['int8']}, "
                f"fine {n['fine']}, " + (f"sparse {len(sparse)}, " if sparse else "") + f"exact {n['exact']}"
                + (f" ({', '.join(s for s, v in ov.items() if v == 'exact')})" if n["exact"] else "") + ranges)

    # ---- JSON ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        def levels(m):
            return {lvl: [_num(e), d] for lvl, (e, d) in m.items()}
        sites = {s: {**{k: v for k, v in info.items() if k not in ("errors", "sparse", "sparse_ranges")},
                     "errors": {pv: _num(e) for pv, e in info["errors"].items()},
                     **({"sparse": levels(info["sparse"])} if info.get("sparse") else {}),
                     **({"sparse_ranges": {c: levels(m) for c, m in info["sparse_ranges"].items()}}
                        if info.get("sparse_ranges") else {})}
                 for s, info in self.sites.items()}
        return {"format": FORMAT, "model": self.model, "fingerprint": self.fingerprint, "arch": self.arch,
                "budget": self.budget, "rows": self.rows, "seconds": round(self.seconds, 4),
                "schedule": self.schedule.to_dict(), "sites": sites}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a comfy_sage calibration file (expected format {FORMAT!r})")
        sites = {}
        for s, info in (d.get("sites") or {}).items():
            _site_key(s)
            sites[s] = {**info, "errors": {pv: float(e) for pv, e in (info.get("errors") or {}).items()}}
            if info.get("sparse"):
                sites[s]["sparse"] = {lvl: (float(e), float(d)) for lvl, (e, d) in info["sparse"].items()}
            if info.get("sparse_ranges"):
                sites[s]["sparse_ranges"] = {c: {lvl: (float(e), float(d)) for lvl, (e, d) in m.items()}
                                             for c, m in info["sparse_ranges"].items()}
        return cls(Schedule.from_dict(d["schedule"]), sites, float(d.get("budget", DEFAULT_BUDGET)),
                   str(d.get("fingerprint", "")), str(d.get("arch", "")), str(d.get("model", "")),
                   int(d.get("rows", DEFAULT_ROWS)), float(d.get("seconds", 0.0)))

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)  # a reader never sees half a file
        return path

    @classmethod
    def load(cls, path) -> "Calibration":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: calibration JSON does not parse: {e}") from e
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e


class Calibrator:
    """Calibration of one model during a real run.

    `start(device)` before a forward: loads the saved decision for these weights and this GPU arch (True means
    nothing was saved, or `recalibrate`: measure this forward); `observe(site, q, k, v, ...)` for each attention
    call of that forward (the caller runs exact attention for the output); `finish()` after it decides, saves and
    returns the `Calibration`. `schedule(base)` is what to run from then on. With `sparse`, self-attention sites
    are also measured at `SPARSE_LEVELS` and take the sparsest within the budget (saved in their own file); then,
    at the first forward in each of SPARSE_RANGES (`range_due(step, num_steps)`, then `start_range`, `observe` and
    `finish` as above), their levels are measured again for those steps.
    """

    def __init__(self, fingerprint: str, *, model: str = "", budget: float = DEFAULT_BUDGET, pv: str = "auto",
                 directory=None, recalibrate: bool = False, rows: int = DEFAULT_ROWS, sparse: bool = False):
        if not (isinstance(budget, (int, float)) and budget >= 0 and math.isfinite(budget)):
            raise ValueError(f"calibration budget must be a finite number >= 0 (relative L1), got {budget!r}")
        self.fingerprint, self.model, self.budget, self.pv = fingerprint, model, float(budget), pv
        self.directory, self.recalibrate, self.rows, self.sparse = directory, recalibrate, rows, bool(sparse)
        self.status = "pending"        # pending | measuring | loaded | measured | skipped
        self.result: Calibration | None = None
        self.path: Path | None = None
        self.note = ""
        self._sites: dict = {}
        self._arch = None
        self._seconds = 0.0
        self._lock = threading.Lock()
        self._warned = False
        self._range: str | None = None   # the step range being measured
        self._ranges_tried: set = set()

    @property
    def pending(self) -> bool:
        return self.status == "pending"

    def start(self, device) -> bool:
        """Load or prepare to measure; True when the coming forward must measure."""
        entry = _arch.arch_of(torch.device(device))
        if entry is None:
            self.status, self.note = "skipped", f"the 8-bit kernel does not run on {device}: nothing to calibrate"
            log.info("comfy_sage calibration: %s", self.note)
            return False
        self._arch = entry.name
        arch = entry.name if self.pv == "auto" else f"{entry.name}-{self.pv}"
        self.path = cache_path(self.fingerprint, arch + ("-sparse" if self.sparse else ""), self.model,
                               self.directory)
        if self.path.exists() and not self.recalibrate:
            try:
                cal = Calibration.load(self.path)
            except ValueError as e:
                log.warning("comfy_sage calibration: %s; measuring again", e)
            else:
                self.result, self.status, self.note = cal, "loaded", f"loaded {self.path}"
                if cal.budget != self.budget:  # the errors are saved: a new budget needs no new measurement
                    self.result = cal.redecide(self.budget)
                    self.note = f"re-decided {self.path} for budget {self.budget:g}"
                    self._save()
                log.info("comfy_sage calibration: %s", self.note)
                return False
        self.status, self._sites, self._seconds = "measuring", {}, 0.0
        return True

    def range_due(self, step: int | None, num_steps: int | None) -> str | None:
        """The step range (SPARSE_RANGES) that the forward at this step should measure, or None: sparse
        calibration with a decision (measured or loaded) where some self-attention site runs 8-bit, the step known
        in a run of at least RANGE_MIN_STEPS steps, and that range not measured yet."""
        if (not self.sparse or self.result is None or self.status not in ("measured", "loaded") or step is None
                or (num_steps or 0) < RANGE_MIN_STEPS or not self._range_sites()):
            return None
        done = self.result.ranges_measured() | self._ranges_tried
        for clause in SPARSE_RANGES:
            if clause not in done and _step_matches(_parse_steps(clause), int(step), int(num_steps)):
                return clause
        return None

    def start_range(self, clause: str) -> None:
        """The coming forward measures the sparse levels of `clause`'s steps (exact attention meanwhile)."""
        self._range, self._prior = clause, self.status
        self.status, self._sites, self._seconds = "measuring", {}, 0.0

    def _range_sites(self) -> set:
        """Self-attention sites the first measurement left on 8-bit, with sparse levels measured."""
        ov = self.result.schedule.overrides
        return {s for s, info in self.result.sites.items() if info.get("sparse") and ov.get(s) != "exact"}

    def _save(self):
        try:
            self.result.save(self.path)
        except OSError as e:
            self.note = f"could not save {self.path}: {e}"
            log.warning("comfy_sage calibration: %s", self.note)

    def observe(self, site: str, q, k, v, *, is_causal=False, scale=None, layout="HND", group=None,
                group_index=None) -> None:
        """Measure one attention call of `site`; repeated calls of a site keep the worst error per variant."""
        if self.status != "measuring":
            return
        _site_key(site)
        if self._range is not None:
            if site in self._range_sites():
                self._observe_range(site, q, k, v, is_causal=is_causal, scale=scale, layout=layout)
            return
        head_dim = q.shape[-1]
        variants = candidates(q.device, head_dim, self.pv)
        if not variants:
            return
        t0 = time.perf_counter()
        try:
            errs = variant_errors(q, k, v, is_causal=is_causal, scale=scale, variants=variants, rows=self.rows,
                                  layout=layout)
            sparse = (sparse_errors(q, k, v, is_causal=is_causal, scale=scale, rows=self.rows, layout=layout)
                      if self.sparse and site.endswith(":self") else {})
        except Exception as e:  # noqa: BLE001 - a variant that cannot run is a variant not to choose
            if not self._warned:
                log.warning("comfy_sage calibration: measuring %s failed (%s); keeping it exact", site, e)
                self._warned = True
            errs, sparse = {pv: math.inf for pv in variants}, {}
        with self._lock:
            self._seconds += time.perf_counter() - t0
            info = self._sites.setdefault(site, {"errors": {}, "group": group, "group_index": group_index,
                                                 "head_dim": int(head_dim)})
            for pv, e in errs.items():
                info["errors"][pv] = max(e, info["errors"].get(pv, 0.0))
            for lvl, (e, d) in sparse.items():  # the worst error and the densest selection of the site's calls
                e0, d0 = info.setdefault("sparse", {}).get(lvl, (0.0, 0.0))
                info["sparse"][lvl] = (max(e, e0), max(d, d0))

    def _observe_range(self, site, q, k, v, **kw):
        t0 = time.perf_counter()
        try:
            levels = sparse_errors(q, k, v, rows=self.rows, **kw)
        except Exception as e:  # noqa: BLE001 - the first measurement's levels hold for these steps
            log.warning("comfy_sage calibration: measuring %s at steps %s failed (%s)", site, self._range, e)
            return
        with self._lock:
            self._seconds += time.perf_counter() - t0
            mine = self._sites.setdefault(site, {})
            for lvl, (e, d) in levels.items():
                e0, d0 = mine.get(lvl, (0.0, 0.0))
                mine[lvl] = (max(e, e0), max(d, d0))

    def _finish_range(self) -> Calibration:
        clause, self._range = self._range, None
        self._ranges_tried.add(clause)
        sites = {s: dict(info) for s, info in self.result.sites.items()}
        for s, levels in self._sites.items():
            sites[s]["sparse_ranges"] = {**(sites[s].get("sparse_ranges") or {}), clause: levels}
        r = self.result
        self.result = Calibration.decide(sites, self.budget, fingerprint=r.fingerprint, arch=r.arch, model=r.model,
                                         rows=r.rows, seconds=r.seconds + self._seconds)
        self.status, self.note = "measured", f"saved {self.path} (steps {clause} measured)"
        self._save()
        log.info("comfy_sage calibration: steps %s: %s", clause, self.result.summary())
        return self.result

    def finish(self) -> Calibration | None:
        """Decide and save after the measuring forward; the result (None when no site could be measured)."""
        if self.status != "measuring":
            return self.result
        if self._range is not None:
            return self._finish_range()
        if not self._sites:
            self.status, self.note = "skipped", "no attention call could run the 8-bit kernel: nothing to save"
            log.info("comfy_sage calibration: %s", self.note)
            return None
        self.result = Calibration.decide(self._sites, self.budget, fingerprint=self.fingerprint, arch=self._arch,
                                         model=self.model, rows=self.rows, seconds=self._seconds)
        self.status, self.note = "measured", f"saved {self.path}"
        self._save()
        log.info("comfy_sage calibration: %s in %.2fs; %s", self.result.summary(), self._seconds, self.note)
        return self.result

    def abort(self) -> None:
        """The measuring forward did not complete: forget it; the next forward starts again."""
        if self.status == "measuring" and self._range is not None:  # the first decision stays; measure again later
            self.status, self._range, self._sites = self._prior, None, {}
        elif self.status == "measuring":
            self.status, self._sites = "pending", {}

    def schedule(self, base: Schedule | None) -> Schedule | None:
        """`base` with the decision applied (see `Calibration.merged`), or `base` while there is none."""
        return base if self.result is None else self.result.merged(base)

    def describe(self) -> list[str]:
        """Lines for reports: what happened, then one line per site."""
        if self.result is None:
            return [f"calibration: {self.status}" + (f" ({self.note})" if self.note else "")]
        how = {"loaded": "loaded", "measured": f"measured in {self.result.seconds:.2f}s"}.get(self.status,
                                                                                            self.status)
        return [f"calibration ({how}): {self.result.summary()}" + (f"; {self.note}" if self.note else ""),
                *("  " + line for line in self.result.lines())]
