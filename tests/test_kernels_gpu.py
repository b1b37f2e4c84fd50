"""The kernels compiled for the GPU at real sizes (skipped without CUDA): the accuracy targets on the anchors'
inputs, odd shapes, both tile-loading paths, CUDA graphs and torch.compile."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from comfy_sage import kernels
from comfy_sage.kernels import _api, _arch, sage_attention, sage_sdpa
from kernel_cases import INT8_TARGETS, cosine, exact, make_qkv, rel_l1

pytestmark = pytest.mark.gpu


def _entry():
    return _arch.arch_of(torch.device("cuda"))


def _pvs():
    return ["fp16", "fp8", "int8"] if _entry().fp8 else ["fp16", "int8"]


def _tile(D, pv, tma):
    t = _entry().tiles[(_arch.head_dim_bucket(D), pv)]
    return dataclasses.replace(t, tma=tma)


@pytest.mark.parametrize("kind,D,causal", [(k, d, c) for k in ("randn", "kbias") for d in (64, 128) for c in (0, 1)])
def test_accuracy_targets_on_anchor_inputs(kind, D, causal):
    q, k, v = make_qkv(1, 8, 8, 4096, 4096, D, device="cuda", kind=kind, seed=11)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=bool(causal))
    for pv in _pvs():
        for tma in (False, True):
            out = _api._forward(q, k, v, "HND", bool(causal), None, pv, False, tile=_tile(D, pv, tma))[0]
            # FP8: 0.0385; these inputs measure at most 0.0380 on the H200 (the 0.038; K scales per lane
            # quad, bench/NOTES.md v7), other seeds up to 0.0381
            bound = 0.0385 if pv == "fp8" else (0.015 if kind == "randn" else 0.025)
            assert rel_l1(out, ref) <= bound, (pv, tma)
            assert cosine(out, ref) >= 0.999, (pv, tma)


@pytest.mark.parametrize("kind,D,causal", [(k, d, c) for k in INT8_TARGETS for d in (64, 128) for c in (0, 1)])
def test_int8_meets_v10_targets(kind, D, causal):
    dtype = torch.bfloat16 if kind in ("qoutlier", "onehot") else torch.float16
    q, k, v = make_qkv(1, 8, 8, 4096, 4096, D, dtype=dtype, device="cuda", kind=kind, seed=11)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=bool(causal))
    for tma in (False, True):
        out = _api._forward(q, k, v, "HND", bool(causal), None, "int8", False, tile=_tile(D, "int8", tma))[0]
        assert rel_l1(out, ref) <= INT8_TARGETS[kind], tma


@pytest.mark.parametrize("kind,D,causal", [(k, d, c) for k in INT8_TARGETS for d in (64, 128) for c in (0, 1)])
def test_auto_meets_v10_targets(kind, D, causal):
    """pv="auto" meets issue 14's targets, full and causal, where the arch table gives an accurate path there
    (sm90: FP16 P·V with rotated q and k in the warp-specialized kernel; sm86/89/120: INT8 P·V)."""
    if _entry().pv_for(D, causal) == "fp8":
        pytest.skip(f"{_entry().name} runs FP8 P·V at head dim {D} (0.038 by design)")
    dtype = torch.bfloat16 if kind in ("qoutlier", "onehot") else torch.float16
    q, k, v = make_qkv(1, 8, 8, 4096, 4096, D, dtype=dtype, device="cuda", kind=kind, seed=11)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=bool(causal))
    assert rel_l1(sage_attention(q, k, v, is_causal=bool(causal)), ref) <= INT8_TARGETS[kind]


@pytest.mark.parametrize("kind", ["randn", "kbias"])
def test_fine_variant_is_at_least_as_accurate_as_fp16(kind):
    q, k, v = make_qkv(1, 8, 8, 4096, 4096, 128, device="cuda", kind=kind, seed=11)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    errs = {pv: rel_l1(sage_attention(q, k, v, pv=pv), ref) for pv in ("fp16", "fine")}
    assert errs["fine"] <= errs["fp16"] * 1.02 and errs["fine"] <= (0.015 if kind == "randn" else 0.025), errs


ODD = [(1, 77, 64), (4097, 226, 128), (1000, 512, 80), (77, 4097, 40), (333, 333, 96), (2048, 2048, 160),
       (1024, 1024, 256), (500, 600, 72), (8192, 77, 64)]


@pytest.mark.parametrize("Nq,Nk,D", ODD, ids=lambda x: str(x))
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_odd_shapes_layouts_gqa_causal_bf16(Nq, Nk, D, layout):
    for causal in (False, True):
        for dtype in (torch.float16, torch.bfloat16):
            q, k, v = make_qkv(2, 4, 2, Nq, Nk, D, dtype=dtype, device="cuda", seed=Nq + D)
            ref, ref_lse = exact(q, k, v, causal)
            args = (q, k, v) if layout == "HND" else tuple(t.transpose(1, 2) for t in (q, k, v))  # strided views
            for pv in _pvs():
                out, lse = sage_attention(*args, layout=layout, is_causal=causal, pv=pv, return_lse=True)
                out = out if layout == "HND" else out.transpose(1, 2)
                assert out.dtype == dtype and out.isfinite().all()
                assert rel_l1(out, ref) < (0.03 if pv == "fp16" else 0.06), (causal, dtype, pv)
                assert (lse - ref_lse).abs().max() < 0.05


def test_tma_and_pointer_paths_agree():
    for D in (64, 80, 128):
        q, k, v = make_qkv(2, 4, 4, 3000, 3000, D, device="cuda", seed=D)
        for pv in _pvs():
            a = _api._forward(q, k, v, "HND", True, None, pv, False, tile=_tile(D, pv, False))[0]
            b = _api._forward(q, k, v, "HND", True, None, pv, False, tile=_tile(D, pv, True))[0]
            assert rel_l1(a, b) < 2e-3, (D, pv)


def test_large_values_stay_finite():
    for pv in _pvs():
        q, k, v = make_qkv(1, 8, 8, 4096, 4096, 128, dtype=torch.bfloat16, device="cuda", seed=2)
        v = (v.float() * 2e4).clamp(-6e4, 6e4).bfloat16()
        out = sage_attention(q * 30, k * 30, v, pv=pv)
        assert out.isfinite().all()


@pytest.mark.parametrize("D", [64, 128])  # 128: the warp-specialized kernel on sm90
def test_cuda_graph_capture_and_replay(D):
    q, k, v = make_qkv(1, 8, 8, 2048, 2048, D, device="cuda")
    sage_attention(q, k, v)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = sage_attention(q, k, v)
    q2, k2, v2 = make_qkv(1, 8, 8, 2048, 2048, D, device="cuda", seed=5)
    q.copy_(q2), k.copy_(k2), v.copy_(v2)
    g.replay()
    assert torch.equal(out, sage_attention(q2, k2, v2))


@pytest.mark.parametrize("D", [64, 128])
def test_torch_compile_fullgraph_inductor(D):
    lin = torch.nn.Linear(512, 512, device="cuda", dtype=torch.float16)

    def f(x):
        q = lin(x).view(1, 1024, 512 // D, D).transpose(1, 2)
        return sage_attention(q, q, q).float().sum()

    x = torch.randn(1, 1024, 512, device="cuda", dtype=torch.float16)
    compiled = torch.compile(f, fullgraph=True)
    assert torch.allclose(compiled(x), f(x), rtol=1e-2, atol=1e-2)


def test_sage_sdpa_keeps_sdpa_where_it_is_faster():
    kernels.reset_counters()
    q, k, v = make_qkv(1, 8, 8, 64, 64, 64, device="cuda")
    assert torch.equal(sage_sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert kernels.counters() == {"sdpa:short": 1}



@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D", [(2, 3, 3, 1000, 1000, 128), (1, 8, 2, 4096, 4096, 64),
                                           (1, 4, 4, 4097, 226, 128), (1, 2, 2, 130, 8192, 128),
                                           (1, 24, 24, 4608, 4608, 128)], ids=str)
@pytest.mark.parametrize("pv", ["fp8", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_warp_specialized_kernel_matches_the_triton_kernel(B, Hq, Hkv, Nq, Nk, D, pv, causal, monkeypatch):
    """The sm90 warp-specialized Gluon kernel (forced on with COMFY_SAGE_WS=1) against the Triton kernel on the
    same inputs and against fp32 attention: tails, GQA, Nq != Nk, more rows than one CTA's, the LSE; FP8 P·V and
    16-bit P·V (the user's v through a 4-D descriptor); full and causal (warpgroups of one CTA stopping at
    different key blocks)."""
    from comfy_sage.kernels import _attention_ws

    if pv == "fp8" and not _entry().fp8:
        pytest.skip("no FP8 tensor cores")
    tile = _entry().tiles[(_arch.head_dim_bucket(D), pv)]
    # the kernel itself, wherever the table routes this call (sm90 runs FP8 causal calls on the Triton kernel)
    tile = dataclasses.replace(tile, tma=True, ws=dataclasses.replace(tile.ws or _arch.WarpSpec(3, 2, 128),
                                                                       causal=True))
    runs = []
    real = _attention_ws.attention
    monkeypatch.setattr(_attention_ws, "attention", lambda *a, **kw: runs.append(1) or real(*a, **kw))
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype=torch.bfloat16, device="cuda", seed=Nq + D)
    ref, ref_lse = exact(q, k, v, causal)
    got = {}
    for env in ("1", "0"):
        monkeypatch.setenv(_attention_ws.ENV, env)
        got[env] = _api._forward(q, k, v, "HND", causal, None, pv, True, tile=tile)
    assert runs == [1]  # once, with the variable at 1
    (ws, ws_lse), (tr, tr_lse) = got["1"], got["0"]
    assert torch.isfinite(ws).all() and torch.isfinite(ws_lse).all()
    assert rel_l1(ws, ref) <= ((0.045 if causal else 0.0385) if pv == "fp8" else 0.015) and cosine(ws, ref) >= 0.999
    assert abs(rel_l1(ws, ref) - rel_l1(tr, ref)) <= 0.001  # the same arithmetic but for FP32 row sums
    lse_bound = 0.03 if causal else 0.02  # the first rows see few keys: the Triton kernel's own reach 0.026 (H200)
    assert (ws_lse - ref_lse).abs().max() <= lse_bound and (ws_lse - tr_lse).abs().max() <= lse_bound


@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_clusters_match_one_cta_to_the_bit(pv, monkeypatch):
    """2-CTA clusters sharing K and V (multicast) compute what one CTA does, bit for bit, output and LSE: tails,
    GQA, a cluster past the last row, a single tile, both head dims."""
    from comfy_sage.kernels import _attention_ws

    if not (_arch.ws_usable() and _attention_ws.MULTICAST):
        pytest.skip("no warp-specialized kernel with multicast on this Triton")
    if pv == "fp8" and not _entry().fp8:
        pytest.skip("no FP8 tensor cores")
    real = _attention_ws.attention
    for B, Hq, Hkv, N, D in [(1, 4, 4, 1000, 128), (2, 6, 2, 4097, 64), (1, 2, 2, 64, 128), (1, 3, 3, 9000, 128)]:
        q, k, v = make_qkv(B, Hq, Hkv, N, N, D, dtype=torch.bfloat16, device="cuda", seed=N)
        tile = dataclasses.replace(_tile(D, pv, True), ws=_arch.WarpSpec(3, 2, 128))
        got, runs = [], []
        for ctas in (1, 2):
            monkeypatch.setattr(_attention_ws, "attention",
                                lambda *a, **kw: runs.append(ctas) or real(*a, **{**kw, "ctas": ctas}))
            got.append(_api._forward(q, k, v, "HND", False, None, pv, True, tile=tile))
        assert runs == [1, 2]  # the warp-specialized kernel ran both (COMFY_SAGE_STRICT: no fallback)
        (o1, l1), (o2, l2) = got
        assert torch.equal(o1, o2) and torch.equal(l1, l2), (B, Hq, Hkv, N, D)
        assert rel_l1(o2, exact(q, k, v, False)[0]) <= (0.0385 if pv == "fp8" else 0.015)


@pytest.mark.parametrize("D", [16, 40, 64, 72, 128, 256])
@pytest.mark.parametrize("layout", ["HND", "NHD", "NHD-view"])
def test_extra_memory_within_contract(layout, D):
    """Every P·V path, with and without the LSE, allocates at most 0.6x the bytes of q+k+v beyond its results
    (bench/memory.py measures the whole grid and the peers)."""
    from comfy_sage.bench.memory import CONTRACT, OURS, extra, make

    q, k, v = make(layout, 1, 8, 4097, D)
    for name, kw in OURS.items():
        pv = name.split("+")[0]
        assert extra(lambda: sage_attention(q, k, v, layout=layout[:3], pv=pv, **kw), q, k, v) <= CONTRACT, name


@pytest.mark.parametrize("arch", ["sm80", "sm86", "sm89", "sm120"])
def test_every_arch_table_runs_correctly_here(arch, monkeypatch):
    """Each arch's table (tiles, warps, stages, its P·V choices) compiled for this GPU and run against fp32: the
    configs our users' GPUs get, checked on the one we have (their own targets are compiled offline by
    bench/arch_check.py)."""
    monkeypatch.setattr(_arch, "_cuda_arch_key", lambda index: arch)
    entry = _arch.ARCHES[arch]
    for D in (64, 128, 256):
        for causal in (False, True):
            q, k, v = make_qkv(1, 4, 2, 1500, 1500, D, device="cuda", seed=D)
            ref, ref_lse = exact(q, k, v, causal)
            for pv in ("auto", "fp16", "fine", "int8", *(("fp8",) if entry.fp8 else ())):
                out, lse = sage_attention(q, k, v, is_causal=causal, pv=pv, return_lse=True)
                err = rel_l1(out, ref)
                assert err < (0.045 if (pv == "fp8" or (pv == "auto" and entry.pv_for(D, causal) == "fp8"))
                              else 0.02), \
                    (D, causal, pv, err)
                assert (lse - ref_lse).abs().max() < 0.05


def test_a_real_launch_failure_falls_back(monkeypatch):
    """A tile this GPU cannot hold (shared memory) fails inside Triton's launch: the call runs exact SDPA."""
    from comfy_sage.kernels import _fallback

    monkeypatch.setenv(_fallback.STRICT_ENV, "0")
    entry = _entry()
    huge = _arch.Tile(256, 256, 8, 4)
    monkeypatch.setitem(entry.tiles, (256, "fp16"), huge)
    _fallback.forget()
    kernels.reset_counters()
    q, k, v = make_qkv(1, 2, 2, 1024, 1024, 256, device="cuda")
    try:
        out = sage_attention(q, k, v, pv="fp16")
        failures = _fallback.failures()
    finally:
        _fallback.forget()
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert kernels.counters() == {"sdpa:kernel_error": 1}
    assert any("OutOfResources" in t or "shared" in t.lower() for t in failures.values()), failures
