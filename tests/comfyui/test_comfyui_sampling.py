"""Real ComfyUI sampling with tiny models built from ComfyUI's own classes: which steps/blocks ran 8-bit, proved by
the counters. The 8-bit path runs the real Triton kernel through the interpreter (TRITON_INTERPRET=1, CPU)."""
import copy

import pytest
import torch

import conftest as C

pytestmark = pytest.mark.usefixtures("comfy")


def patched(pack, model, *, exact_steps=None, blocks="", exact_blocks=None, attention="all", pv="auto",
            enabled=True):
    """Apply SageAttention through the pack's nodes, with a step and/or block schedule where asked."""
    M = pack.NODE_CLASS_MAPPINGS
    sched = None
    if exact_steps is not None:
        sched, = M["SageAttentionStepSchedule"]().build(steps="", exact_steps=exact_steps)
    if blocks or exact_blocks is not None or attention != "all":
        sched, = M["SageAttentionBlockSchedule"]().build(blocks=blocks, exact_blocks=exact_blocks or "",
                                                         attention=attention, schedule=sched)
    m, = M["ApplySageAttention"]().apply(model, enabled, pv, False, sched)
    return m


def state(m):
    return m.model_options["transformer_options"]["comfy_sage_state"]


def eight_bit(counter):
    return sum(c for p, c in counter.items() if p.startswith("int8"))


@pytest.mark.parametrize("kind,blocks_per_step,calls_per_block", [("flux", 5, 1), ("wan", 3, 2), ("unet", 7, 2)])
def test_step_schedule_counts(pack, kind, blocks_per_step, calls_per_block):
    model = C.BUILDERS[kind](torch.float16)
    m = patched(pack, model, exact_steps="0, -1", pv="fp16")
    out = C.sample(m, kind, torch.float16, steps=4, cfg=2.0)  # cond+uncond in one batch (CFG)
    assert torch.isfinite(out).all()
    run = state(m).run
    per_step = blocks_per_step * calls_per_block
    for step in range(4):
        calls = run["step_calls"][step]
        assert sum(calls.values()) == per_step, (step, dict(calls))
        if step in (0, 3):
            assert calls == {"exact:schedule": per_step}
        else:
            assert calls == {"int8-fp16pv": per_step}
    assert run["num_steps"] == 4 and run["forwards"] == 4


def test_block_schedule_flux_groups(pack):
    model = C.tiny_flux(torch.float16)
    m = patched(pack, model, exact_blocks="double:1, single:2")
    C.sample(m, "flux", torch.float16, steps=2)
    blocks = state(m).run["blocks"]
    # flat order: double 0-1, single 0-2 -> flat 0..4; exact: double:1 (flat 1) and single:2 (flat 4)
    assert sorted(b for b, _ in blocks) == [0, 1, 2, 3, 4]
    for flat in (0, 2, 3):
        assert eight_bit(blocks[(flat, "self")]) == 2
    for flat in (1, 4):
        assert blocks[(flat, "self")] == {"exact:schedule": 2}


def test_block_schedule_wan_self_vs_cross(pack):
    m = patched(pack, C.tiny_wan(torch.float16), blocks="0-1", attention="self")
    C.sample(m, "wan", torch.float16, steps=2)
    blocks = state(m).run["blocks"]
    assert eight_bit(blocks[(0, "self")]) == 2 and eight_bit(blocks[(1, "self")]) == 2
    assert blocks[(2, "self")] == {"exact:schedule": 2}
    for b in range(3):
        assert blocks[(b, "cross")] == {"exact:schedule": 2}


def test_unet_groups(pack):
    m = patched(pack, C.tiny_unet(torch.float16), exact_blocks="middle, output")
    C.sample(m, "unet", torch.float16, steps=1)
    run = state(m).run
    # input_blocks 1 and 2 carry transformers (flat 0, 1); middle is flat 2; output blocks flat 3..6
    assert eight_bit(run["paths"]) == 4 and run["paths"]["exact:schedule"] == 10


def test_original_untouched_and_default_restored(pack):
    model = C.tiny_wan(torch.float16)
    before = copy.copy(model.model_options["transformer_options"])
    m = patched(pack, model)
    assert "optimized_attention_override" not in model.model_options["transformer_options"]
    assert model.model_options["transformer_options"] == before
    ref = C.sample(model, "wan", torch.float16, steps=2, seed=3)
    again = C.sample(model, "wan", torch.float16, steps=2, seed=3)
    assert torch.equal(ref, again)
    out = C.sample(m, "wan", torch.float16, steps=2, seed=3)
    assert eight_bit(state(m).run["paths"]) > 0
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 0.05  # 8-bit is close, not identical


