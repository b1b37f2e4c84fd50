"""Node classes without ComfyUI: contracts, schedule nodes, the attention override's decisions, layouts, fallbacks
and chaining (driven directly, as ComfyUI's wrap_attn would call it), report and compare nodes."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import comfy_sage
from comfy_sage.kernels.schedule import Schedule, ScheduleError
from comfy_sage.nodes import _runtime
from comfy_sage.nodes.sage_nodes import (ApplySageAttention, SageAttentionBlockSchedule, SageAttentionCompareImages,
                                         SageAttentionCompareLatents, SageAttentionReport, SageAttentionStepSchedule)

M = comfy_sage.NODE_CLASS_MAPPINGS


def test_import_without_comfyui_and_mappings():
    code = "import sys, comfy_sage; print(sorted(comfy_sage.NODE_CLASS_MAPPINGS)); print('comfy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert "ApplySageAttention" in out[0] and out[1] == "False"
    assert set(M) == set(comfy_sage.NODE_DISPLAY_NAME_MAPPINGS)
    assert comfy_sage.NODE_DISPLAY_NAME_MAPPINGS["ApplySageAttention"] == "Apply SageAttention"


@pytest.mark.parametrize("name", sorted(M))
def test_node_contract(name):
    cls = M[name]
    it = cls.INPUT_TYPES()
    assert set(it) <= {"required", "optional", "hidden"} and it["required"]
    assert cls.CATEGORY == "sageattention"
    assert callable(getattr(cls, cls.FUNCTION))
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    for section in it.values():
        for spec in section.values():
            assert isinstance(spec, tuple) and isinstance(spec[0], (str, list))
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)


def test_apply_node_signature():
    it = ApplySageAttention.INPUT_TYPES()
    assert it["required"]["model"] == ("MODEL",)
    assert it["required"]["pv"][0] == ["auto", "fp16", "fp8", "int8"]
    assert it["optional"]["schedule"][0] == "SAGE_SCHEDULE"
    assert ApplySageAttention.RETURN_TYPES == ("MODEL",)


def test_step_schedule_node_builds_and_composes():
    s, = SageAttentionStepSchedule().build(steps="", exact_steps="0-1, -1")
    assert [i for i in range(6) if s.variant(i, 6, 0) is not None] == [2, 3, 4]
    b, = SageAttentionBlockSchedule().build(blocks="0-3, 38-39", exact_blocks="", attention="self", schedule=s)
    assert b.variant(2, 6, 38, "self") is not None
    assert b.variant(1, 6, 38, "self") is None   # the step rule travels through composition
    assert b.variant(2, 6, 38, "cross") is None  # self only
    assert b.variant(2, 6, 5, "self") is None


@pytest.mark.parametrize("node,kw,bad", [
    (SageAttentionStepSchedule, dict(steps="3-", exact_steps=""), "3-"),
    (SageAttentionStepSchedule, dict(steps="", exact_steps="0, a-b"), "a-b"),
    (SageAttentionBlockSchedule, dict(blocks="5-2", exact_blocks="", attention="all"), "5-2"),
    (SageAttentionBlockSchedule, dict(blocks="", exact_blocks="double:x", attention="all"), "double:x"),
])
def test_schedule_nodes_raise_naming_token(node, kw, bad):
    """Once, naming the input that holds the token (ComfyUI shows the node's error as it runs)."""
    with pytest.raises(ScheduleError) as e:
        node().build(**kw)
    field, = [k for k, x in kw.items() if bad in x]
    assert str(e.value).startswith(f"{field}: bad token {bad!r}") and e.value.field == field


def test_nodes_need_nothing_comfyui_lacks():
    """requirements.txt (what ComfyUI-Manager installs from a git URL) lists no package: the nodes, and the kernels
    and calibration behind them, import none of pyproject's dependencies but torch and Triton."""
    import re
    import tomllib

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "requirements.txt")) as f:
        assert [line for line in f if line.strip() and not line.startswith("#")] == []
    with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
        deps = [re.match(r"[A-Za-z0-9_.-]+", d)[0].lower() for d in tomllib.load(f)["project"]["dependencies"]]
    modules = {"pillow": "PIL", "imageio-ffmpeg": "imageio_ffmpeg"}
    blocked = [modules.get(d, d) for d in deps if d not in ("torch", "triton")]
    code = textwrap.dedent(f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None  # importing it now raises ImportError
        import comfy_sage
        from comfy_sage.kernels import calibrate
        from comfy_sage.nodes import _metrics, _runtime
        print(len(comfy_sage.NODE_CLASS_MAPPINGS))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and int(r.stdout) == len(M), r.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(M))
