"""Block-sparse 8-bit attention (kernels/_sparse.py): the selection, the kernel's skipping, errors and fallbacks.
Kernels run through TRITON_INTERPRET=1 on CPU."""
import pytest
import torch

from comfy_sage.bench.bench import local_inputs
from comfy_sage.kernels import _api, _arch, _fallback, _sparse, counters, reset_counters, sparse_density
from kernel_cases import exact, make_qkv, rel_l1

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TILE = _arch.Tile(32, 32, 4, 1)


def run(q, k, v, causal, pv, keep, sink=1, layout="HND"):
    req = _sparse.Request(_sparse.Sparsity(keep, sink))
    out, _ = _api._forward(q, k, v, layout, causal, None, pv, False, tile=TILE, sparse=req)
    return out, req.density


@pytest.mark.parametrize("pv", ["fp16", "fp8", "int8"])
@pytest.mark.parametrize("shape", [(1, 2, 2, 100, 100, 64, False), (2, 2, 1, 70, 70, 64, True),
                                   (1, 2, 2, 45, 80, 40, False), (1, 1, 1, 80, 45, 128, True)])
def test_keeping_everything_is_the_dense_kernel(shape, pv):
    """keep=1: every allowed block, in order, through the same loops: bit for bit the dense kernel (odd lengths,
    Nq != Nk both ways, GQA, causal, a padded head dim)."""
    B, Hq, Hkv, Nq, Nk, D, causal = shape
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, device=DEV, seed=Nq + D)
    dense, _ = _api._forward(q, k, v, "HND", causal, None, pv, False, tile=TILE)
    out, density = run(q, k, v, causal, pv, 1.0)
    assert torch.equal(out, dense) and density == 1.0


def test_selection_lists_blocks_ascending_with_sinks_and_diagonal():
    q, k, _ = make_qkv(2, 4, 2, 200, 200, 64, device=DEV, seed=3)
    for causal in (False, True):
        lut, cnt, density = _sparse.select(q, k, block_m=32, block_n=32, causal=causal, scale=0.125,
                                           sparsity=_sparse.Sparsity(0.3, 2))
        nqb, nkb = 7, 7
        assert lut.shape[:2] == (2 * 4, nqb) and cnt.shape == (2 * 4, nqb, 2) and 0 < density < 1
        for bh in range(8):
            for i in range(nqb):
                unmasked, total = cnt[bh, i].tolist()
                blocks = lut[bh, i, :total].tolist()
                assert blocks == sorted(set(blocks)) and all(0 <= j < nkb for j in blocks)
                assert {0, 1, i} <= set(blocks) or (causal and i < 1)  # sinks (where allowed) and the diagonal
                if causal:
                    assert max(blocks) == i  # nothing above the diagonal
                    assert blocks[:unmasked] == [j for j in blocks if (j + 1) * 32 <= i * 32]
                else:  # only the tail block (keys 192-199) needs a mask
                    assert blocks[:unmasked] == [j for j in blocks if j < 6]


def _kept(lut, cnt):
    return [[tuple(lut[bh, i, :cnt[bh, i, 1]].tolist()) for i in range(cnt.shape[1])] for bh in range(cnt.shape[0])]


