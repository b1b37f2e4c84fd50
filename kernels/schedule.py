"""Schedules: which sampling steps, which blocks and which attention kinds run 8-bit attention, and with which P·V.

One model shared by the ComfyUI nodes (`nodes/`) and the diffusers adapters (`pipelines/`). Pure Python: it
imports neither torch, nor comfy, nor diffusers.

Grammar (whitespace around tokens is ignored; an empty string means "all")
--------------------------------------------------------------------------
steps, exact_steps::

    list   := "" | item ("," item)*
    item   := INT                  one step; negative counts from the end (-1 = the last step)
            | INT "-" INT          inclusive index range, e.g. "0-1", "-3--1" (the last three)
            | FRAC "-" FRAC        half-open fraction range of the schedule [a, b): step i of n is in it
                                   when a <= i/n < b ("0.9-1.0" = the last tenth, b = 1.0 reaches the end)
    INT    := ["-"] digits
    FRAC   := digits "." [digits] | "." digits        (a number in [0, 1]; a "." makes a bound a fraction)

blocks, exact_blocks::

    list   := "" | item ("," item)*
    item   := INT | INT "-" INT                 flat block index in forward order (0 = first block run)
            | GROUP                             every block of a group
            | GROUP ":" (INT | INT "-" INT)     blocks of a group by the model's own numbering
    GROUP  := "input" | "middle" | "output"     UNet (SD1.5, SDXL): ComfyUI's input_blocks/output_blocks ids
            | "double" | "single"               DiT double-stream / single-stream blocks (Flux, HunyuanVideo);
                                                single-stream DiTs (Wan, LTXV, Qwen-Image) have "double" only

attention: "all" | "self" | "cross" (joint attention of DiTs counts as "self"; "none" appears only from
composing "self" with "cross").   pv: "auto" | "fp16" | "fp8" | "int8" | "fine" (FP16 P·V and per-token K scales).

sparse: "" (dense) | "auto" (the per-site levels calibration measured, in `overrides`) | "keep=F" (every 8-bit
self-attention site visits the key blocks holding a share F of each query tile's pooled attention mass) |
"ratio=F" (a fixed share F of the key blocks). Cross-attention stays dense. dense_steps: steps (grammar of `steps`)
that run dense 8-bit attention although `sparse` is set (the first, noisiest steps, say).

overrides (what calibration writes): {"<flat block>:<self|cross>": "fp8" | "fp16" | "int8" | "fine" | "exact" |
"sparse:keep=F" | "sparse:ratio=F"}. A site with an override ignores the block and attention rules; the step rules
still apply to it ("exact" always wins). step_overrides: {steps clause: overrides}: on the steps a clause matches,
its sites take these values instead (calibration's per step range sparse levels, e.g. {"0.5-1.0": {"3:self":
"sparse:keep=0.3"}}); the first matching clause wins.

A step (or block) runs 8-bit when it matches `steps` (or `blocks`), or those are empty, and matches no item of
`exact_steps` (or `exact_blocks`). Composition (`a & b`, `a.compose(b)`) runs 8-bit only where both would: rules
are kept as clauses that must all hold; of two P·V choices the more precise wins (fp8 < fp16 < fine < exact).

Errors: every malformed token raises `ScheduleError` (a ValueError) whose message quotes the bad token:
"3-", "a-b", "5-2", "1.5-2" (fraction outside [0, 1]), "7" when only 5 steps are sampled (`check`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace

ATTENTION_KINDS = ("all", "self", "cross", "none")
PV_CHOICES = ("auto", "fp16", "fp8", "int8", "fine")
OVERRIDE_VALUES = ("fp8", "fp16", "int8", "fine", "exact")
# composing two choices keeps the more precise; any sparse level counts below every dense one
_PRECISION = {"sparse": -1, "fp8": 0, "fp16": 1, "int8": 2, "fine": 3, "exact": 4}
_RE_SPARSE = re.compile(r"^(keep|ratio)=(\d*\.?\d+)$")


def parse_sparse(level: str, field_name: str = "sparse") -> tuple[str, float]:
    """("keep" | "ratio", share) of a sparse level such as "keep=0.8" or "ratio=0.25" (share in (0, 1])."""
    m = _RE_SPARSE.match(str(level).strip().lower())
    if not m or not 0.0 < float(m.group(2)) <= 1.0:
        raise _err(field_name, str(level), "use keep=F or ratio=F with F in (0, 1], e.g. keep=0.9 or ratio=0.25")
    return m.group(1), float(m.group(2))


def sparse_variant(level: str) -> str:
    """The variant string a sparse level runs as ("sparse:keep=0.9"), normalized."""
    mode, share = parse_sparse(level)
    return f"sparse:{mode}={share:g}"


def _override_ok(val) -> bool:
    if val in OVERRIDE_VALUES:
        return True
    if isinstance(val, str) and val.startswith("sparse:"):
        try:
            parse_sparse(val[len("sparse:"):])
            return True
        except ValueError:
            return False
    return False


def _precision(val: str) -> int:
    return _PRECISION["sparse" if val.startswith("sparse:") else val]


def _more_precise_overrides(a: dict, b: dict) -> dict:
    """Site by site, the more precise of two override maps' values."""
    out = dict(a)
    for site, val in b.items():
        if site not in out or _precision(val) > _precision(out[site]):
            out[site] = val
    return out


