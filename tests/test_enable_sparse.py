"""Block-sparse attention through the diffusers adapters: sparse backends registered on demand, enable_sage's
`sparse` (fixed levels, "auto" by calibration, dense steps; cross-attention always dense), per-site densities,
generate() and the CLI. Kernels run through TRITON_INTERPRET=1 on CPU, on tiny models with random weights."""
import functools
import json
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from comfy_sage.kernels import _arch, counters, reset_counters  # noqa: E402
from comfy_sage.kernels import calibrate as cal  # noqa: E402
from comfy_sage.kernels.schedule import Schedule, ScheduleError  # noqa: E402
from comfy_sage.pipelines import cli, disable_sage, enable_sage, sage_state, sage_video  # noqa: E402
from comfy_sage.pipelines._tiny import tiny_wan_pipeline  # noqa: E402
from comfy_sage.pipelines.backend import attend_with_lse, backend_member, redirect_sdpa  # noqa: E402

if not _arch.interpreting() and not torch.cuda.is_available():
    pytest.skip("the 8-bit kernel needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, seed=0, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


def rel(out, ref):
    return float((out.float() - ref.float()).abs().sum() / ref.float().abs().sum())


def int8_calls(c=None):
    return sum(v for k, v in (counters() if c is None else c).items() if k.startswith("int8-"))


@pytest.fixture(scope="module")
def wan():
    return tiny_wan_pipeline(dtype=torch.bfloat16).to(DEV)


def model_inputs(seed=1):
    """The tiny Wan transformer's input for 3 latent frames of 8 x 8: 48 tokens, two key blocks of the interpreter's
    32-token tiles, so a sparse selection has something to drop; 8 text tokens."""
    return dict(hidden_states=randn(1, 4, 3, 8, 8, seed=seed), timestep=torch.tensor([500], device=DEV),
                encoder_hidden_states=randn(1, 8, 32, seed=seed + 1), return_dict=False)


# ---- backends --------------------------------------------------------------------------------------------------
def test_sparse_backend_member_is_registered_once():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from comfy_sage.pipelines.enable import is_sage_backend

    m = backend_member("sparse:keep=0.8")
    assert backend_member("sparse:keep=0.80") is m and backend_member("sparse:keep=0.8") is m
    assert m.value == "comfy_sage_sparse_keep_0_8" and m.name == "COMFY_SAGE_SPARSE_KEEP_0_8"
    assert AttentionBackendName("comfy_sage_sparse_keep_0_8") is m and is_sage_backend(m)
    assert m in _AttentionBackendRegistry._backends and _AttentionBackendRegistry._is_context_parallel_available(m)
    assert backend_member("int8").value == "comfy_sage_int8"
    with pytest.raises(ValueError, match="unknown pv 'sparse:keep=2'"):
        backend_member("sparse:keep=2")
    with pytest.raises(ValueError, match="unknown pv 'int4'"):
        backend_member("int4")


def test_sparse_backend_runs_the_sparse_kernel_and_lse_calls_run_dense():
    import diffusers
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    q, k, v = (randn(1, 96, 2, 32, seed=s) for s in range(3))  # [B, N, H, D]: 3 key blocks
    member = backend_member("sparse:ratio=0.5")
    reset_counters()
    with diffusers.attention_backend(member.value):
        out = dispatch_attention_fn(q, k, v)
    assert counters() == {"int8-sparse": 1} and torch.isfinite(out).all()
    # an LSE (ring attention) is served by the dense 8-bit kernel of the same call
    reset_counters()
    o, lse = attend_with_lse(q, k, v, pv="sparse:ratio=0.5")
    assert int8_calls() == 1 and "int8-sparse" not in counters()
    o_dense, lse_dense = attend_with_lse(q, k, v, pv="auto")
    assert torch.equal(o, o_dense) and torch.equal(lse, lse_dense)
    # the SDPA shim (processors that call F.scaled_dot_product_attention) passes the variant on
    reset_counters()
    with redirect_sdpa("sparse:ratio=0.5"):
        F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    assert counters() == {"int8-sparse": 1}


# ---- enable_sage(sparse=...) -----------------------------------------------------------------------------------
def test_fixed_level_runs_sparse_self_attention_close_to_dense(wan):
    model, kw = wan.transformer, model_inputs()
    with torch.no_grad():
        ref = model(**kw)[0]
        enable_sage(model)
        try:
            dense = model(**kw)[0]
        finally:
            disable_sage(model)
        report = enable_sage(model, sparse="ratio=0.5")[0]
        reset_counters()
        try:
            out = model(**kw)[0]
            variants = {s.name: s.variant for s in sage_state(model).sites}
        finally:
            disable_sage(model)
    c = counters()
    assert c["int8-sparse"] == 2 and int8_calls(c) == 4, c  # 2 blocks: self sparse, cross dense
    assert variants["blocks.0.attn1"] == variants["blocks.1.attn1"] == "sparse:ratio=0.5"
    assert not any(str(variants[f"blocks.{b}.attn2"]).startswith("sparse") for b in (0, 1))
    # tile 0 keeps its own block only, tile 1 the sink block and its own: 3 of 4 block pairs
    assert report.densities() == {"blocks.0.attn1": 0.75, "blocks.1.attn1": 0.75}
    assert "sparse (ratio=0.5) at 2 sites" in str(report) and "mean density 75.0% over 1 calls" in str(report)
    assert torch.isfinite(out).all()
    # random weights: nearly uniform attention, so dropping a quarter of the blocks costs more than 8 bits do,
    # but the model's output stays close
    assert rel(dense, ref) < rel(out, ref) < 0.1
    assert F.cosine_similarity(out.float().flatten(), ref.float().flatten(), dim=0) > 0.99
    assert enable_sage(model, sparse=0.9)[0].sparse == "keep=0.9"  # a number is a keep level
    disable_sage(model)


def test_dense_steps_and_cross_attention_stay_dense(wan):
    enable_sage(wan, sparse="keep=0.9", dense_steps="0")
    state = sage_state(wan.transformer)
    state.trace = []
    reset_counters()
    try:
        wan("a fox", num_frames=5, height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
            max_sequence_length=16, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        disable_sage(wan)
    for step, _, variants in state.trace:
        sparse = {n for n, v in variants.items() if str(v).startswith("sparse:")}
        assert sparse == (set() if step == 0 else {"blocks.0.attn1", "blocks.1.attn1"}), (step, variants)
        assert all(v is not None for v in variants.values())  # dense steps run 8-bit, not exact
    assert counters()["int8-sparse"] == 2 * 2, counters()  # step 1 x CFG x 2 self sites
    # 8 tokens: one key block, which every tile keeps
    assert state.report.densities() == {"blocks.0.attn1": 1.0, "blocks.1.attn1": 1.0}


@pytest.fixture(scope="module")
def auto_run(wan, tmp_path_factory):
    """enable_sage(sparse="auto") on random weights: calibration (turned on by it) measures, then a forward runs
    its decision. Two sparse levels instead of seven keep the interpreter quick."""
    d = tmp_path_factory.mktemp("calibration")
    model, kw = wan.transformer, model_inputs()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cal, "sparse_errors", functools.partial(cal.sparse_errors, levels=(0.9, 0.2)))
        report = enable_sage(model, sparse="auto", calibration_dir=d)[0]
        try:
            with torch.no_grad():
                model(**kw)
                reset_counters()
                model(**kw)
            variants = {s.name: s.variant for s in sage_state(model).sites}
        finally:
            disable_sage(model)
    return d, report, counters(), variants


def test_auto_keeps_random_weights_dense(auto_run):
    _, report, ran, variants = auto_run
    c = report.calibrator
    assert c.status == "measured" and c.sparse and c.path.name.endswith("-sparse.json")
    sites = c.result.sites
    for site in ("0:self", "1:self"):
        # a level that skips blocks was measured, and errs far beyond the budget: random q, k are not local
        err, density = sites[site]["sparse"]["sparse:keep=0.2"]
        assert density < cal.SPARSE_MAX_DENSITY and err > 2 * cal.DEFAULT_BUDGET, sites[site]
    assert not any("sparse" in sites[s] for s in ("0:cross", "1:cross"))
    assert not any(v.startswith("sparse:") for v in c.result.schedule.overrides.values())
    assert "int8-sparse" not in ran and int8_calls(ran) == 4, ran
    assert not any(str(v).startswith("sparse:") for v in variants.values()) and report.densities() == {}


def test_auto_runs_the_saved_sparse_level(auto_run, wan):
    """A decision file with a sparse level (what calibration writes where attention is local) is loaded and run
    at that site only."""
    d, first, _, _ = auto_run
    path = first.calibrator.path
    data = json.loads(path.read_text())
    data["schedule"]["overrides"]["0:self"] = "sparse:keep=0.2"
    path.write_text(json.dumps(data))
    model = wan.transformer
    report = enable_sage(model, sparse="auto", calibration_dir=d)[0]
    reset_counters()
    try:
        with torch.no_grad():
            model(**model_inputs())
    finally:
        disable_sage(model)
    assert report.calibrator.status == "loaded"
    assert counters()["int8-sparse"] == 1 and int8_calls() == 4, counters()
    assert list(report.densities()) == ["blocks.0.attn1"] and report.densities()["blocks.0.attn1"] < 1.0


def test_auto_measures_the_late_steps_again(wan, tmp_path):
    """Per step range: with the steps known (set_step), the first forward in the second half of sampling runs
    exactly and measures the self sites' levels again; forwards before and after it run the decision."""
    from comfy_sage.pipelines import set_step

    model, kw = wan.transformer, model_inputs()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cal, "sparse_errors", functools.partial(cal.sparse_errors, levels=(0.9, 0.2)))
        report = enable_sage(model, sparse="auto", calibration_dir=tmp_path)[0]
        ran = []
        try:
            with torch.no_grad():
                for step in range(8):
                    set_step(model, step, 8)
                    reset_counters()
                    model(**kw)
                    ran.append(int8_calls())
        finally:
            disable_sage(model)
    c = report.calibrator
    assert ran == [0, 4, 4, 4, 0, 4, 4, 4], ran  # steps 0 and 4 measure (exact), the others run 8-bit
    assert c.status == "measured" and c.result.ranges_measured() == {"0.5-1.0"}
    assert all("0.5-1.0" in c.result.sites[s]["sparse_ranges"] for s in ("0:self", "1:self"))
    assert json.loads(c.path.read_text())["sites"]["0:self"]["sparse_ranges"]