@pytest.mark.parametrize("case", [
    ((2, 4, 2, 200, 200, 64), 32, 32, False, _sparse.Sparsity(0.3, 2)),
    ((2, 4, 2, 200, 200, 64), 32, 32, True, _sparse.Sparsity(0.3, 2)),
    ((1, 2, 1, 80, 45, 128), 32, 32, True, _sparse.Sparsity(0.6, 0)),
    ((1, 2, 2, 45, 300, 40), 16, 64, False, _sparse.Sparsity(0.5, 1)),
    ((1, 2, 2, 300, 300, 64), 16, 64, True, _sparse.Sparsity(sink=0, ratio=0.3)),
    ((1, 3, 3, "local", None, 64), 64, 16, False, _sparse.Sparsity(0.25, 1)),
    ((1, 3, 3, "local", None, 64), 64, 16, False, _sparse.Sparsity(1.0, 1)),
])
def test_triton_selection_is_the_torch_model(case):
    """The one-pass Triton selection (softmax, bisected threshold, packed lut) keeps exactly the blocks that the
    torch model's argsort and cumulative mass keep: the same lists, counts and density (odd lengths, Nq != Nk,
    GQA, causal, keep and ratio, a tile of its own width against long and short key blocks)."""
    (B, Hq, Hkv, Nq, Nk, D), bm, bn, causal, sp = case
    if Nq == "local":
        q, k, _ = local_inputs(4, 16, 32, Hq, D, device=DEV)
    else:
        q, k, _ = make_qkv(B, Hq, Hkv, Nq, Nk, D, device=DEV, seed=Nq + Nk)
    kw = dict(block_m=bm, block_n=bn, causal=causal, scale=D ** -0.5, sparsity=sp)
    lut, cnt, density = _sparse.select(q, k, **kw)
    lut_t, cnt_t, density_t = _sparse._select_torch(q, k, **kw)
    assert torch.equal(cnt, cnt_t) and _kept(lut, cnt) == _kept(lut_t, cnt_t)
    assert density == pytest.approx(density_t, rel=1e-12) and lut.shape[-1] == lut_t.shape[-1]


def test_selection_past_the_register_limit_takes_the_torch_model(monkeypatch):
    q, k, _ = make_qkv(1, 2, 2, 200, 200, 64, device=DEV, seed=9)
    kw = dict(block_m=32, block_n=32, causal=False, scale=0.125, sparsity=_sparse.Sparsity(0.4))
    ran = []
    monkeypatch.setattr(_sparse, "MAX_KEY_BLOCKS", 6)  # 7 key blocks
    monkeypatch.setattr(_sparse, "_select_torch", lambda *a, **kw: ran.append(1) or "torch")
    assert _sparse.select(q, k, **kw) == "torch" and ran == [1]


def test_local_inputs_run_sparse_within_error():
    """Space-time locality (8 frames of 8 × 16 tokens): keeping 90% of the pooled mass visits ~3/4 of the blocks
    at ~1% relative L1; keeping more costs density and buys error."""
    q, k, v = local_inputs(8, 8, 16, 1, 64, device=DEV)
    ref, _ = exact(q.cpu(), k.cpu(), v.cpu())
    dense, _ = _api._forward(q, k, v, "HND", False, None, "fp16", False, tile=TILE)
    errs = {}
    for keep in (0.8, 0.95):
        out, density = run(q, k, v, False, "fp16", keep)
        errs[keep] = (density, rel_l1(out.cpu(), ref))
    (d8, e8), (d95, e95) = errs[0.8], errs[0.95]
    assert d8 < d95 < 1 and d8 < 0.75 and e8 > e95, errs
    assert e95 < rel_l1(dense.cpu(), ref) + 0.01 and e8 < 0.04, errs


def test_random_inputs_have_no_locality_to_exploit():
    """q, k without structure: pooled scores are flat, so the mass criterion keeps nearly every block, and a low
    `keep` drops real attention (large error): what calibration sees and rejects."""
    q, k, v = make_qkv(1, 2, 2, 256, 256, 64, device=DEV, seed=4)
    ref, _ = exact(q.cpu(), k.cpu(), v.cpu())
    _, density = run(q, k, v, False, "fp16", 0.9)
    assert density > 0.85
    out, density = run(q, k, v, False, "fp16", 0.3)
    assert density < 0.6 and rel_l1(out.cpu(), ref) > 0.2


def test_public_call_counts_and_checks(monkeypatch):
    q, k, v = local_inputs(2, 4, 8, 2, 64, device=DEV)
    reset_counters()
    out, density = _sparse.sparse_attention(q, k, v, keep=0.9, return_density=True)
    assert out.shape == q.shape and counters() == {"int8-sparse": 1} and 0 < density <= 1
    nhd = _sparse.sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="NHD")
    assert torch.equal(nhd.transpose(1, 2), out)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep must be in"):
            _sparse.sparse_attention(q, k, v, keep=bad)
    with pytest.raises(ValueError, match="head dims differ"):
        _sparse.sparse_attention(q, k[..., :32], v)