def _checked_overrides(ov, field_name: str) -> dict:
    """A site -> value map, validated (ScheduleError names a bad site or value), sites stripped and sorted."""
    if not isinstance(ov, dict):
        raise ScheduleError(f"{field_name}: expected a dict, got {type(ov).__name__}", token=repr(ov), field=field_name)
    for site, val in ov.items():
        if not isinstance(site, str) or not _RE_SITE.match(site.strip()):
            raise ScheduleError(f"{field_name}: bad site {site!r}: use '<block>:self' or '<block>:cross'",
                                token=str(site), field=field_name)
        if not _override_ok(val):
            raise ScheduleError(f"{field_name}: bad value {val!r} for site {site!r}: use fp8, fp16, int8, fine, "
                                "exact or sparse:keep=F / sparse:ratio=F", token=str(val), field=field_name)
    return {k.strip(): v for k, v in sorted(ov.items())}
BLOCK_GROUPS = ("input", "middle", "output", "double", "single")
SCHEMA = "comfy_sage.schedule/1"

_INT = r"-?\d+"
_FRAC = r"(?:\d+\.\d*|\.\d+)"
_RE_INT = re.compile(rf"^({_INT})$")
_RE_INT_RANGE = re.compile(rf"^({_INT})\s*-\s*({_INT})$")
_RE_NUM_RANGE = re.compile(rf"^({_FRAC}|{_INT})\s*-\s*({_FRAC}|{_INT})$")
_RE_GROUP = re.compile(r"^([a-z]+)\s*(?::\s*(.*))?$")
_RE_SITE = re.compile(r"^(\d+):(self|cross)$")


class ScheduleError(ValueError):
    """A schedule string or value is malformed; `token` is the offending piece of text."""

    def __init__(self, message: str, token: str | None = None, field: str | None = None):
        super().__init__(message)
        self.token = token
        self.field = field


@dataclass(frozen=True)
class _Item:
    kind: str                 # "index" | "fraction" | "group"
    lo: float = 0             # index bounds (inclusive) or fraction bounds [lo, hi)
    hi: float = 0
    group: str | None = None  # for block items
    text: str = ""


def _err(field_name: str, token: str, why: str) -> ScheduleError:
    return ScheduleError(f"{field_name}: bad token {token!r}: {why}", token=token, field=field_name)


def _split(text: str, field_name: str) -> list[str]:
    if text is None:
        return []
    if not isinstance(text, str):
        raise ScheduleError(f"{field_name}: expected a string, got {type(text).__name__}", token=repr(text),
                            field=field_name)
    text = text.strip()
    if not text:
        return []
    tokens = [t.strip() for t in text.split(",")]
    for t in tokens:
        if not t:
            raise _err(field_name, text, "empty item (a stray comma)")
    return tokens


def _index_range(tok: str, body: str, field_name: str) -> tuple[int, int]:
    m = _RE_INT.match(body)
    if m:
        v = int(m.group(1))
        return v, v
    m = _RE_INT_RANGE.match(body)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if (lo >= 0) == (hi >= 0) and lo > hi:
            raise _err(field_name, tok, f"range start {lo} is after its end {hi}")
        return lo, hi
    raise _err(field_name, tok, "expected an index N or a range A-B (integers)")