def test_fixed_level_with_calibration_runs_the_level_where_8bit_is_kept(wan, tmp_path):
    model, kw = wan.transformer, model_inputs()
    report = enable_sage(model, sparse="ratio=0.5", calibrate=True, calibration_dir=tmp_path)[0]
    try:
        with torch.no_grad():
            model(**kw)  # measures, exactly
            reset_counters()
            model(**kw)
    finally:
        disable_sage(model)
    assert report.calibrator.status == "measured" and not report.calibrator.sparse
    assert counters()["int8-sparse"] == 2 and int8_calls() == 4, counters()


@pytest.mark.parametrize("sparse", ["keep=2", "ratio=0", "dense", "keep=", 1.5, 0, float("nan"), True,
                                    ["keep=0.5"]])
def test_bad_sparse_values_name_the_argument(wan, sparse):
    with pytest.raises(ValueError, match=r"^sparse="):
        enable_sage(wan, sparse=sparse)
    assert sage_state(wan.transformer) is None


def test_bad_sparse_companions(wan):
    with pytest.raises(ValueError, match="dense_steps='0-1' only applies with sparse attention"):
        enable_sage(wan, dense_steps="0-1")
    with pytest.raises(ScheduleError, match="dense_steps: bad token 'x'"):
        enable_sage(wan, sparse="auto", dense_steps="x")
    with pytest.raises(ValueError, match="pass the level as sparse='keep=0.5'"):
        enable_sage(wan, pv="sparse:keep=0.5")
    # the argument's level goes over a schedule's own; the schedule's other rules stay
    enable_sage(wan, Schedule.from_strings(blocks="1", sparse="keep=0.5"), sparse="ratio=0.25")
    try:
        sched = sage_state(wan.transformer).schedule
        assert sched.sparse == "ratio=0.25" and sched.blocks == ("1",)
    finally:
        disable_sage(wan)