def test_kernel_failure_falls_back_to_exact(monkeypatch):
    q, k, v = make_qkv(1, 2, 2, 64, 64, 64, device=DEV, seed=2)
    monkeypatch.setenv(_fallback.STRICT_ENV, "0")
    monkeypatch.setattr(_sparse, "select", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("boom")))
    _fallback.forget()
    reset_counters()
    try:
        out, density = _sparse.sparse_attention(q, k, v, return_density=True)
    finally:
        _fallback.forget()
    assert density is None and counters() == {"sdpa:kernel_error": 1}
    assert torch.equal(out, _fallback.exact_sdpa(q, k, v))


def test_calibration_goes_sparse_only_where_attention_is_local():
    """Error-driven: on local inputs the sparsest level within budget is taken; on random q/k (no locality, as in
    a model with random weights) no level is both within budget and sparse enough, and the site stays dense."""
    from comfy_sage.kernels import calibrate

    reset_counters()
    q, k, v = local_inputs(8, 8, 16, 1, 64, device=DEV)
    errs = calibrate.sparse_errors(q, k, v, levels=(0.99, 0.9, 0.6), pv="fp16", rows=128)
    keep = calibrate.choose_sparse(errs, budget=0.03)
    assert keep is not None and errs[keep][1] <= calibrate.SPARSE_MAX_DENSITY and errs[keep][0] <= 0.03, errs
    assert all(d >= errs[keep][1] for e, d in errs.values() if e <= 0.03)  # the sparsest within budget
    q, k, v = make_qkv(1, 2, 2, 256, 256, 64, device=DEV, seed=4)
    errs = calibrate.sparse_errors(q, k, v, levels=(0.99, 0.9, 0.6), pv="fp16", rows=128)
    assert calibrate.choose_sparse(errs, budget=0.05) is None, errs
    assert counters() == {} and sparse_density() is None  # calibration's calls are not counted


def test_fixed_ratio_sets_the_density():
    """ratio: each tile keeps that share of its allowed blocks (plus sinks and its own), whatever the scores: how
    a benchmark runs a model with no locality (random weights) at a stated density."""
    q, k, v = make_qkv(1, 2, 2, 512, 512, 64, device=DEV, seed=6)
    for causal in (False, True):
        lut, cnt, density = _sparse.select(q, k, block_m=32, block_n=32, causal=causal, scale=0.125,
                                           sparsity=_sparse.Sparsity(sink=0, ratio=0.25))
        assert 0.25 <= density <= 0.25 + 2 / 16, density  # ceil, and the diagonal block where not picked
    with pytest.raises(ValueError, match="ratio must be in"):
        _sparse.Sparsity(ratio=0.0)


@pytest.mark.skipif(DEV == "cuda", reason="the smoke runs Triton's interpreter on CPU; on a GPU the script runs whole")
def test_sparse_benchmark_script_smoke(tmp_path):
    """bench/sparse.py end to end on a tiny shape (its GPU run is the H200's): every method on each input, the
    sparse ones with their density, the selection timed alone, JSON and PNG written."""
    import importlib.util
    import json

    from comfy_sage.bench import sparse as bench_sparse

    out = tmp_path / "sparse.json"
    assert bench_sparse.main([str(out), "--cpu-smoke"]) == 0
    res = json.loads(out.read_text())
    for case in ("local", "diffuse", "random"):
        rows = res["results"][case]
        sel = rows.pop("selection")
        assert set(sel) == {f"{m}0.25_{impl}_ms" for m in ("keep", "ratio") for impl in ("triton", "torch")}, sel
        assert set(rows) == {"sdpa", "sage_dense", "sparse_keep0.9", "sparse_ratio0.25",
                             *(f"{m}_{pv}" for m in ("sage_dense", "sparse_ratio0.25") for pv in ("fp8", "int8", "fp16"))}
        assert all("error" not in r and r["ms"] > 0 for r in rows.values()), rows
        assert rows["sdpa"]["rel_l1"] < 0.01 and rows["sage_dense"]["rel_l1"] < 0.05, rows
        assert rows["sage_dense_int8"]["rel_l1"] < 0.03 and rows["sage_dense_fp16"]["rel_l1"] < 0.03, rows
        assert all(0 < r["density"] <= 1 for m, r in rows.items() if m.startswith("sparse"))
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_calibrator_takes_sparse_levels_per_self_attention_site(tmp_path):
    """Calibrator(sparse=True): a local self-attention site takes its sparsest level within budget, a site with
    random q/k keeps its dense choice, cross-attention is never measured sparse; the levels' errors and densities
    are saved and a reload (or a new budget) decides again from them."""
    from comfy_sage.kernels import calibrate

    cal = calibrate.Calibrator("f" * 20, model="toy", directory=tmp_path, sparse=True, rows=64)
    assert cal.start(DEV) and cal.path.name.endswith("-sparse.json")
    local = local_inputs(4, 8, 16, 1, 64, device=DEV)
    rand = make_qkv(1, 1, 1, 512, 512, 64, device=DEV, seed=4)
    cal.observe("0:self", *local)
    cal.observe("1:self", *rand)
    cal.observe("2:cross", *local)
    res = cal.finish()
    ov = res.schedule.overrides
    assert ov["0:self"].startswith("sparse:keep="), res.lines()
    assert not ov["1:self"].startswith("sparse") and ov["1:self"] != "exact", res.lines()
    assert "sparse" not in res.sites["2:cross"] and not ov["2:cross"].startswith("sparse")
    err, density = res.sites["0:self"]["sparse"][ov["0:self"]]
    assert err <= calibrate.DEFAULT_BUDGET and density <= calibrate.SPARSE_MAX_DENSITY
    again = calibrate.Calibration.load(cal.path)
    assert again.schedule.overrides == ov
    assert not again.redecide(0.0).schedule.overrides["0:self"].startswith("sparse")  # nothing is within 0
    assert "sparse" in res.summary() and "at" in res.lines()[0]