def _parse_steps(text: str, field_name: str = "steps") -> tuple[_Item, ...]:
    items = []
    for tok in _split(text, field_name):
        m = _RE_NUM_RANGE.match(tok)
        if m and ("." in m.group(1) or "." in m.group(2)):
            lo, hi = float(m.group(1)), float(m.group(2))
            for v in (lo, hi):
                if not 0.0 <= v <= 1.0:
                    raise _err(field_name, tok, f"fraction {v:g} is outside [0, 1]")
            if lo >= hi:
                raise _err(field_name, tok, f"fraction range start {lo:g} is not before its end {hi:g}")
            items.append(_Item("fraction", lo, hi, text=tok))
            continue
        if "." in tok and not m:
            raise _err(field_name, tok, "a fraction must be a range like 0.9-1.0")
        lo, hi = _index_range(tok, tok, field_name)
        items.append(_Item("index", lo, hi, text=tok))
    return tuple(items)


def _parse_blocks(text: str, field_name: str = "blocks") -> tuple[_Item, ...]:
    items = []
    for tok in _split(text, field_name):
        low = tok.lower()
        m = _RE_GROUP.match(low)
        if m:
            group, rest = m.group(1), m.group(2)
            if group not in BLOCK_GROUPS:
                raise _err(field_name, tok, f"unknown block group {group!r} (use {', '.join(BLOCK_GROUPS)} "
                                            "or flat indices)")
            if rest is None:
                items.append(_Item("group", 0, -1, group=group, text=tok))
                continue
            lo, hi = _index_range(tok, rest.strip(), field_name)
            if lo < 0 or hi < 0:
                raise _err(field_name, tok, "group indices cannot be negative")
            items.append(_Item("index", lo, hi, group=group, text=tok))
            continue
        lo, hi = _index_range(tok, tok, field_name)
        if lo < 0 or hi < 0:
            raise _err(field_name, tok, "block indices cannot be negative")
        items.append(_Item("index", lo, hi, text=tok))
    return tuple(items)


def _norm(text: str, field_name: str) -> str:
    return ", ".join(_split(text, field_name))


def _resolve_index(v: int, n: int) -> int:
    return v + n if v < 0 else v


def _step_matches(items: tuple[_Item, ...], step: int, num_steps: int) -> bool:
    for it in items:
        if it.kind == "fraction":
            if num_steps <= 0:
                continue
            f = step / num_steps
            if it.lo <= f < it.hi or (it.hi >= 1.0 and f >= it.lo):
                return True
        else:
            lo, hi = int(it.lo), int(it.hi)
            if (lo < 0 or hi < 0) and num_steps <= 0:
                continue
            lo, hi = _resolve_index(lo, num_steps), _resolve_index(hi, num_steps)
            if lo <= step <= hi:
                return True
    return False


def _block_matches(items: tuple[_Item, ...], block: int | None, group: str | None, group_index: int | None) -> bool:
    for it in items:
        if it.group is None:
            if block is not None and it.lo <= block <= it.hi:
                return True
        elif it.group == group:
            if it.kind == "group":
                return True
            if group_index is not None and it.lo <= group_index <= it.hi:
                return True
    return False


def _more_precise(a: str, b: str) -> str:
    if a == "auto":
        return b
    if b == "auto":
        return a
    return max(a, b, key=_PRECISION.__getitem__)


_KIND_AND = {("all", k): k for k in ATTENTION_KINDS}
_KIND_AND.update({(k, "all"): k for k in ATTENTION_KINDS})
_KIND_AND.update({("self", "self"): "self", ("cross", "cross"): "cross", ("self", "cross"): "none",
                  ("cross", "self"): "none"})


