"""bench/e2e.py on CPU: the shape table of the real models, and the whole script on tiny configs (--cpu-smoke):
every variant reported, ratios and extrapolation consistent with the measured times, fidelity fields."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from comfy_sage.bench import e2e  # noqa: E402


@pytest.mark.parametrize("name, latent, n_tokens, n_text", [
    ("wan-1.3b-480p", (1, 16, 21, 60, 104), 32_760, 512),
    ("wan-14b-480p", (1, 16, 21, 60, 104), 32_760, 512),
    ("wan-1.3b-720p", (1, 16, 21, 90, 160), 75_600, 512),
    ("wan-14b-720p", (1, 16, 21, 90, 160), 75_600, 512),
    ("flux-dev-1024", (1, 4096, 64), 4_096, 512),
    ("cogvideox-5b", (1, 13, 16, 60, 90), 17_550, 226),
    ("hunyuan-video-544p", (1, 16, 16, 68, 120), 32_640, 256),
])
def test_shape_table(name, latent, n_tokens, n_text):
    case = e2e.CASES[name]
    assert e2e.latent_shape(case) == latent
    assert e2e.tokens(case) == (n_tokens, n_text)


def test_real_configs():
    heads = {n: (c.config["num_attention_heads"], c.config["attention_head_dim"]) for n, c in e2e.CASES.items()}
    assert heads["wan-1.3b-480p"] == (12, 128) and heads["wan-14b-720p"] == (40, 128)
    assert heads["flux-dev-1024"] == (24, 128) and heads["cogvideox-5b"] == (48, 64)
    assert heads["hunyuan-video-544p"] == (24, 128)
    assert e2e.WAN_14B["ffn_dim"] == 13824 and e2e.WAN_14B["num_layers"] == 40
    assert e2e.CASES["flux-dev-1024"].config["num_single_layers"] == 38


@pytest.mark.parametrize("name", list(e2e.TINY_CASES))
def test_tokens_match_what_the_model_attends_over(name):
    """The token formula against the real model code: the longest attention sequence of one forward."""
    case = e2e.TINY_CASES[name]
    model, _ = e2e.build(case, 1, torch.device("cpu"), torch.float32)
    noise, extras = e2e._inputs(case, torch.device("cpu"), torch.float32)
    seen = []
    orig = F.scaled_dot_product_attention

    def spy(query, key, value, *a, **k):
        seen.append(query.shape[-2])
        return orig(query, key, value, *a, **k)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            out = e2e._call(model, case, noise, 0.5, extras)
    finally:
        F.scaled_dot_product_attention = orig
    n_tokens, n_text = e2e.tokens(case)
    joint = case.family != "wan"  # Wan: self-attention over the video, text only as cross-attention keys
    assert max(seen) == n_tokens + (n_text if joint else 0)
    assert out.shape == noise.shape


def test_fidelity_metrics():
    ref = torch.linspace(-1, 1, 1000, dtype=torch.float64)
    same = e2e.fidelity(ref.clone(), ref)
    assert same == {"cosine": pytest.approx(1.0), "psnr_db": None, "rel_l1": 0.0}
    noisy = e2e.fidelity(ref + 0.01, ref)
    assert noisy["psnr_db"] == pytest.approx(10 * math.log10(2.0 ** 2 / 0.01 ** 2))
    assert noisy["cosine"] < 1.0 and noisy["rel_l1"] == pytest.approx(0.01 / ref.abs().mean().item())
    s = e2e.sigmas(4)
    assert s[0] == 1.0 and s[-1] == 0.0 and all(a > b for a, b in zip(s, s[1:]))


def test_bad_arguments(tmp_path):
    assert e2e.main([str(tmp_path / "x.json"), "--cpu-smoke", "--variants", "sdpa_default,nope"]) == 2
    assert e2e.main([str(tmp_path / "x.json"), "--cpu-smoke", "--models", "wan-14b-720p"]) == 2  # not a tiny case
    assert not (tmp_path / "x.json").exists()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "e2e-cpu.json"
    # triton.jit picks interpreter or GPU when a kernel module is imported: import them under the interpreter first,
    # or every later test in this process would get GPU kernels on a CPU machine
    from comfy_sage.kernels import _attention, _quant, _rope  # noqa: F401

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")  # the exact CPU fallback (conftest turns the interpreter on): fast
        mp.setenv("COMFY_SAGE_CALIBRATION_DIR", str(out.parent / "calibration"))  # not the user's cache
        assert e2e.main([str(out), "--cpu-smoke"]) == 0
    return json.loads(out.read_text()), out


def test_smoke_reports_every_case_and_variant(smoke):
    res, out = smoke
    assert list(res["cases"]) == list(e2e.TINY_CASES)
    assert res["gpu"] == "cpu" and "extrapolated" in res["method"]
    for name, case in res["cases"].items():
        assert list(case["variants"]) == e2e.default_variants(False), name  # the peers need a GPU
        for v, r in case["variants"].items():
            assert "error" not in r, (name, v, r.get("error"))
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_extrapolation_and_ratios(smoke):
    res, _ = smoke
    for name, case in res["cases"].items():
        real, run = case["blocks_real"], case["blocks_run"]
        assert all(run[k] == min(2, real[k]) < real[k] for k in real), name  # cut, and extrapolated back
        vs = case["variants"]
        for v, r in vs.items():
            full = r["non_block_ms"] + sum(real[k] * r["block_ms"][k] for k in real)
            assert r["full_forward_ms"] == pytest.approx(full)
            assert r["full_step_ms"] == pytest.approx(full * case["calls_per_step"])
            assert r["ms_per_layer"] == pytest.approx((full - r["non_block_ms"]) / sum(real.values()))
            # measured: the forward is its blocks plus the rest
            assert r["forward_ms"] == pytest.approx(r["non_block_ms"] + sum(run[k] * r["block_ms"][k] for k in run))
            for b in e2e.BASELINES:
                assert r["speedup_vs"][b] == pytest.approx(vs[b]["full_step_ms"] / r["full_step_ms"])
                assert r["layer_speedup_vs"][b] == pytest.approx(vs[b]["ms_per_layer"] / r["ms_per_layer"])
            if v != "none":
                assert r["attention_share"] == pytest.approx(1 - vs["none"]["full_forward_ms"] / r["full_forward_ms"])
        assert vs["sdpa_cudnn"]["speedup_vs"]["sdpa_cudnn"] == pytest.approx(1.0)


def test_smoke_fidelity_and_paths(smoke):
    res, _ = smoke
    calls = {"tiny-wan": 4, "tiny-flux": 4, "tiny-cogvideox": 2, "tiny-hunyuan": 5}  # per forward, 2 blocks/kind
    for name, case in res["cases"].items():
        vs = case["variants"]
        # on CPU every variant with attention runs exact SDPA: the same final latents as the reference
        for v in ("sdpa_default", "sdpa_cudnn", "sdpa_flash") + e2e.EIGHT_BIT:
            assert vs[v]["fidelity"]["cosine"] == pytest.approx(1.0, abs=1e-12), (name, v)
            assert vs[v]["fidelity"]["rel_l1"] == 0.0 and vs[v]["fidelity"]["psnr_db"] is None
        assert "fidelity" not in vs["none"]
        assert vs["none"]["attention_calls_replaced"] == calls[name]
        assert vs["sdpa_cudnn"]["forced"] is False  # nothing to force on a CPU
        for v in e2e.EIGHT_BIT:  # routed through comfy_sage, which fell back (counted) on CPU
            assert vs[v]["sites"] > 0 and vs[v]["counters"].get("sdpa:cpu", 0) > 0
            assert not any(k.startswith("int8") for k in vs[v]["counters"])
        assert vs["sdpa_default"]["counters"] == {}


def test_peer_variant_takes_the_calls_it_supports():
    """A peer answers F.scaled_dot_product_attention's plain calls; masked, causal, GQA, fp32 calls and the peer's
    own SDPA calls go to SDPA, each counted."""
    import torch.nn.functional as F

    orig = F.scaled_dot_product_attention
    q, k, v = (torch.randn(1, 2, 8, 16).half() for _ in range(3))

    def peer(q_, k_, v_, scale):
        seen.append(scale)
        return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)  # a peer that calls SDPA itself

    seen, info = [], {}
    with e2e._as_sdpa(peer, info):
        out = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool))
        F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True)
        F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert F.scaled_dot_product_attention is orig and seen == [0.3]
    assert torch.equal(out, orig(q, k, v, is_causal=True))
    assert info["calls"] == {"peer": 1, "sdpa": 5}
