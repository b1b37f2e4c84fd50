"""SageAttention Sparse and the int8 P·V option, without ComfyUI: a stand-in ModelPatcher and `comfy.patcher_extension`
(the parts `_runtime.install` uses), sampling driven as ComfyUI's sampler drives it (outer_sample and apply_model
wrappers, our DiT block patches, the attention override). Kernel calls run through Triton's interpreter on tiny
CPU tensors."""
import copy
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import comfy_sage
from comfy_sage.kernels import _sparse
from comfy_sage.kernels import calibrate as cal
from comfy_sage.kernels.schedule import ScheduleError
from comfy_sage.nodes import _runtime
from comfy_sage.nodes.sage_nodes import (ApplySageAttention, SageAttentionCalibrate, SageAttentionReport,
                                         SageAttentionSparse)

HEADS, DIM, TOKENS, CONTEXT = 2, 32, 128, 16  # 4 key blocks of the interpreter's 32-key tiles


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    """A stand-in for the two pieces of ComfyUI `install` touches; calibrations go to tmp_path."""
    pe = types.ModuleType("comfy.patcher_extension")
    pe.WrappersMP = types.SimpleNamespace(APPLY_MODEL="apply_model", OUTER_SAMPLE="outer_sample")

    def add_wrapper_with_key(kind, key, fn, options, is_model_options=False):
        to = options.setdefault("transformer_options", {}) if is_model_options else options
        to.setdefault("wrappers", {}).setdefault(kind, {}).setdefault(key, []).append(fn)

    pe.add_wrapper_with_key = add_wrapper_with_key
    pkg = types.ModuleType("comfy")
    pkg.patcher_extension = pe
    monkeypatch.setitem(sys.modules, "comfy", pkg)
    monkeypatch.setitem(sys.modules, "comfy.patcher_extension", pe)
    monkeypatch.setattr(_runtime, "check_hook", lambda: None)
    monkeypatch.setenv(cal.ENV_DIR, str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")


class TinyDiT(torch.nn.Module):
    """Two blocks in a `blocks` list: what `structure_of` reads as a Wan-like DiT (group "double")."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))


class Patcher:
    """ModelPatcher's contract as `install` uses it: clone() deep-copies model_options."""

    def __init__(self):
        self.dm, self.model_options = TinyDiT(), {"transformer_options": {}}

    def get_model_object(self, name):
        assert name == "diffusion_model"
        return self.dm

    def clone(self):
        c = copy.copy(self)
        c.model_options = copy.deepcopy(self.model_options)
        return c


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).half()


