"""Per-site calibration: the kernel-level measurement (real Triton kernels; TRITON_INTERPRET=1 on CPU, tiny shapes),
decisions and their JSON, `enable_sage(..., calibrate=True)` on a tiny Wan with planted outlier layers, and the
ComfyUI calibrate node driven without ComfyUI."""
import json
import math

import pytest
import torch

from comfy_sage.kernels import _arch, counters, reset_counters
from comfy_sage.kernels import calibrate as cal
from comfy_sage.kernels.calibrate import Calibration, Calibrator, variant_errors
from comfy_sage.kernels.schedule import Schedule
from kernel_cases import exact, rel_l1

if not _arch.interpreting() and not torch.cuda.is_available():
    pytest.skip("the 8-bit kernel needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BUDGET = cal.DEFAULT_BUDGET


def randn(*shape, seed=0, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


def qk_offset(q, k, channel=3, q_off=1000.0, k_off=50.0):
    """A big per-channel offset on q and k (the same value on every token). Exact attention does not see it
    (it shifts every score of a row alike), but q's per-token INT8 scale is spent on it: its other channels
    round to nothing."""
    q, k = q.clone(), k.clone()
    q[..., channel] = q_off
    k[..., channel] = k_off
    return q, k


# ---- one attention call ------------------------------------------------------------------------------------------
def test_planted_outliers_measure_far_worse_than_randn():
    q, k, v = (randn(1, 2, 64, 32, seed=s) for s in range(3))
    base = variant_errors(q, k, v)
    assert list(base) == ["fp8", "fp16", "fine"]
    assert base["fp16"] < 0.02 and base["fine"] < 0.02 and base["fp8"] < BUDGET, base
    qo, ko = qk_offset(q, k)
    off = variant_errors(qo, ko, v)
    spiky = k.clone()
    spiky[:, :, ::3, 4] = 1000.0  # heavy-tailed keys, in a channel q does not use (exact ignores it)
    qz = q.clone()
    qz[..., 4] = 0
    heavy = variant_errors(qz, spiky, v)
    for errs in (off, heavy):
        for pv in ("fp8", "fp16", "fine"):
            assert errs[pv] > 3 * BUDGET and errs[pv] > 5 * base[pv], (errs, base)
    # sparser outlier keys: per-token K scales ("fine") cost only those keys, a shared scale costs every key it
    # covers (a quarter of a key block: each lane quad has its own scale). Both rotate q and k, which spreads the
    # outlier channel over the head and so helps both (fp16 0.42 -> 0.29, fine 0.21 -> 0.20 here, unrotated ->
    # rotated): fine keeps its edge, smaller
    sparse = k.clone()
    sparse[:, :, ::17, 4] = 1000.0
    few = variant_errors(qz, sparse, v)
    assert few["fine"] < few["fp16"] / 1.3, few


@pytest.mark.parametrize("causal,hq,hkv", [(False, 2, 2), (True, 2, 2), (False, 4, 2)])
def test_sampled_rows_are_the_full_calls_rows(causal, hq, hkv):
    """Q is quantized per token and K/V from all keys: measuring on sampled rows gives the error of exactly those
    rows of the full call (grouped-query heads included)."""
    q = randn(2, hq, 80, 32, seed=10)
    k, v = randn(2, hkv, 80, 32, seed=11), randn(2, hkv, 80, 32, seed=12)
    idx = cal.sample_rows(80, 16)
    assert len(idx) == 16 and int(idx[0]) == 0 and int(idx[-1]) == 79
    errs = variant_errors(q, k, v, is_causal=causal, rows=16)
    ref = exact(q.float(), k.float(), v.float(), causal)[0][:, :, idx.to(DEV)]
    for pv, e in errs.items():
        full = cal.sage_attention(q, k, v, is_causal=causal, pv=pv)[:, :, idx.to(DEV)]
        assert e == pytest.approx(rel_l1(full, ref), rel=1e-3), pv


def test_nonfinite_output_is_infinite_error(monkeypatch):
    real = cal.sage_attention

    def broken_fp8(q, k, v, pv, **kw):
        out = real(q, k, v, pv=pv, **kw)
        return out * float("nan") if pv == "fp8" else out

    monkeypatch.setattr(cal, "sage_attention", broken_fp8)
    q, k, v = (randn(1, 1, 32, 32, seed=s) for s in range(3))
    errs = variant_errors(q, k, v)
    assert errs["fp8"] == math.inf and errs["fp16"] < BUDGET
    assert cal.choose(errs) == "fp16"


def test_huge_bf16_v_needs_no_exact_attention():
    """V far beyond fp16's range in a bf16 model: per-channel FP8 scales and bf16 P·V keep 8-bit accurate, so
    calibration must not send such a layer to exact attention."""
    q, k, v = (randn(1, 2, 64, 32, seed=20 + s) for s in range(3))
    errs = variant_errors(q, k, v * 1e6)
    assert errs["fp8"] < BUDGET and errs["fp16"] < 0.02, errs


def test_measuring_is_not_counted():
    q, k, v = (randn(1, 1, 32, 32, seed=s) for s in range(3))
    reset_counters()
    cal.sage_attention(q, k, v, pv="fp16")
    variant_errors(q, k, v)
    assert counters() == {"int8-fp16pv": 1}


def test_candidates_follow_the_arch(monkeypatch):
    """The arch's pv="auto" choice (per head dim) is tried first, then its other paths fastest first, FP8 only
    where the GPU has it."""
    fp8_gpu = _arch.ArchEntry("fake", True, "fp8", "", {}, 0, pv_by={(64, False): "fp16"},  # FP16 at head dim <= 64
                              pv_order=("fp8", "fp16", "fine", "int8"))
    monkeypatch.setattr(_arch, "arch_of", lambda device: fp8_gpu)
    assert cal.candidates("cuda", 128) == ("fp8", "fp16", "fine", "int8")
    assert cal.candidates("cuda", 64) == ("fp16", "fp8", "fine", "int8")
    assert fp8_gpu.pv_for(64, causal=True) == "fp8" and fp8_gpu.pv_for(40) == "fp16"  # 40 runs padded to 64
    assert cal.candidates("cuda", 128, pv="fp16") == ("fp16", "fine")
    assert cal.candidates("cuda", 128, pv="int8") == ("int8", "fine")
    monkeypatch.setattr(_arch, "arch_of", lambda device: _arch.ARCHES["sm80"])
    assert cal.candidates("cuda", 128) == ("fp16", "fine", "int8")
    assert cal.candidates("cuda", 128, pv="fp8") == ("fine",)     # no FP8 tensor cores
    monkeypatch.setattr(_arch, "arch_of", lambda device: _arch.ARCHES["sm89"])
    assert cal.candidates("cuda", 128) == ("int8", "fp8", "fp16", "fine")
    monkeypatch.setattr(_arch, "arch_of", lambda device: _arch.ARCHES["sm86"])
    assert cal.candidates("cuda", 128) == ("int8", "fp16", "fine")
    monkeypatch.setattr(_arch, "arch_of", lambda device: None)
    assert cal.candidates("cpu", 64) == ()


def test_choose_takes_the_first_variant_within_budget():
    assert cal.choose({"fp8": 0.037, "fp16": 0.011}) == "fp8"
    assert cal.choose({"fp8": 0.07, "fp16": 0.011}) == "fp16"
    assert cal.choose({"fp16": 0.011, "fp8": 0.037}) == "fp16"  # the order is the preference
    assert cal.choose({"fp8": 0.3, "fp16": math.inf}) == "exact"
    assert cal.choose({"fp8": 0.03}, budget=0.02) == "exact"


def test_fingerprint_is_deterministic_and_sees_weights():
    def make(seed=0):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))

    a, b = make(), make()
    fp = cal.fingerprint(a)
    assert fp == cal.fingerprint(b) and len(fp) == 20
    assert cal.fingerprint(make(1)) != fp                 # other weights
    assert cal.fingerprint(a, extra=("lora", 0.8)) != fp  # other patches
    with torch.no_grad():
        b[0].weight[0, 0] += 1.0                          # a sampled value
    assert cal.fingerprint(b) != fp
    assert cal.fingerprint(make().half()) != fp           # other dtype
    assert cal.fingerprint(list(a.named_parameters()) + list(a.named_buffers())) == fp