def test_validate_inputs_takes_at_most_one_input(name):
    """ComfyUI (execution.validate_inputs, 0.3.64 to now) files a failed VALIDATE_INPUTS under every input the method
    takes: with two, a bad token in one would also be reported under the other."""
    import inspect

    cls = M[name]
    if not hasattr(cls, "VALIDATE_INPUTS"):
        return
    inputs = {k for sec in ("required", "optional") for k in cls.INPUT_TYPES().get(sec, {})}
    taken = [a for a in inspect.getfullargspec(cls.VALIDATE_INPUTS).args if a in inputs]
    assert len(taken) <= 1, taken


# ---- the override, called the way ComfyUI's wrap_attn calls it ---------------------------------------------------
def original_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                       skip_output_reshape=False, **kwargs):
    """A reference implementation of ComfyUI's optimized_attention contract (what `func` is)."""
    original_attention.calls += 1
    if not skip_reshape:
        b, _, d = q.shape
        q, k, v = (t.view(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


original_attention.calls = 0


def make_state(schedule=None, pv="auto", previous=None, structure=None):
    return _runtime.SageState(True, pv, schedule, False, structure or {"family": "test", "num_blocks": None},
                              previous_override=previous)


def call(state, q, k, v, heads, **kw):
    kw.setdefault("transformer_options", {})
    kw["_inside_attn_wrapper"] = True
    return state(original_attention, q, k, v, heads, **kw)


def rand(*shape, dtype=torch.float16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)


@pytest.mark.parametrize("dtype,why", [(torch.float16, "exact:cpu"), (torch.float32, "exact:fp32")])
def test_cpu_and_fp32_call_the_original_and_count_why(dtype, why, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    st = make_state()
    q, k, v = rand(2, 16, 64, dtype=dtype), rand(2, 16, 64, dtype=dtype), rand(2, 16, 64, dtype=dtype)
    before = original_attention.calls
    out = call(st, q, k, v, 4)
    assert original_attention.calls == before + 1
    assert torch.equal(out, original_attention(q, k, v, 4))
    assert st.run["paths"] == {why: 1}


def test_mask_and_low_precision_off_and_head_dim(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # would otherwise run 8-bit: the reasons must win first
    st = make_state()
    q = rand(1, 8, 32)
    mask = torch.zeros(8, 8, dtype=torch.float16)
    call(st, q, q, q, 2, mask=mask)
    call(st, q, q, q, 2, low_precision_attention=False)
    big = rand(1, 8, 2 * 320)  # head dim 320 > 256
    call(st, big, big, big, 2)
    assert st.run["paths"] == {"exact:mask": 1, "exact:low_precision_off": 1, "exact:head_dim": 1}


def test_chains_to_previous_override(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    seen = []

    def other_pack(func, *args, **kwargs):
        seen.append(kwargs.get("skip_reshape", False))
        return func(*args, **kwargs) * 0 + 7  # recognisable result

    st = make_state(previous=other_pack)
    q = rand(1, 8, 32)
    out = call(st, q, q, q, 2)
    assert seen == [False] and bool((out == 7).all())
    assert st.run["paths"] == {"exact:cpu": 1}


def test_schedule_decides_per_step_block_and_kind(monkeypatch):
    """Drive the override as a UNet forward would (ComfyUI's 'block'/'block_index' keys, sigmas), exact on the CPU
    path: every decision still shows in the counters, by reason."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sched = Schedule.from_strings(exact_steps="0", blocks="input:1", attention="self")
    st = make_state(sched)
    sample_sigmas = torch.tensor([10.0, 5.0, 1.0, 0.0])
    q, ctx = rand(2, 16, 32), rand(2, 6, 32)
    for step, sig in enumerate(sample_sigmas[:-1]):
        fw = _runtime._Forward(*_runtime._step_of({"sigmas": sig.repeat(2), "sample_sigmas": sample_sigmas}))
        assert fw.step == step and fw.num_steps == 3
        tok = _runtime._forward.set(fw)
        try:
            for blk in (("input", 1), ("input", 2), ("middle", 0)):
                to = {"block": blk, "block_index": 0}
                call(st, q, q, q, 2, transformer_options=to)      # attn1: self
                call(st, q, ctx, ctx, 2, transformer_options=to)  # attn2: cross
        finally:
            _runtime._forward.reset(tok)
    run = st.run
    # 3 steps x 3 blocks x 2 kinds = 18 calls; 8-bit would be steps 1-2, block input:1, self = 2 calls,
    # which on CPU without the interpreter fall back as exact:cpu; the other 16 are exact by schedule.
    assert run["paths"] == {"exact:schedule": 16, "exact:cpu": 2}
    assert run["step_calls"][0] == {"exact:schedule": 6}
    assert run["step_calls"][1] == {"exact:schedule": 5, "exact:cpu": 1}
    assert run["blocks"][(0, "self")] == {"exact:schedule": 1, "exact:cpu": 2}
    assert run["blocks"][(0, "cross")] == {"exact:schedule": 3}


def test_counting_fallback_self_starts_block(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    st = make_state(Schedule.from_strings(blocks="1"))
    fw = _runtime._Forward(0, 1)
    tok = _runtime._forward.set(fw)
    try:
        x, ctx = rand(1, 16, 32), rand(1, 4, 32)
        for _ in range(3):          # self, cross per block (Wan-like)
            call(st, x, x, x, 2)
            call(st, x, ctx, ctx, 2)
    finally:
        _runtime._forward.reset(tok)
    assert {k: dict(v) for k, v in st.run["blocks"].items()} == {
        (0, "self"): {"exact:schedule": 1}, (0, "cross"): {"exact:schedule": 1},
        (1, "self"): {"exact:cpu": 1}, (1, "cross"): {"exact:cpu": 1},
        (2, "self"): {"exact:schedule": 1}, (2, "cross"): {"exact:schedule": 1}}


def test_block_patch_sets_identity_and_chains(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    st = make_state(Schedule.from_strings(blocks="single:1"))
    prev_called = []

    def prev_patch(args, extra):
        prev_called.append(True)
        return extra["original_block"](args)

    def block_body(args):
        call(st, args["x"], args["x"], args["x"], 2)
        return {"img": args["x"]}

    p_double = st.block_patch(0, "double", 0, None)
    p_single = st.block_patch(3, "single", 1, prev_patch)
    tok = _runtime._forward.set(_runtime._Forward(0, 1))
    try:
        x = rand(1, 16, 32)
        p_double({"x": x}, {"original_block": block_body})
        p_single({"x": x}, {"original_block": block_body})
    finally:
        _runtime._forward.reset(tok)
    assert prev_called == [True]
    assert {k: dict(v) for k, v in st.run["blocks"].items()} == {(0, "self"): {"exact:schedule": 1},
                                                                 (3, "self"): {"exact:cpu": 1}}


def test_state_survives_deepcopy():
    import copy

    st = make_state()
    opts = {"transformer_options": {"optimized_attention_override": st, "comfy_sage_state": st}}
    c = copy.deepcopy(opts)
    assert c["transformer_options"]["optimized_attention_override"] is st


INTERPRET_SCRIPT = textwrap.dedent("""
    import json, torch
    from comfy_sage.nodes import _runtime
    from comfy_sage.kernels import reset_counters
    def func(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kw):
        if not skip_reshape:
            b = q.shape[0]; q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        return o if skip_output_reshape else o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)
    st = _runtime.SageState(True, "fp16", None, False, {})
    g = torch.Generator().manual_seed(0)
    res = {}
    # ComfyUI's [B, L, H*D] layout (Nq != Nk) and skip_reshape [B, H, L, D] with skip_output_reshape
    q = torch.randn(1, 32, 2 * 32, generator=g).half(); k = torch.randn(1, 48, 64, generator=g).half()
    v = torch.randn(1, 48, 64, generator=g).half()
    out = st(func, q, k, v, 2, transformer_options={}, _inside_attn_wrapper=True)
    ref = func(q, k, v, 2)
    res["bld"] = [list(out.shape), out.dtype == q.dtype, float((out.float() - ref).abs().max())]
    qh = torch.randn(1, 2, 32, 32, generator=g).half()
    out = st(func, qh, qh, qh, 2, skip_reshape=True, skip_output_reshape=True, transformer_options={},
             _inside_attn_wrapper=True)
    ref = func(qh, qh, qh, 2, skip_reshape=True, skip_output_reshape=True)
    res["bhld"] = [list(out.shape), out.dtype == qh.dtype, float((out.float() - ref).abs().max())]
    res["paths"] = dict(st.run["paths"])
    print(json.dumps(res))
""")


def test_int8_kernel_path_through_interpreter():
    """The override runs the real Triton kernel (TRITON_INTERPRET=1, tiny shapes) for both ComfyUI layouts, returns
    the layout ComfyUI expects, and stays close to exact attention."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", INTERPRET_SCRIPT], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["bld"][:2] == [[1, 32, 64], True] and res["bld"][2] < 0.05
    assert res["bhld"][:2] == [[1, 2, 32, 32], True] and res["bhld"][2] < 0.05
    assert res["paths"] == {"int8-fp16pv": 2}


# ---- report and compare ----------------------------------------------------------------------------------------
class FakeModel:
    def __init__(self, state):
        self.model_options = {"transformer_options": {"comfy_sage_state": state}}


def fake_run(state, step_times, paths):
    state.new_run(len(step_times))
    for i, t in enumerate(step_times):
        state.run["steps"][i] += t
        state.run["forwards"] += 1
    for p, c in paths.items():
        for _ in range(c):
            state.record(p, 0, 0, "self")


def test_report_node_text():
    sage, base = make_state(), _runtime.SageState(False, "auto", None, False, {}, label="default")
    fake_run(sage, [0.10, 0.10], {"int8-fp8pv": 6, "exact:mask": 2})
    fake_run(base, [0.30, 0.30], {})
    out = SageAttentionReport().report(FakeModel(sage), {"samples": None}, FakeModel(base), {"samples": None})
    text = out["result"][0]
    assert out["ui"]["text"] == [text]
    assert "int8-fp8pv=6" in text and "exact:mask=2" in text and "(6 8-bit)" in text
    assert "step 0: 100.0 ms" in text and "speed-up vs default: 3.000x" in text
    none = SageAttentionReport().report(object(), {"samples": None})["result"][0]
    assert "did not pass through Apply SageAttention" in none


def test_compare_images_metrics_and_heatmap():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 32, 48, 3, generator=g)
    heat, text = SageAttentionCompareImages().compare(a, a.clone())["result"]
    assert "PSNR inf" in text and "SSIM 1.0000" in text and "max abs 0" in text
    assert heat.shape == (2, 32, 48, 3) and float(heat.max()) == 0.0
    b = a.clone()
    b[:, 10:20, 10:20, :] += 0.1
    sage, base = make_state(), make_state()
    fake_run(sage, [0.5], {})
    fake_run(base, [1.0], {})
    heat, text = SageAttentionCompareImages().compare(a, b, FakeModel(base), FakeModel(sage))["result"]
    mse = 0.01 * (100 / (32 * 48))
    import math
    expected_psnr = 10 * math.log10(1 / mse)
    assert f"PSNR {expected_psnr:.2f} dB" in text
    assert "max abs 0.1" in text and "speed-up 2.000x" in text
    assert float(heat[:, 12, 12].min()) > 0.999 and float(heat[:, 0, 0].max()) == 0.0  # hot inside, cold outside
    noisy = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    _, t2 = SageAttentionCompareImages().compare(a, noisy)["result"]
    ssim = float(t2.split("SSIM ")[1].split(",")[0])
    assert 0 < ssim < 0.9 and "speed-up n/a" in t2
    with pytest.raises(ValueError, match="sizes differ"):
        SageAttentionCompareImages().compare(a, a[:, :16])


def test_compare_latents_video_and_nonfinite():
    a = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[0, :, 1] = float("nan")
    heat, text = SageAttentionCompareLatents().compare({"samples": a}, {"samples": b})["result"]
    assert heat.shape == (3, 8, 8, 3)  # one heat-map frame per latent frame
    assert "NON-FINITE" in text


def test_apply_node_rejects_non_schedule():
    with pytest.raises(TypeError, match="schedule"):
        ApplySageAttention().apply(model=None, enabled=True, pv="auto", print_summary=False, schedule="0-3")


def test_hook_error_names_minimum_version():
    assert _runtime.MIN_COMFYUI_VERSION == "0.3.60"
    err = _runtime.HookMissing("x")
    assert isinstance(err, RuntimeError)