def _original(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """ComfyUI's optimized_attention contract ([B, N, H*D] in and out), exact."""
    b = q.shape[0]
    q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return out.transpose(1, 2).reshape(b, out.shape[2], -1)


def _wrapped(fns, original, *args, **kwargs):
    """ComfyUI's WrapperExecutor: each wrapper gets the next one (or the original) as its executor."""
    if not fns:
        return original(*args, **kwargs)
    return fns[0](lambda *a, **k: _wrapped(fns[1:], original, *a, **k), *args, **kwargs)


def sample(m, steps=2):
    """One sampling run of the tiny DiT: per step, each block runs self- then cross-attention (Wan's order)."""
    to = m.model_options["transformer_options"]
    wrappers = to.get("wrappers", {})
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    x, ctx = rand(1, TOKENS, HEADS * DIM, seed=1), rand(1, CONTEXT, HEADS * DIM, seed=2)
    # self-attention q, k per block; block 0's q is its k, which the calibration stubs below use as a marker
    a, b = rand(1, TOKENS, HEADS * DIM, seed=3), rand(1, TOKENS, HEADS * DIM, seed=4)
    qk = [(a, a), (b, rand(1, TOKENS, HEADS * DIM, seed=5))]

    def attention(q, k, v, topts):
        override = to.get("optimized_attention_override")
        if override is None:
            return _original(q, k, v, HEADS)
        return override(_original, q, k, v, HEADS, transformer_options=topts)

    def model(x_, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None):
        dit = transformer_options.get("patches_replace", {}).get("dit", {})
        for i in range(2):
            def body(args, i=i):
                attention(*qk[i], x_, transformer_options)
                attention(qk[i][0], ctx, ctx, transformer_options)
                return {"img": x_}
            patch = dit.get(("double_block", i))
            if patch is None:
                body({})
            else:
                patch({}, {"original_block": body})
        return x_

    def sampler(noise, latent, sampler_, sigmas_, *a, **k):
        for i in range(steps):
            topts = {**to, "sigmas": sigmas[i:i + 1], "sample_sigmas": sigmas}
            _wrapped(wrappers.get("apply_model", {}).get("comfy_sage", []), model, x, sigmas[i:i + 1], None, None,
                     None, topts)
        return x

    return _wrapped(wrappers.get("outer_sample", {}).get("comfy_sage", []), sampler, x, x, None, sigmas)


def state(m):
    return _runtime.state_of(m)


def block0_self(q, k):
    return bool(torch.equal(q, k))


def block1_self(q, k):
    return q.shape == k.shape and not torch.equal(q, k)


def sparse_node(model, mode="manual", level=0.5, dense_steps="", budget=0.05):
    return SageAttentionSparse().apply(model, mode, level, dense_steps, budget)[0]


# ---- the node's contract and the schedules it builds ------------------------------------------------------------
def test_sparse_node_contract_and_int8_option():
    assert comfy_sage.NODE_CLASS_MAPPINGS["SageAttentionSparse"] is SageAttentionSparse
    assert comfy_sage.NODE_DISPLAY_NAME_MAPPINGS["SageAttentionSparse"] == "SageAttention Sparse"
    req = SageAttentionSparse.INPUT_TYPES()["required"]
    assert list(req) == ["model", "mode", "level", "dense_steps", "budget"]
    assert req["mode"][0] == ["calibrated", "manual"] and req["mode"][1]["default"] == "calibrated"
    assert (req["level"][1]["default"], req["level"][1]["min"], req["level"][1]["max"]) == (0.9, 0.05, 1.0)
    assert req["dense_steps"][1]["default"] == "" and req["budget"][1]["default"] == 0.05
    for node in (ApplySageAttention, SageAttentionCalibrate):
        pv = node.INPUT_TYPES()["required"]["pv"]
        assert pv[0] == ["auto", "fp16", "fp8", "int8"] and "Hadamard" in pv[1]["tooltip"]


def test_schedules_of_the_modes():
    s = SageAttentionSparse.schedule("manual", 0.8, "0-1")
    assert (s.sparse, s.dense_steps) == ("keep=0.8", ("0-1",))
    assert [s.variant(i, 4, 0, "self") for i in range(4)] == ["auto", "auto", "sparse:keep=0.8", "sparse:keep=0.8"]
    assert s.variant(3, 4, 0, "cross") == "auto"  # cross-attention stays dense
    c = SageAttentionSparse.schedule("calibrated", 0.8, "")
    assert c.sparse == "auto" and c.variant(3, 4, 0, "self") == "auto"  # levels come from calibration's overrides


@pytest.mark.parametrize("kw,field,token", [
    (dict(dense_steps="0-x"), "dense_steps", "0-x"),
    (dict(dense_steps="3-"), "dense_steps", "3-"),
    (dict(level=1.5), "level", "1.5"),
    (dict(mode="sometimes"), "mode", "sometimes"),
])
def test_bad_inputs_name_the_input(kw, field, token, comfy):
    with pytest.raises(ScheduleError) as e:
        sparse_node(Patcher(), **kw)
    assert str(e.value).startswith(f"{field}:") and token in str(e.value) and e.value.field == field
    if "dense_steps" in kw:  # ComfyUI reports it before anything runs
        v = SageAttentionSparse.VALIDATE_INPUTS(dense_steps=kw["dense_steps"])
        assert isinstance(v, str) and repr(token) in v
    assert SageAttentionSparse.VALIDATE_INPUTS(dense_steps="0-1, -1") is True


def test_dense_step_beyond_the_run_fails_before_the_first_step(comfy):
    m = sparse_node(Patcher(), dense_steps="5")
    with pytest.raises(ScheduleError, match="dense_steps: bad token '5'.*out of range for 2 steps"):
        sample(m)
    assert state(m).run["forwards"] == 0


# ---- composition ---------------------------------------------------------------------------------------------
def test_alone_it_is_apply_with_defaults_plus_sparsity(comfy):
    model = Patcher()
    m = sparse_node(model, level=0.7)
    st, to = state(m), m.model_options["transformer_options"]
    assert st.enabled and st.pv == "auto" and st.calibrator is None and st.label == "sage+sparse"
    assert to["optimized_attention_override"] is st and st.previous is None
    assert set(to["patches_replace"]["dit"]) == {("double_block", 0), ("double_block", 1)}
    assert st.schedule.variant(0, 2, 1, "self") == "sparse:keep=0.7"
    assert model.model_options == {"transformer_options": {}}  # the input model is untouched


def test_after_apply_it_takes_its_place_and_keeps_its_settings(comfy):
    def other_pack(func, *args, **kwargs):
        return func(*args, **kwargs)

    model = Patcher()
    model.model_options["transformer_options"]["optimized_attention_override"] = other_pack
    sched = comfy_sage.NODE_CLASS_MAPPINGS["SageAttentionStepSchedule"]().build(steps="", exact_steps="-1")[0]
    applied = ApplySageAttention().apply(model, True, "int8", True, sched)[0]
    m = sparse_node(applied, level=0.5, dense_steps="0")
    st, prior = state(m), state(applied)
    to = m.model_options["transformer_options"]
    assert st is not prior and (st.pv, st.verbose, st.label) == ("int8", True, "sage+sparse")
    assert to["optimized_attention_override"] is st and st.previous is other_pack  # one override, not two chained
    assert [w for kind in ("apply_model", "outer_sample") for w in to["wrappers"][kind]["comfy_sage"]] == [
        st.apply_model_wrapper, st.outer_sample_wrapper]
    assert to["patches_replace"]["dit"] == applied.model_options["transformer_options"]["patches_replace"]["dit"]
    assert [st.schedule.variant(i, 3, 0, "self") for i in range(3)] == ["int8", "sparse:keep=0.5", None]
    assert st.schedule.variant(1, 3, 0, "cross") == "int8"
    # the Apply node's model is unchanged: still its own state and wrappers
    ato = applied.model_options["transformer_options"]
    assert ato["optimized_attention_override"] is prior and ato["wrappers"]["apply_model"]["comfy_sage"] == [
        prior.apply_model_wrapper]


def test_before_apply_its_rules_stay(comfy):
    """Sparse -> Apply: Apply's settings, the Sparse node's rules, one override; a later Sparse node's rules
    replace an earlier one's."""
    def other_pack(func, *args, **kwargs):
        return func(*args, **kwargs)

    model = Patcher()
    model.model_options["transformer_options"]["optimized_attention_override"] = other_pack
    sp = sparse_node(model, level=0.5, dense_steps="0")
    m = ApplySageAttention().apply(sp, True, "fp16", False, None)[0]
    st, to = state(m), m.model_options["transformer_options"]
    assert (st.pv, st.label, st.sparse) == ("fp16", "sage+sparse", state(sp).sparse)
    assert to["optimized_attention_override"] is st and st.previous is other_pack
    assert to["wrappers"]["apply_model"]["comfy_sage"] == [st.apply_model_wrapper]
    assert [st.schedule.variant(i, 2, 0, "self") for i in range(2)] == ["fp16", "sparse:keep=0.5"]
    again = state(sparse_node(m, level=0.8))
    assert again.schedule.dense_steps == () and again.schedule.variant(0, 2, 0, "self") == "sparse:keep=0.8"
    assert again.pv == "fp16"
    # Apply with enabled off after it: default attention, i.e. the override that was there before ours
    off = ApplySageAttention().apply(sp, False, "auto", False, None)[0]
    assert not state(off).enabled and off.model_options["transformer_options"]["optimized_attention_override"] is \
        other_pack


def test_with_disabled_apply_it_stays_off(comfy):
    base = ApplySageAttention().apply(Patcher(), False, "auto", False, None)[0]
    m = sparse_node(base)
    assert not state(m).enabled and "optimized_attention_override" not in m.model_options["transformer_options"]
    off = ApplySageAttention().apply(sparse_node(Patcher()), False, "auto", False, None)[0]
    assert not state(off).enabled and "optimized_attention_override" not in off.model_options["transformer_options"]


def test_calibrated_mode_creates_a_sparse_calibrator(comfy, tmp_path):
    m = sparse_node(Patcher(), mode="calibrated", budget=0.07, dense_steps="0")
    c = state(m).calibrator
    assert isinstance(c, cal.Calibrator) and c.sparse and c.budget == 0.07 and c.pending
    assert state(m).base_schedule.sparse == "auto"
    # after Calibrate: its directory and recalibrate carry over, the Sparse node's budget decides
    calibrated = SageAttentionCalibrate().apply(Patcher(), 0.02, "fp16", True, False, None, str(tmp_path / "c"))[0]
    c2 = state(sparse_node(calibrated, mode="calibrated", budget=0.07)).calibrator
    assert c2 is not state(calibrated).calibrator
    assert (c2.sparse, c2.budget, c2.pv, c2.recalibrate) == (True, 0.07, "fp16", True)
    assert c2.directory == str(tmp_path / "c")
    # a manual level after Calibrate keeps a dense calibration (its exact decisions still apply)
    c3 = state(sparse_node(calibrated, mode="manual")).calibrator
    assert (c3.sparse, c3.budget) == (False, 0.02)
    # Calibrate or Apply after a calibrated Sparse node: the levels are still calibrated; Calibrate's budget wins
    sp = sparse_node(Patcher(), mode="calibrated", budget=0.07)
    c4 = state(SageAttentionCalibrate().apply(sp, 0.02, "auto", False, False, None, "")[0]).calibrator
    assert (c4.sparse, c4.budget) == (True, 0.02)
    c5 = state(ApplySageAttention().apply(sp, True, "auto", False, None)[0]).calibrator
    assert (c5.sparse, c5.budget) == (True, 0.07)


# ---- runs ---------------------------------------------------------------------------------------------------
def test_manual_level_runs_sparse_and_report_shows_density(comfy):
    base = ApplySageAttention().apply(Patcher(), False, "auto", False, None)[0]
    m = sparse_node(Patcher(), level=0.5, dense_steps="0")
    sample(base)
    sample(m)
    run = state(m).run
    assert run["forwards"] == 2
    assert dict(run["step_calls"][0]) == {"int8-fp8pv": 4}  # dense step: the arch's auto P·V (fp8 here)
    assert dict(run["step_calls"][1]) == {"int8-sparse": 2, "int8-fp8pv": 2}  # self sparse, cross dense
    assert set(run["density"]) == {(0, "self"), (1, "self")}
    for s, n in run["density"].values():
        assert n == 1 and 0 < s <= 1
    text = SageAttentionReport().report(m, {"samples": None}, base, {"samples": None})["result"][0]
    assert "int8-sparse=2" in text and "sparse=keep=0.5 (dense steps 0)" in text
    assert "sparse: 2 int8-sparse calls on 2 sites, mean density" in text
    for b in (0, 1):
        d = run["density"][(b, "self")][0]
        assert f"{b}:self {d:.1%}" in text
    assert "speed-up vs default" in text


def test_stale_density_is_not_recorded(comfy, monkeypatch):
    """A sparse call that sage_sdpa hands to SDPA (head dim 8 here) computes every key: no density of an earlier
    sparse call may be recorded for it."""
    st = _runtime.SageState(True, "auto", SageAttentionSparse.schedule("manual", 0.5), False, {})
    monkeypatch.setattr(_sparse, "_note_process_density", lambda d: None)  # keep kernels.sparse_density() clean
    _sparse.note_density(0.25)
    q = rand(1, 64, 2 * 8, seed=0)
    st(_original, q, q, q, 2, transformer_options={})
    assert dict(st.run["paths"]) == {"sdpa:head_dim": 1} and not st.run["density"]


def stub_measurements(monkeypatch, local):
    """Calibration's measurements stubbed: every dense variant within budget; each sparse level within budget at 30%
    density where local(q, k, calls so far) holds, else only at 90% (above the density limit). The list of calls."""
    calls = []

    def sparse_errors(q, k, v, **kw):
        ok = local(q, k, len(calls))
        calls.append(1)
        return {f"sparse:keep={lvl:g}": (0.01, 0.3) if ok else (0.01, 0.9) for lvl in cal.SPARSE_LEVELS}

    monkeypatch.setattr(cal, "sparse_errors", sparse_errors)
    monkeypatch.setattr(cal, "variant_errors", lambda q, k, v, variants, **kw: {p: 0.01 for p in variants})
    return calls


def test_calibrated_mode_decides_per_site_then_runs_sparse(comfy, monkeypatch, tmp_path):
    """Calibration (measurements stubbed: block 0's attention is local, block 1's is not) makes block 0's
    self-attention sparse and keeps block 1's dense; cross-attention is never measured at sparse levels."""
    measured = stub_measurements(monkeypatch, lambda q, k, n: block0_self(q, k))
    m = sparse_node(Patcher(), mode="calibrated")
    sample(m, steps=2)
    st = state(m)
    assert st.calibrator.status == "measured" and len(measured) == 2  # the two self sites only
    assert Path(st.calibrator.path).name.endswith("-sparse.json") and st.calibrator.path.parent == tmp_path
    ov = st.calibrator.result.schedule.overrides
    assert ov["0:self"].startswith("sparse:keep=") and not ov["1:self"].startswith("sparse:")
    run = st.run
    assert dict(run["step_calls"][0]) == {"exact:calibration": 4}
    assert dict(run["blocks"][(0, "self")]) == {"exact:calibration": 1, "int8-sparse": 1}
    assert "int8-sparse" not in run["blocks"][(1, "self")] and "int8-sparse" not in run["blocks"][(0, "cross")]
    text = SageAttentionReport().report(m, {"samples": None})["result"][0]
    assert "0:self -> sparse:keep=" in text and "sparse: 1 int8-sparse calls on 1 sites" in text


def test_manual_level_after_calibrate_keeps_its_exact_sites(comfy, monkeypatch):
    """Calibrate -> Sparse(manual): calibration keeps block 1's self-attention exact (stubbed error), the level
    runs on the other self site it measured, cross-attention keeps calibration's dense choice."""
    monkeypatch.setattr(cal, "variant_errors", lambda q, k, v, variants, **kw: {
        p: math.inf if block1_self(q, k) else 0.01 for p in variants})
    calibrated = SageAttentionCalibrate().apply(Patcher(), 0.05, "auto", False, False, None, "")[0]
    m = sparse_node(calibrated, level=0.5)
    sample(m, steps=2)
    run = state(m).run
    assert dict(run["blocks"][(1, "self")]) == {"exact:calibration": 1, "exact:schedule": 1}
    assert dict(run["blocks"][(0, "self")]) == {"exact:calibration": 1, "int8-sparse": 1}
    assert dict(run["blocks"][(0, "cross")]) == {"exact:calibration": 1, "int8-fp8pv": 1}


# ---- the example workflow ------------------------------------------------------------------------------------
def test_sparse_workflow_builds_a_valid_schedule():
    wf = json.loads((Path(__file__).resolve().parents[1] / "workflows" / "wan21_t2v_sparse.json").read_text())
    sp = [n for n in wf["nodes"] if n["type"] == "SageAttentionSparse"]
    assert len(sp) == 1
    mode, level, dense_steps, budget = sp[0]["widgets_values"]
    assert SageAttentionSparse.VALIDATE_INPUTS(dense_steps=dense_steps) is True
    assert SageAttentionSparse.schedule(mode, level, dense_steps).sparse == "auto" and budget == 0.05
    # the sage branch runs Apply SageAttention -> Sparse -> sampler, and the report reads the Sparse node's model
    links = {lid: (a, b) for lid, a, _, b, _, _ in wf["links"]}
    types_ = {n["id"]: n["type"] for n in wf["nodes"]}
    into = [types_[a] for a, b in links.values() if b == sp[0]["id"]]
    out_of = sorted(types_[b] for a, b in links.values() if a == sp[0]["id"])
    assert into == ["ApplySageAttention"]
    assert out_of == ["KSampler", "SageAttentionCompareImages", "SageAttentionReport"]


def test_calibrated_mode_measures_the_late_steps_again(comfy, monkeypatch, tmp_path):
    """Per step range (8 steps): step 0 measures every site, step 4 (the first of the second half) measures the
    self sites' sparse levels again; block 0 stops being local there (stubbed) and runs dense on steps 4-7 only."""
    # the first measurement's two self sites, then the late range's
    calls = stub_measurements(monkeypatch, lambda q, k, n: block0_self(q, k) and n < 2)
    m = sparse_node(Patcher(), mode="calibrated")
    sample(m, steps=8)
    st = state(m)
    res = st.calibrator.result
    assert len(calls) == 4 and res.ranges_measured() == {"0.5-1.0"}
    late = res.schedule.step_overrides["0.5-1.0"]
    assert list(late) == ["0:self"] and not late["0:self"].startswith("sparse:")
    run = st.run
    assert dict(run["step_calls"][0]) == dict(run["step_calls"][4]) == {"exact:calibration": 4}
    blocks = dict(run["blocks"][(0, "self")])
    assert blocks["exact:calibration"] == 2 and blocks["int8-sparse"] == 3, blocks  # steps 1-3
    assert sum(v for p, v in blocks.items() if p.startswith("int8-") and p != "int8-sparse") == 3  # steps 5-7
    text = SageAttentionReport().report(m, {"samples": None})["result"][0]
    assert "steps 0.5-1.0" in text