# ---- decisions and their JSON ------------------------------------------------------------------------------------
SITES = {"0:self": {"errors": {"fp8": 0.49, "fp16": 0.48}, "group": "double", "group_index": 0},
         "0:cross": {"errors": {"fp8": 0.02, "fp16": 0.004}, "group": "double", "group_index": 0},
         "1:self": {"errors": {"fp8": 0.07, "fp16": 0.01}, "group": "double", "group_index": 1},
         "1:cross": {"errors": {"fp8": math.inf, "fp16": math.inf}, "group": "double", "group_index": 1}}


def test_decision_json_roundtrip(tmp_path):
    c = Calibration.decide(SITES, 0.05, fingerprint="abc", arch="sm90", model="Tiny")
    assert c.schedule.overrides == {"0:self": "exact", "0:cross": "fp8", "1:self": "fp16", "1:cross": "exact"}
    path = c.save(tmp_path / "x.json")
    d = json.loads(path.read_text())  # plain JSON (no Infinity), readable and editable
    assert d["sites"]["1:cross"]["errors"] == {"fp8": "inf", "fp16": "inf"}
    assert Schedule.from_dict(d["schedule"]) == c.schedule
    back = Calibration.load(path)
    assert back == c and back.schedule == c.schedule
    assert back.redecide(0.1).schedule.overrides["1:self"] == "fp8"
    assert "1:cross -> exact" in "\n".join(c.lines()) and "fp8 non-finite" in "\n".join(c.lines())
    path.write_text("{not json")
    with pytest.raises(ValueError, match="does not parse"):
        Calibration.load(path)