def test_fp32_model_falls_back_to_original(pack):
    model = C.tiny_flux(torch.float32)
    m = patched(pack, model)
    ref = C.sample(model, "flux", torch.float32, steps=2, seed=5)
    out = C.sample(m, "flux", torch.float32, steps=2, seed=5)
    assert torch.equal(out, ref)  # exact fallback is the original function: bit-identical
    assert state(m).run["paths"] == {"exact:fp32": 10}


def test_chains_existing_override(pack):
    model = C.tiny_flux(torch.float32)
    seen = []

    def other(func, *args, **kwargs):
        seen.append(1)
        return func(*args, **kwargs)

    pre = model.clone()
    pre.model_options["transformer_options"]["optimized_attention_override"] = other
    m = patched(pack, pre)
    C.sample(m, "flux", torch.float32, steps=1)
    assert len(seen) == 5  # fp32 -> our exact path hands every call to the other pack's override


def test_bad_blocks_fail_before_sampling(pack):
    ScheduleError = pack.kernels.schedule.ScheduleError  # the pack's own module tree, as ComfyUI loaded it
    model = C.tiny_flux(torch.float16)
    with pytest.raises(ScheduleError, match="'38-39'"):
        patched(pack, model, blocks="0-3, 38-39")
    m = patched(pack, model, exact_steps="9")
    with pytest.raises(ScheduleError, match="'9'.*out of range for 4 steps"):
        C.sample(m, "flux", torch.float16, steps=4)
    assert state(m).run["forwards"] == 0  # raised before the first model call


def test_report_with_baseline(pack):
    M = pack.NODE_CLASS_MAPPINGS
    model = C.tiny_wan(torch.float16)
    sage, = M["ApplySageAttention"]().apply(model, True, "auto", False, None)
    base, = M["ApplySageAttention"]().apply(model, False, "auto", False, None)
    a = C.sample(base, "wan", torch.float16, steps=2)
    b = C.sample(sage, "wan", torch.float16, steps=2)
    text = M["SageAttentionReport"]().report(sage, {"samples": b}, base, {"samples": a})["result"][0]
    assert "int8-fp8pv=12" in text and "speed-up vs default" in text and "step 1:" in text
    heat, metrics = M["SageAttentionCompareLatents"]().compare({"samples": a}, {"samples": b}, base, sage)["result"]
    assert heat.shape[-1] == 3 and "PSNR" in metrics and "speed-up" in metrics


@pytest.mark.parametrize("sparse_first", [False, True])
def test_sparse_node_with_apply(pack, sparse_first):
    """Apply (exact on the last step) and Sparse (manual, dense on step 0), in either order, make one override:
    step 1 runs sparse self-attention and dense cross-attention, and the report gives each self site's density."""
    M = pack.NODE_CLASS_MAPPINGS
    model = C.tiny_wan(torch.float16)
    if sparse_first:
        first, = M["SageAttentionSparse"]().apply(model, "manual", 0.5, "0", 0.05)
        m = patched(pack, first, exact_steps="-1", pv="fp16")
    else:
        first = patched(pack, model, exact_steps="-1", pv="fp16")
        m, = M["SageAttentionSparse"]().apply(first, "manual", 0.5, "0", 0.05)
    out = C.sample(m, "wan", torch.float16, steps=3)
    assert torch.isfinite(out).all()
    calls = state(m).run["step_calls"]
    assert calls[0] == {"int8-fp16pv": 6}
    assert calls[1] == {"int8-sparse": 3, "int8-fp16pv": 3}
    assert calls[2] == {"exact:schedule": 6}
    assert state(first).run["forwards"] == 0  # the first node's state no longer runs on this model
    text = M["SageAttentionReport"]().report(m, {"samples": out})["result"][0]
    assert "int8-sparse=3" in text and "sparse: 3 int8-sparse calls on 3 sites" in text and "2:self" in text


def test_sparse_node_calibrated(pack, tmp_path, monkeypatch):
    monkeypatch.setenv("COMFY_SAGE_CALIBRATION_DIR", str(tmp_path))
    M = pack.NODE_CLASS_MAPPINGS
    m, = M["SageAttentionSparse"]().apply(C.tiny_wan(torch.float16), "calibrated", 0.9, "", 0.05)
    C.sample(m, "wan", torch.float16, steps=2)
    st = state(m)
    assert st.calibrator.sparse and st.calibrator.status == "measured"
    assert st.run["step_calls"][0] == {"exact:calibration": 6}
    ov = st.calibrator.result.schedule.overrides
    for b in range(3):  # a site runs sparse exactly where calibration chose a level; cross-attention never
        sparse = dict(st.run["blocks"][(b, "self")]).get("int8-sparse", 0)
        assert sparse == (1 if ov[f"{b}:self"].startswith("sparse:") else 0)
        assert "int8-sparse" not in st.run["blocks"][(b, "cross")]