@dataclass(frozen=True)
class Schedule:
    """Which steps/blocks/kinds run 8-bit attention. Build with `from_strings`; all fields are validated.

    steps / exact_steps / blocks / exact_blocks are tuples of clauses (normalized strings in the grammar of the
    module docstring). A step must match every `steps` clause and no `exact_steps` clause; likewise for blocks.
    """
    steps: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()
    attention: str = "all"
    pv: str = "auto"
    exact_steps: tuple[str, ...] = ()
    exact_blocks: tuple[str, ...] = ()
    overrides: dict = field(default_factory=dict)
    sparse: str = ""
    dense_steps: tuple[str, ...] = ()
    step_overrides: dict = field(default_factory=dict)
    _parsed: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("steps", "blocks", "exact_steps", "exact_blocks", "dense_steps"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            if not isinstance(v, (list, tuple)) or not all(isinstance(c, str) for c in v):
                raise ScheduleError(f"{name}: expected a string or a tuple of strings, got {v!r}", token=repr(v),
                                    field=name)
            v = tuple(_norm(c, name) for c in v if c.strip())
            object.__setattr__(self, name, v)
        if self.attention not in ATTENTION_KINDS:
            raise ScheduleError(f"attention: bad token {self.attention!r}: use all, self or cross",
                                token=str(self.attention), field="attention")
        if self.pv not in PV_CHOICES:
            raise ScheduleError(f"pv: bad token {self.pv!r}: use auto, fp16, fp8, int8 or fine",
                                token=str(self.pv), field="pv")
        sp = (self.sparse or "").strip().lower()
        if sp not in ("", "auto"):
            mode, share = parse_sparse(sp)
            sp = f"{mode}={share:g}"
        object.__setattr__(self, "sparse", sp)
        if not isinstance(self.overrides, dict):
            raise ScheduleError(f"overrides: expected a dict, got {type(self.overrides).__name__}",
                                token=repr(self.overrides), field="overrides")
        object.__setattr__(self, "overrides", _checked_overrides(self.overrides, "overrides"))
        if not isinstance(self.step_overrides, dict):
            raise ScheduleError(f"step_overrides: expected a dict, got {type(self.step_overrides).__name__}",
                                token=repr(self.step_overrides), field="step_overrides")
        ranges = {}
        for clause, ov in self.step_overrides.items():
            if not isinstance(clause, str):
                raise ScheduleError(f"step_overrides: bad steps {clause!r}", token=repr(clause), field="step_overrides")
            ranges[_norm(clause, "step_overrides")] = _checked_overrides(ov, "step_overrides")
        object.__setattr__(self, "step_overrides", ranges)
        parsed = (tuple(_parse_steps(c, "steps") for c in self.steps),
                  tuple(_parse_steps(c, "exact_steps") for c in self.exact_steps),
                  tuple(_parse_blocks(c, "blocks") for c in self.blocks),
                  tuple(_parse_blocks(c, "exact_blocks") for c in self.exact_blocks),
                  tuple(_parse_steps(c, "dense_steps") for c in self.dense_steps),
                  tuple((_parse_steps(c, "step_overrides"), ov) for c, ov in self.step_overrides.items()))
        object.__setattr__(self, "_parsed", parsed)

    def __hash__(self):
        return hash(self.to_json())

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_strings(cls, steps: str = "", blocks: str = "", attention: str = "all", pv: str = "auto",
                     exact_steps: str = "", exact_blocks: str = "", overrides: dict | None = None,
                     sparse: str = "", dense_steps: str = "") -> "Schedule":
        """Parse user strings strictly (ScheduleError names the bad token); "" means all steps/blocks."""
        att = (attention or "all").strip().lower()
        return cls(steps=steps or "", blocks=blocks or "", attention=att, pv=(pv or "auto").strip().lower(),
                   exact_steps=exact_steps or "", exact_blocks=exact_blocks or "", overrides=dict(overrides or {}),
                   sparse=sparse or "", dense_steps=dense_steps or "")

    def compose(self, other: "Schedule | None") -> "Schedule":
        """8-bit only where both schedules say 8-bit (steps × blocks × kinds); the more precise P·V choice wins
        (exact > fine > int8 > fp16 > fp8 > sparse > auto); a sparse level set in one applies (self's where both set
        one), and dense steps add up."""
        if other is None:
            return self
        if not isinstance(other, Schedule):
            raise TypeError(f"can only compose with a Schedule, got {type(other).__name__}")
        ranges = dict(self.step_overrides)
        for clause, o in other.step_overrides.items():
            ranges[clause] = _more_precise_overrides(ranges.get(clause, {}), o)
        return Schedule(steps=self.steps + other.steps, blocks=self.blocks + other.blocks,
                        attention=_KIND_AND[(self.attention, other.attention)], pv=_more_precise(self.pv, other.pv),
                        exact_steps=self.exact_steps + other.exact_steps,
                        exact_blocks=self.exact_blocks + other.exact_blocks,
                        overrides=_more_precise_overrides(self.overrides, other.overrides),
                        sparse=self.sparse or other.sparse, dense_steps=self.dense_steps + other.dense_steps,
                        step_overrides=ranges)

    __and__ = compose

    def with_overrides(self, overrides: dict, step_overrides: dict | None = None) -> "Schedule":
        ranges = dict(self.step_overrides)
        for clause, ov in (step_overrides or {}).items():
            ranges[clause] = {**ranges.get(clause, {}), **ov}
        return replace(self, overrides={**self.overrides, **overrides}, step_overrides=ranges)

    # ---- decisions ---------------------------------------------------------------------------------------
    @property
    def is_all(self) -> bool:
        """True when every step, block and kind runs 8-bit (the schedule restricts nothing)."""
        return (not self.steps and not self.blocks and not self.exact_steps and not self.exact_blocks
                and self.attention == "all" and not self.overrides and not self.sparse and not self.step_overrides)

    def step_uses_8bit(self, step: int | None, num_steps: int | None) -> bool:
        steps, exact_steps = self._parsed[:2]
        if not steps and not exact_steps:
            return True
        if step is None:
            return False  # a restricted schedule with an unknown step keeps exact attention
        n = int(num_steps or 0)
        if not all(_step_matches(c, step, n) for c in steps):
            return False
        return not any(_step_matches(c, step, n) for c in exact_steps)

    def block_uses_8bit(self, block: int | None, group: str | None = None, group_index: int | None = None) -> bool:
        blocks, exact_blocks = self._parsed[2:4]
        if not all(_block_matches(c, block, group, group_index) for c in blocks):
            return False
        return not any(_block_matches(c, block, group, group_index) for c in exact_blocks)

    def variant(self, step: int | None, num_steps: int | None, block: int | None, kind: str = "self", *,
                group: str | None = None, group_index: int | None = None) -> str | None:
        """The variant to run ("auto"/"fp16"/"fp8"/"int8"/"fine", or "sparse:keep=F"/"sparse:ratio=F"), or None
        for exact attention. A sparse override or level gives way to the dense `pv` on `dense_steps`.

        step: 0-based sampling step of `num_steps` (None: unknown); block: flat block index (None: unknown);
        kind: "self" or "cross"; group/group_index: the model's own block naming (e.g. "double", 3).
        """
        if kind not in ("self", "cross"):
            raise ScheduleError(f"kind: bad token {kind!r}: use self or cross", token=str(kind), field="kind")
        if not self.step_uses_8bit(step, num_steps):
            return None
        dense = bool(self.dense_steps) and (step is None or any(
            _step_matches(c, step, int(num_steps or 0)) for c in self._parsed[4]))
        if block is not None and (self.overrides or self.step_overrides):
            o = self.site_override(f"{block}:{kind}", step, num_steps)
            if o is not None:
                if o == "exact":
                    return None
                return self.pv if dense and o.startswith("sparse:") else o
        if self.attention not in ("all", kind):
            return None
        if not self.block_uses_8bit(block, group, group_index):
            return None
        if kind == "self" and self.sparse not in ("", "auto") and not dense:
            return f"sparse:{self.sparse}"
        return self.pv

    def site_override(self, site: str, step: int | None, num_steps: int | None) -> str | None:
        """The override of `site` at this step: the first matching step range's, else `overrides`' (or None)."""
        if step is not None:
            for clause, ov in self._parsed[5]:
                if site in ov and _step_matches(clause, step, int(num_steps or 0)):
                    return ov[site]
        return self.overrides.get(site)

    def check(self, num_steps: int | None = None, num_blocks: int | None = None,
              groups: dict | None = None) -> None:
        """Raise ScheduleError for indices outside what a run has (num_steps steps, num_blocks flat blocks,
        groups = {"double": 19, "single": 38} or UNet block ids {"input": 12, ...})."""
        steps, exact_steps, blocks, exact_blocks, dense_steps = self._parsed[:5]
        if num_steps is not None:
            for name, clauses in (("steps", steps), ("exact_steps", exact_steps), ("dense_steps", dense_steps)):
                for c in clauses:
                    for it in c:
                        if it.kind != "index":
                            continue
                        for v in (int(it.lo), int(it.hi)):
                            if not -num_steps <= v < num_steps:
                                raise _err(name, it.text, f"step {v} is out of range for {num_steps} steps "
                                                          f"(0..{num_steps - 1}, or -{num_steps}..-1)")
                        lo, hi = _resolve_index(int(it.lo), num_steps), _resolve_index(int(it.hi), num_steps)
                        if lo > hi:
                            raise _err(name, it.text, f"range resolves to {lo}-{hi} for {num_steps} steps")
        for name, clauses in (("blocks", blocks), ("exact_blocks", exact_blocks)):
            for c in clauses:
                for it in c:
                    if it.group is None:
                        if num_blocks is not None and it.hi >= num_blocks:
                            raise _err(name, it.text, f"block {int(it.hi)} is out of range: this model has "
                                                      f"{num_blocks} blocks (0..{num_blocks - 1})")
                    elif groups is not None:
                        if it.group not in groups:
                            raise _err(name, it.text, f"this model has no {it.group!r} blocks (it has "
                                                      f"{', '.join(groups) or 'no named groups'})")
                        n = groups[it.group]
                        if it.kind == "index" and it.hi >= n:
                            raise _err(name, it.text, f"{it.group} block {int(it.hi)} is out of range "
                                                      f"(0..{n - 1})")
        if num_blocks is not None:
            for site in {s for ov in (self.overrides, *self.step_overrides.values()) for s in ov}:
                b = int(site.split(":")[0])
                if b >= num_blocks:
                    raise ScheduleError(f"overrides: site {site!r} is out of range: this model has {num_blocks} "
                                        "blocks", token=site, field="overrides")

    def describe(self) -> str:
        """One line for logs and reports."""
        bits = [f"{name}=[{' & '.join(getattr(self, name))}]"
                for name in ("steps", "exact_steps", "blocks", "exact_blocks") if getattr(self, name)]
        if not bits:
            bits.append("all steps and blocks")
        if self.attention != "all":
            bits.append(f"attention={self.attention}")
        bits.append(f"pv={self.pv}")
        if self.sparse:
            bits.append(f"sparse={self.sparse}" + (f" (dense steps {' & '.join(self.dense_steps)})"
                                                   if self.dense_steps else ""))
        if self.overrides:
            bits.append(f"overrides={len(self.overrides)} sites")
        bits += [f"steps {c}: {len(ov)} sites differ" for c, ov in self.step_overrides.items()]
        return ", ".join(bits)

    # ---- serialization -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "steps": list(self.steps), "exact_steps": list(self.exact_steps),
                "blocks": list(self.blocks), "exact_blocks": list(self.exact_blocks), "attention": self.attention,
                "pv": self.pv, "overrides": dict(self.overrides),
                **({"sparse": self.sparse, "dense_steps": list(self.dense_steps)} if self.sparse else {}),
                **({"step_overrides": {c: dict(ov) for c, ov in self.step_overrides.items()}}
                   if self.step_overrides else {})}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        if not isinstance(d, dict):
            raise ScheduleError(f"schedule JSON must be an object, got {type(d).__name__}", token=repr(d)[:40])
        schema = d.get("schema", SCHEMA)
        if schema != SCHEMA:
            raise ScheduleError(f"unknown schedule schema {schema!r} (expected {SCHEMA!r})", token=str(schema))
        known = {"schema", "steps", "exact_steps", "blocks", "exact_blocks", "attention", "pv", "overrides", "sparse",
                 "dense_steps", "step_overrides"}
        for k in d:
            if k not in known:
                raise ScheduleError(f"unknown schedule field {k!r}", token=str(k))

        def clauses(name):
            v = d.get(name, [])
            if isinstance(v, str):
                return v
            if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
                raise ScheduleError(f"{name}: expected a list of strings, got {v!r}", token=repr(v), field=name)
            return tuple(v)
        return cls(steps=clauses("steps"), exact_steps=clauses("exact_steps"), blocks=clauses("blocks"),
                   exact_blocks=clauses("exact_blocks"), attention=d.get("attention", "all"),
                   pv=d.get("pv", "auto"), overrides=dict(d.get("overrides", {}) or {}),
                   sparse=str(d.get("sparse", "") or ""), dense_steps=clauses("dense_steps"),
                   step_overrides=dict(d.get("step_overrides", {}) or {}))

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        try:
            d = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise ScheduleError(f"schedule JSON does not parse: {e}", token=str(text)[:40]) from e
        return cls.from_dict(d)


ALL = Schedule()


def step_index(sigma: float, sample_sigmas) -> tuple[int | None, int | None]:
    """(step, num_steps) of a model call at noise level `sigma` in a descending schedule `sample_sigmas`
    (num_steps + 1 values, the last usually 0). Intermediate evaluations (Heun, DPM2) map to the step whose
    interval [s_i, s_{i+1}) holds them. Returns (None, None) without a schedule."""
    if sample_sigmas is None:
        return None, None
    s = [float(x) for x in sample_sigmas]
    n = len(s) - 1
    if n <= 0:
        return None, None
    sigma = float(sigma)
    tol = 1e-5 * max(1.0, abs(sigma))
    count = sum(1 for x in s[:n] if x >= sigma - tol)
    return min(max(count - 1, 0), n - 1), n