def test_merge_respects_the_users_schedule():
    c = Calibration.decide(SITES, 0.05)
    user = Schedule.from_strings(exact_blocks="0", attention="self", overrides={"1:self": "fp8"})
    m = c.merged(user)
    assert m.overrides == {"0:self": "exact", "1:cross": "exact", "1:self": "fp8"}  # "0:cross": block 0 is exact
    assert m.variant(0, 4, 0, "cross") is None     # 8-bit is never switched on where the user keeps exact
    assert m.variant(0, 4, 1, "self") == "fp8"     # the user's own override wins
    steps = c.merged(Schedule.from_strings(exact_steps="0"))
    assert steps.variant(0, 4, 0, "cross") is None and steps.variant(1, 4, 0, "cross") == "fp8"


def test_new_budget_redecides_without_measuring(tmp_path, monkeypatch):
    path = cal.cache_path("fp", "interpret", "Tiny", tmp_path)
    Calibration.decide(SITES, 0.05, fingerprint="fp", arch="interpret", model="Tiny").save(path)
    monkeypatch.setattr(cal, "variant_errors", lambda *a, **k: pytest.fail("measured again"))
    c = Calibrator("fp", model="Tiny", budget=0.1, directory=tmp_path)
    assert c.start(DEV) is False and c.status == "loaded"
    assert c.result.schedule.overrides["1:self"] == "fp8" and c.result.budget == 0.1
    assert Calibration.load(path).budget == 0.1  # saved for next time
    with pytest.raises(ValueError, match="budget"):
        Calibrator("fp", budget=-1)


def test_default_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(cal.ENV_DIR, str(tmp_path / "cal"))
    assert cal.default_dir() == tmp_path / "cal"
    assert cal.cache_path("f", "sm90", "Wan Model") == tmp_path / "cal" / "Wan_Model-f-sm90.json"
    monkeypatch.delenv(cal.ENV_DIR)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cal.default_dir() == tmp_path / ".cache" / "comfy_sage" / "calibration"


# ---- diffusers: a tiny Wan with planted outlier layers ---------------------------------------------------------
class _Pin(torch.nn.Module):
    """Wraps an attention's q or k norm: sets some channels to a constant (a per-channel offset on every token)."""

    def __init__(self, norm, channels, value, dim):
        super().__init__()
        self.norm = norm
        keep, fill = torch.ones(dim), torch.zeros(dim)
        keep[channels], fill[channels] = 0.0, value
        self.register_buffer("keep", keep)
        self.register_buffer("fill", fill)

    def forward(self, x):
        y = self.norm(x)
        return y * self.keep.to(y.dtype) + self.fill.to(y.dtype)


class _Spikes(torch.nn.Module):
    """Wraps a k norm: huge values on every third token in some channels (heavy-tailed keys)."""

    def __init__(self, norm, channels, value, dim):
        super().__init__()
        self.norm = norm
        fill = torch.zeros(dim)
        fill[channels] = value
        self.register_buffer("fill", fill)

    def forward(self, x):
        y = self.norm(x)
        every3 = (torch.arange(y.shape[1], device=y.device) % 3 == 0).to(y.dtype)[:, None]
        return y + every3 * self.fill.to(y.dtype)