# ---- generate() and the CLI ------------------------------------------------------------------------------------
SMALL = dict(num_frames=5, height=32, width=32, steps=2, progress=False)


def test_generate_passes_sparse_through(wan, tmp_path):
    r = sage_video.generate("a fox", pipeline=wan, sparse="ratio=0.5", dense_steps="0", compare=True,
                            output_path=str(tmp_path / "v.gif"), **SMALL)
    assert r.counters["int8-sparse"] == 2 * 2, r.counters  # step 1 x CFG x 2 self sites
    assert r.densities == {"transformer.blocks.0.attn1": 1.0, "transformer.blocks.1.attn1": 1.0}
    rep = json.load(open(r.files["json"]))
    assert rep["schedule"]["sparse"] == "ratio=0.5" and rep["sage"]["sparse_densities"] == r.densities
    assert "sparse_densities" not in rep["sdpa"]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(sparse="bogus"), ValueError, "^sparse='bogus'"),
    (dict(sparse="keep=0.5", attention="sdpa"), ValueError, "only applies to attention='sage'"),
    (dict(sparse="keep=0.5", dense_steps="5"), ScheduleError, "step 5 is out of range for 2 steps"),
    (dict(pv="sparse:keep=0.5"), ValueError, "pass the level as sparse="),
])
def test_generate_bad_sparse_arguments(wan, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sage_video.generate("a fox", pipeline=wan, **{**SMALL, **kwargs})


def test_cli_sparse(tmp_path, capsys):
    from comfy_sage.__main__ import command_parser

    help_text = command_parser("video").format_help()
    assert "--sparse auto|keep=F|ratio=F" in help_text and "int8" in help_text
    out = tmp_path / "c.gif"
    reset_counters()
    assert cli.main(["video", "a fox", "--frames", "5", "--height", "32", "--width", "32", "--steps", "1",
                     "--sparse", "ratio=0.5", "--quiet", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert os.path.getsize(out) > 0 and '"int8-sparse": 4' in text  # CFG x 2 self sites
    assert "sparse (ratio=0.5): 2 sites ran sparse, mean density 100.0%" in text
    assert cli.main(["video", "a fox", "--sparse", "keep=7", "--quiet"]) == 2
    assert "sparse='keep=7'" in capsys.readouterr().err


def test_e2e_bench_has_a_fixed_density_variant():
    from comfy_sage.bench import e2e

    assert "sage_sparse25" in e2e.default_variants(True) and "sage_sparse25" in e2e.EIGHT_BIT
    assert e2e.SPARSE["sage_sparse25"] == "ratio=0.25"