def test_calibrator_measures_late_steps_again(tmp_path):
    """Per step range: after the first forward's decision, the first forward in the second half of sampling measures
    the self-attention sites' sparse levels again; a site whose attention stops being local there runs dense on
    those steps only, a site that measures the same keeps one level; saved, reloaded, and not measured twice."""
    from comfy_sage.kernels import calibrate

    cal = calibrate.Calibrator("e" * 20, model="toy", directory=tmp_path, sparse=True, rows=64)
    assert cal.start(DEV) and cal.range_due(5, 10) is None  # nothing decided yet
    local = local_inputs(4, 8, 16, 1, 64, device=DEV)
    rand = make_qkv(1, 1, 1, 512, 512, 64, device=DEV, seed=4)
    for site in ("0:self", "1:self", "2:cross"):
        cal.observe(site, *local)
    first = cal.finish().schedule.overrides
    assert first["0:self"].startswith("sparse:") and first["1:self"] == first["0:self"]
    assert cal.range_due(0, 10) is None and cal.range_due(4, 10) is None and cal.range_due(None, None) is None
    assert cal.range_due(2, 4) is None  # a short run keeps one level: the extra exact forward would cost a quarter
    assert cal.range_due(5, 10) == "0.5-1.0"
    cal.start_range("0.5-1.0")
    cal.observe("0:self", *rand)  # late steps: no locality left at this site
    cal.observe("1:self", *local)
    cal.observe("2:cross", *rand)  # never measured sparse
    res = cal.finish()
    late = res.schedule.step_overrides["0.5-1.0"]
    assert set(late) == {"0:self"} and not late["0:self"].startswith("sparse"), res.lines()
    sched = cal.schedule(None)
    assert sched.variant(4, 10, 0) == first["0:self"] and sched.variant(5, 10, 0) == late["0:self"]
    assert sched.variant(9, 10, 1) == first["1:self"]
    assert cal.range_due(7, 10) is None and "steps 0.5-1.0" in "\n".join(res.lines())
    again = calibrate.Calibrator("e" * 20, model="toy", directory=tmp_path, sparse=True, rows=64)
    assert not again.start(DEV) and again.result.schedule == res.schedule and again.range_due(7, 10) is None
    # an interrupted range measurement keeps the first decision and measures at the next forward of the range
    fresh = calibrate.Calibrator("d" * 20, model="toy", directory=tmp_path, sparse=True, rows=64)
    fresh.start(DEV)
    fresh.observe("0:self", *local)
    decided = fresh.finish().schedule
    fresh.start_range(fresh.range_due(6, 10))
    fresh.abort()
    assert fresh.status == "measured" and fresh.schedule(None) == decided and fresh.range_due(6, 10) == "0.5-1.0"