PLANTED = {"0:self", "1:cross"}
RUN = dict(num_frames=5, height=32, width=32, guidance_scale=5.0, max_sequence_length=16, output_type="latent")


def plant(transformer):
    """Block 0 self-attention: heavy-tailed keys in a channel pair q leaves at zero (rotary keeps the pair
    together); block 1 cross-attention: a big per-channel offset on q and k. Exact attention is blind to both;
    INT8 Q·Kᵀ is not."""
    heads = transformer.config.num_attention_heads
    hd = transformer.config.attention_head_dim
    dim = heads * hd
    a = transformer.blocks[0].attn1
    pair = [h * hd + c for h in range(heads) for c in (4, 5)]
    a.norm_q, a.norm_k = _Pin(a.norm_q, pair, 0.0, dim), _Spikes(a.norm_k, pair, 1000.0, dim)
    c = transformer.blocks[1].attn2
    ch = [h * hd + 3 for h in range(heads)]
    c.norm_q, c.norm_k = _Pin(c.norm_q, ch, 1000.0, dim), _Pin(c.norm_k, ch, 50.0, dim)
    return transformer


@pytest.fixture(scope="module")
def planted_wan():
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from comfy_sage.pipelines._tiny import tiny_wan_pipeline

    pipe = tiny_wan_pipeline(dtype=torch.bfloat16, num_layers=3)
    plant(pipe.transformer)
    return pipe.to(DEV)


def int8_calls():
    return sum(v for p, v in counters().items() if p.startswith("int8-"))


def run_pipe(pipe, steps=2):
    return pipe("a fox", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **RUN)


@pytest.fixture(scope="module")
def first_run(planted_wan, tmp_path_factory):
    """enable_sage(calibrate=True) on a fresh cache; one 2-step CFG run (4 transformer forwards)."""
    from comfy_sage.pipelines import disable_sage, enable_sage

    d = tmp_path_factory.mktemp("calibration")
    reports = enable_sage(planted_wan, calibrate=True, calibration_dir=d)
    reset_counters()
    try:
        run_pipe(planted_wan)
    finally:
        disable_sage(planted_wan)
    return d, reports[0], counters()


def test_calibration_keeps_exactly_the_planted_sites_exact(first_run):
    d, report, ran = first_run
    c = report.calibrator
    assert c.status == "measured"
    decision = c.result.schedule.overrides
    assert set(decision) == {f"{b}:{k}" for b in range(3) for k in ("self", "cross")}
    assert {s for s, v in decision.items() if v == "exact"} == PLANTED, "\n".join(c.result.lines())
    assert all(v in ("fp8", "fp16") for s, v in decision.items() if s not in PLANTED)
    for s in PLANTED:
        assert min(c.result.sites[s]["errors"].values()) > 2 * BUDGET
    # the measuring forward ran exact attention; the other 3 ran 8-bit on the 4 unplanted sites only
    assert sum(v for p, v in ran.items() if p.startswith("int8-")) == 3 * 4, ran
    files = list(d.iterdir())
    assert [f.name for f in files] == [c.path.name] and c.path.name.startswith("WanTransformer3DModel-")
    text = str(report)
    assert "0:self -> exact" in text and "1:cross -> exact" in text and "measured in" in text


def test_second_run_loads_the_json_and_does_not_measure(first_run, planted_wan, monkeypatch):
    from comfy_sage.pipelines import disable_sage, enable_sage

    d, first, _ = first_run
    monkeypatch.setattr(cal, "variant_errors", lambda *a, **k: pytest.fail("calibration measured again"))
    report = enable_sage(planted_wan, calibrate=True, calibration_dir=d)[0]
    reset_counters()
    try:
        run_pipe(planted_wan)
    finally:
        disable_sage(planted_wan)
    assert report.calibrator.status == "loaded"
    assert report.calibrator.result.schedule == first.calibrator.result.schedule
    assert int8_calls() == 4 * 4  # every forward 8-bit on the 4 unplanted sites


def test_edited_json_is_honoured(first_run, planted_wan):
    from comfy_sage.pipelines import disable_sage, enable_sage, sage_state

    d, first, _ = first_run
    path = first.calibrator.path
    saved = path.read_text()
    data = json.loads(saved)
    data["schedule"]["overrides"]["2:self"] = "exact"
    path.write_text(json.dumps(data, indent=2))
    try:
        enable_sage(planted_wan, calibrate=True, calibration_dir=d)
        state = sage_state(planted_wan.transformer)
        state.trace = []
        reset_counters()
        run_pipe(planted_wan, steps=1)
    finally:
        disable_sage(planted_wan)
        path.write_text(saved)
    assert int8_calls() == 2 * 3  # CFG x the 3 sites still 8-bit
    variants = state.trace[-1][2]
    assert variants["blocks.2.attn1"] is None and variants["blocks.0.attn1"] is None
    assert variants["blocks.2.attn2"] is not None


def test_measuring_forward_is_exact(planted_wan, tmp_path):
    """The calibration forward's output is exact attention's; the next forward runs 8-bit."""
    from comfy_sage.pipelines import disable_sage, enable_sage

    model = planted_wan.transformer
    kw = dict(hidden_states=randn(1, 4, 2, 4, 4, seed=1), timestep=torch.tensor([500], device=DEV),
              encoder_hidden_states=randn(1, 8, 32, seed=2), return_dict=False)
    with torch.no_grad():
        ref = model(**kw)[0]
        enable_sage(model, calibrate=True, calibration_dir=tmp_path)
        try:
            measured = model(**kw)[0]
            eight_bit = model(**kw)[0]
        finally:
            disable_sage(model)
    assert torch.equal(measured, ref)
    assert not torch.equal(eight_bit, ref)
    assert len(list(tmp_path.iterdir())) == 1


def test_processor_route_is_measured_too(tmp_path):
    """SD3's processors call F.scaled_dot_product_attention themselves (wrapped, not dispatched): calibration
    measures them the same way."""
    pytest.importorskip("diffusers")
    from diffusers import SD3Transformer2DModel

    from comfy_sage.pipelines import disable_sage, enable_sage

    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32,
                              pooled_projection_dim=16, out_channels=4).to(DEV, torch.bfloat16)
    kw = dict(hidden_states=randn(1, 4, 8, 8, seed=1), encoder_hidden_states=randn(1, 6, 16, seed=2),
              pooled_projections=randn(1, 16, seed=3), timestep=torch.tensor([10], device=DEV), return_dict=False)
    with torch.no_grad():
        ref = m(**kw)[0]
        report = enable_sage(m, calibrate=True, calibration_dir=tmp_path)[0]
        try:
            assert {r[1] for r in report.sites} == {"sdpa"}
            measured = m(**kw)[0]
            reset_counters()
            m(**kw)
        finally:
            disable_sage(m)
    assert torch.equal(measured, ref)
    assert report.calibrator.result.schedule.overrides == {"0:self": "fp8", "1:self": "fp8"}
    assert int8_calls() == 2


# ---- ComfyUI: the calibrate node and the override, without ComfyUI ---------------------------------------------
def test_calibrate_node_contract():
    import comfy_sage
    from comfy_sage.nodes.sage_nodes import SageAttentionCalibrate

    assert comfy_sage.NODE_CLASS_MAPPINGS["SageAttentionCalibrate"] is SageAttentionCalibrate
    assert comfy_sage.NODE_DISPLAY_NAME_MAPPINGS["SageAttentionCalibrate"] == "SageAttention Calibrate"
    it = SageAttentionCalibrate.INPUT_TYPES()
    assert it["required"]["model"] == ("MODEL",)
    assert it["required"]["budget"][1]["default"] == BUDGET
    assert it["optional"]["schedule"][0] == "SAGE_SCHEDULE"
    assert SageAttentionCalibrate.RETURN_TYPES == ("MODEL",) and SageAttentionCalibrate.CATEGORY == "sageattention"
    with pytest.raises(TypeError, match="schedule"):
        SageAttentionCalibrate().apply(model=None, schedule="0-3")


def _original(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """ComfyUI's optimized_attention contract ([B, N, H*D] in and out), exact."""
    _original.calls += 1
    b = q.shape[0]
    q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, out.shape[2], -1)


_original.calls = 0


def _comfy_forward(state, x):
    """One model call as ComfyUI runs a DiT: our block patches around two blocks, one self-attention each. Block 0
    carries a per-channel q/k offset, block 1 ordinary activations. Returns the two attention outputs."""
    q = randn(1, 48, 2 * 32, seed=5)
    k, v = randn(1, 48, 64, seed=6), randn(1, 48, 64, seed=7)
    qo, ko = q.clone(), k.clone()
    for h in range(2):
        qo[..., h * 32 + 3], ko[..., h * 32 + 3] = 1000.0, 50.0
    outs = []

    def block(inputs):
        outs.append(state(_original, *inputs, 2, transformer_options={}, _inside_attn_wrapper=True))
        return {}

    def model(x, transformer_options=None):
        state.block_patch(0, "double", 0, None)({}, {"original_block": lambda _: block((qo, ko, v))})
        state.block_patch(1, "double", 1, None)({}, {"original_block": lambda _: block((q, k, v))})
        return x

    state.apply_model_wrapper(model, x, transformer_options={})
    return outs


def test_comfy_override_calibrates_then_reuses(tmp_path, monkeypatch):
    from comfy_sage.nodes import _runtime
    from comfy_sage.nodes.sage_nodes import SageAttentionReport

    def make():
        c = Calibrator("w" * 20, model="Tiny", budget=BUDGET, directory=tmp_path)
        return _runtime.SageState(True, "auto", None, False, {"family": "Tiny", "num_blocks": 2}, calibrator=c)

    st, x = make(), randn(1, 4)
    before = _original.calls
    measured = _comfy_forward(st, x)
    assert _original.calls == before + 2  # the measuring call runs the original (exact) attention
    assert dict(st.run["paths"]) == {"exact:calibration": 2}
    assert st.calibrator.result.schedule.overrides == {"0:self": "exact", "1:self": "fp8"}
    eight = _comfy_forward(st, x)
    assert dict(st.run["blocks"][(0, "self")]) == {"exact:calibration": 1, "exact:schedule": 1}
    assert dict(st.run["blocks"][(1, "self")]) == {"exact:calibration": 1, "int8-fp8pv": 1}
    assert torch.equal(eight[0], measured[0]) and not torch.equal(eight[1], measured[1])

    class FakeModel:
        model_options = {"transformer_options": {"comfy_sage_state": st}}

    text = SageAttentionReport().report(FakeModel(), {"samples": None})["result"][0]
    assert "0:self -> exact" in text and "1:self -> fp8" in text and "measured in" in text

    monkeypatch.setattr(cal, "variant_errors", lambda *a, **k: pytest.fail("measured again"))
    again = make()
    _comfy_forward(again, x)
    assert again.calibrator.status == "loaded"
    assert dict(again.run["paths"]) == {"exact:schedule": 1, "int8-fp8pv": 1}


def test_comfy_fingerprint_ignores_whether_patches_are_merged():
    """ComfyUI merges LoRA patches into the weights in place (keeping a backup) while a model is loaded: the
    fingerprint must read the originals, and must change with the patches."""
    from collections import namedtuple

    from comfy_sage.nodes import _runtime

    torch.manual_seed(0)
    dm = torch.nn.Linear(4, 4)
    Backup = namedtuple("Backup", ["weight", "inplace_update"])

    class Patcher:
        def __init__(self, patches, backup=None):
            self.patches, self.backup = patches, backup or {}

    lora = {"diffusion_model.weight": [(0.8, (torch.ones(4, 4),), 1.0, None, None)]}
    unmerged = _runtime.weights_fingerprint(Patcher(lora), dm)
    original = dm.weight.detach().clone()
    with torch.no_grad():
        dm.weight += 0.8  # what patch_model does
    merged = _runtime.weights_fingerprint(Patcher(lora, {"diffusion_model.weight": Backup(original, False)}), dm)
    assert merged == unmerged
    other = {"diffusion_model.weight": [(0.5, (torch.ones(4, 4),), 1.0, None, None)]}
    assert _runtime.weights_fingerprint(Patcher(other, {"diffusion_model.weight": Backup(original, False)}),
                                        dm) != unmerged


def test_merged_keeps_a_fixed_sparse_level_on_self_sites_decided_8bit():
    """A base schedule with a manual sparse level: calibration's exact decisions stand, its dense 8-bit choices on
    self-attention sites give way to the level, cross sites and the user's own overrides keep theirs."""
    decided = cal.Calibration(Schedule(overrides={"0:self": "fp8", "1:self": "exact", "2:cross": "fp16",
                                                  "3:self": "fine"}))
    base = Schedule.from_strings(sparse="keep=0.3", overrides={"3:self": "fp16"})
    ov = decided.merged(base).overrides
    assert ov == {"0:self": "sparse:keep=0.3", "1:self": "exact", "2:cross": "fp16", "3:self": "fp16"}
    assert decided.merged(Schedule.from_strings(sparse="auto")).overrides["0:self"] == "fp8"
