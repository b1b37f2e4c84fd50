"""The diffusers backend: registration, routing (proven by kernels.counters()), masks, the LSE path, processors
that call SDPA themselves, and enable/disable on tiny models of each family (random weights, CPU)."""
import math
import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

import diffusers  # noqa: E402
from diffusers.models.attention_dispatch import (  # noqa: E402
    AttentionBackendName,
    _AttentionBackendRegistry,
    dispatch_attention_fn,
)

from comfy_sage.pipelines import disable_sage, enable_sage, sage_state  # noqa: E402
from comfy_sage.pipelines.backend import attend_with_lse  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


from comfy_sage.kernels import counters, reset_counters  # noqa: E402  (one store per process)


def sage_calls(c=None):
    """Calls that went through sage_sdpa / the kernel: the 8-bit kernel, or its CPU fallback (no interpreter)."""
    c = counters() if c is None else c
    return sum(v for k, v in c.items() if k.startswith("int8-") or k in ("sdpa:cpu", "sdpa-lse:cpu"))


def rand_nhd(*shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def test_backends_registered_with_context_parallel():
    for name in ("comfy_sage", "comfy_sage_fp16", "comfy_sage_fp8", "comfy_sage_exact"):
        member = AttentionBackendName(name)
        assert member in _AttentionBackendRegistry._backends
        assert _AttentionBackendRegistry._is_context_parallel_available(member)
    # diffusers' own "sage" backend is untouched (it needs the sageattention package, not us)
    assert _AttentionBackendRegistry._backends[AttentionBackendName("sage")].__module__.startswith("diffusers")


def test_attention_backend_context_routes_through_sage():
    q, k, v = (rand_nhd(1, 24, 2, 32, seed=s) for s in range(3))
    reset_counters()
    with diffusers.attention_backend("comfy_sage"):
        out = dispatch_attention_fn(q, k, v)
    assert sage_calls() == 1, counters()
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.float() - ref).abs().max() < 0.05
    reset_counters()
    with diffusers.attention_backend("comfy_sage_exact"):
        exact = dispatch_attention_fn(q, k, v)
    assert sage_calls() == 0  # exact by choice: never touches the kernel
    torch.testing.assert_close(exact.float(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("mask_kind", ["bool_4d", "additive"])
def test_mask_is_honoured_exactly(mask_kind):
    """Masks that depend on the query, and additive masks: exact SDPA with the mask."""
    B, N, Nk, H, D = 2, 8, 12, 2, 32
    q, k, v = rand_nhd(B, N, H, D, seed=1), rand_nhd(B, Nk, H, D, seed=2), rand_nhd(B, Nk, H, D, seed=3)
    keep = torch.ones(B, Nk, dtype=torch.bool)
    keep[0, 7:] = False
    keep[1, 3:] = False
    if mask_kind == "bool_4d":
        mask = sdpa_mask = keep[:, None, None, :].expand(B, 1, N, Nk)
    else:
        mask = sdpa_mask = torch.zeros(B, 1, 1, Nk, dtype=q.dtype).masked_fill(~keep[:, None, None, :], -1e4)
    reset_counters()
    with diffusers.attention_backend("comfy_sage"):
        out = dispatch_attention_fn(q, k, v, attn_mask=mask)
    assert counters().get("sdpa:mask") == 1, counters()
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=sdpa_mask)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    unmasked = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert (out.float() - unmasked.float()).abs().max() > 0.05  # the mask mattered, and was not dropped


@pytest.mark.parametrize("kind,calls", [("prefix_2d", 2), ("scattered_4d", 2), ("same_rows", 1), ("all_kept", 1),
                                        ("row_keeps_none", 1)])
def test_key_padding_mask_runs_kernel_on_kept_keys(kind, calls):
    """A boolean key-padding mask ([B, Nk] or [B, 1, 1, Nk], HunyuanVideo's and QwenImage's) is honoured by leaving
    the masked keys out: the kernel runs (once per distinct row), the result is masked SDPA's."""
    B, N, Nk, H, D = 2, 8, 12, 2, 32
    q, k, v = rand_nhd(B, N, H, D, seed=1), rand_nhd(B, Nk, H, D, seed=2), rand_nhd(B, Nk, H, D, seed=3)
    keep = torch.ones(B, Nk, dtype=torch.bool)
    if kind == "prefix_2d":
        keep[0, 7:] = False
        keep[1, 3:] = False
        mask = keep
    elif kind == "scattered_4d":
        keep[0, 2:5] = False
        keep[1, ::3] = False
        mask = keep[:, None, None, :]
    elif kind == "same_rows":
        keep[:, 5:9] = False
        mask = keep[:1, None, None, :]  # one row broadcast over the batch
    elif kind == "all_kept":
        mask = keep[:, None, None, :]
    else:
        keep[1] = False  # row 1 sees no key: exact SDPA for that row, as its mask says
        mask = keep[:, None, None, :]
    reset_counters()
    with diffusers.attention_backend("comfy_sage"):
        out = dispatch_attention_fn(q, k, v, attn_mask=mask)
    c = counters()
    assert sage_calls() == calls, c
    assert c.get("sdpa:mask", 0) == (1 if kind == "row_keeps_none" else 0), c
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                         attn_mask=keep[:, None, None, :]).transpose(1, 2)
    if kind == "row_keeps_none":
        torch.testing.assert_close(out[1], ref[1], equal_nan=True)  # SDPA's own answer for a fully masked row
        out, ref = out[:1], ref[:1]
    if INTERPRET:  # 8-bit (FP8 P·V): close, not equal
        rel = (out.float() - ref.float()).abs().sum() / ref.float().abs().sum()
        assert rel < 0.05, float(rel)
    else:
        torch.testing.assert_close(out, ref)
    if kind not in ("all_kept", "row_keeps_none"):
        unmasked = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        assert (ref.float() - unmasked.float()).abs().max() > 0.1  # the mask matters here


@pytest.mark.parametrize("causal,masked", [(False, False), (True, False), (False, True)])
def test_lse_fallback_is_exact(causal, masked):
    B, N, H, D = 1, 10, 2, 16
    q, k, v = (rand_nhd(B, N, H, D, dtype=torch.float32, seed=s) for s in range(3))
    mask = None
    if masked:
        mask = torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(4)) > 0.3
        mask[..., 0] = True
    reset_counters()
    out, lse = attend_with_lse(q, k, v, attn_mask=mask, is_causal=causal, pv="auto")
    assert counters() == {"sdpa-lse:" + ("mask" if masked else "fp32"): 1}
    qh, kh, vh = (t.transpose(1, 2).double() for t in (q, k, v))
    s = qh @ kh.transpose(-1, -2) / math.sqrt(D)
    if causal:
        s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    if masked:
        s = s.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).transpose(1, 2).float())
    torch.testing.assert_close(out, (torch.softmax(s, -1) @ vh).transpose(1, 2).float(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# tiny models of each family
# ---------------------------------------------------------------------------------------------------------------

def _attn_modules(model):
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, (Attention, AttentionModuleMixin))]


def _check_routing(model, inputs, expected_route, calls_per_forward=None):
    """enable_sage routes every attention call; outputs equal the exact model where the kernel falls back;
    disable_sage restores everything."""
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        reset_counters()
        ref = model(**inputs, return_dict=False)[0]
        assert sage_calls() == 0
        originals = [(m.processor, getattr(m.processor, "_attention_backend", None)) for m in _attn_modules(model)]
        reports = enable_sage(model)
        assert {r[1] for r in reports[0].sites} == set(expected_route.split("+"))
        n_sites = len(reports[0].sites)
        assert n_sites == len(_attn_modules(model))
        reset_counters()
        out = model(**inputs, return_dict=False)[0]
        calls = sage_calls()
        assert calls == (n_sites if calls_per_forward is None else calls_per_forward), (counters(), n_sites)
        assert F.scaled_dot_product_attention.__module__.startswith("torch")  # patch is scoped to the call
        if not INTERPRET:
            torch.testing.assert_close(out, ref)  # CPU fallback is exact SDPA
        disable_sage(model)
        assert sage_state(model) is None
        assert [(m.processor, getattr(m.processor, "_attention_backend", None))
                for m in _attn_modules(model)] == originals
        reset_counters()
        again = model(**inputs, return_dict=False)[0]
        assert sage_calls() == 0
        torch.testing.assert_close(again, ref)
    return calls


def test_flux_dispatch_route():
    from diffusers import FluxTransformer2DModel

    from comfy_sage.pipelines._tiny import cast_keeping_fp32

    torch.manual_seed(0)
    m = cast_keeping_fp32(FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2,
                                                 attention_head_dim=16, num_attention_heads=2,
                                                 joint_attention_dim=16, pooled_projection_dim=16,
                                                 axes_dims_rope=(4, 6, 6)), torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 8, generator=g).bfloat16(),
                  encoder_hidden_states=torch.randn(1, 6, 16, generator=g).bfloat16(),
                  pooled_projections=torch.randn(1, 16, generator=g).bfloat16(),
                  timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(6, 3))
    _check_routing(m, inputs, "dispatch")
    rep = enable_sage(m)[0]
    assert [(s[0], s[3]) for s in rep.sites] == [("transformer_blocks.0.attn", 0),
                                                   ("single_transformer_blocks.0.attn", 1),
                                                   ("single_transformer_blocks.1.attn", 2)]
    assert rep.groups == {"double": 1, "single": 2}
    disable_sage(m)


def test_sd3_processor_route():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32,
                              pooled_projection_dim=16, out_channels=4).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g).bfloat16(),
                  encoder_hidden_states=torch.randn(1, 6, 16, generator=g).bfloat16(),
                  pooled_projections=torch.randn(1, 16, generator=g).bfloat16(), timestep=torch.tensor([10]))
    _check_routing(m, inputs, "sdpa")


def test_cogvideox_processor_route_keeps_rotary_kwargs():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                    time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8,
                                    sample_height=8, sample_frames=5, patch_size=2, temporal_compression_ratio=4,
                                    max_text_seq_length=6, use_rotary_positional_embeddings=True,
                                    use_learned_positional_embeddings=False).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cos, sin = get_3d_rotary_pos_embed(16, crops_coords=((0, 0), (4, 4)), grid_size=(4, 4), temporal_size=2)
    inputs = dict(hidden_states=torch.randn(1, 2, 4, 8, 8, generator=g).bfloat16(),
                  encoder_hidden_states=torch.randn(1, 6, 16, generator=g).bfloat16(), timestep=torch.tensor([10]),
                  image_rotary_emb=(cos, sin))
    _check_routing(m, inputs, "sdpa")
    # the rotary embedding reached the wrapped processor: without it the output differs
    enable_sage(m)
    with torch.no_grad():
        no_rope = m(**{**inputs, "image_rotary_emb": None}, return_dict=False)[0]
        with_rope = m(**inputs, return_dict=False)[0]
    disable_sage(m)
    assert (no_rope.float() - with_rope.float()).abs().max() > 1e-3


def _padding_is_invisible(model, inputs, pad, text_key="encoder_hidden_states"):
    """With enable_sage, garbage in the padded prompt positions leaves the output unchanged: the mask is honoured."""
    garbage = inputs[text_key].clone()
    garbage[:, -pad:] = 30 * torch.randn(garbage[:, -pad:].shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        enable_sage(model)
        try:
            out = model(**inputs, return_dict=False)[0]
            again = model(**{**inputs, text_key: garbage}, return_dict=False)[0]
        finally:
            disable_sage(model)
    torch.testing.assert_close(again, out, rtol=0, atol=1e-6)


def test_hunyuanvideo_padding_mask_honoured():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                       num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                       patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                       pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 6, dtype=torch.long)
    mask[:, 4:] = 0  # two padding tokens in the prompt
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g).bfloat16(), timestep=torch.tensor([10]),
                  encoder_hidden_states=torch.randn(1, 6, 16, generator=g).bfloat16(), encoder_attention_mask=mask,
                  pooled_projections=torch.randn(1, 8, generator=g).bfloat16(), guidance=torch.tensor([3500.0]))
    with torch.no_grad():
        reset_counters()
        reports = enable_sage(m)
        m(**inputs, return_dict=False)
        c = counters()
        disable_sage(m)
    routes = Counter(r[1] for r in reports[0].sites)
    # the double and single blocks dispatch with a [B, 1, 1, N] key-padding mask: run on the kept keys; the token
    # refiner calls SDPA itself with a [B, 1, N, N] mask: exact SDPA with it. Every call is masked, none dropped it.
    assert routes == {"dispatch": 2, "sdpa": 1}, routes
    assert sage_calls(c) == 2 and c.get("sdpa:mask", 0) == 1, c
    _check_routing(m, inputs, "dispatch+sdpa", calls_per_forward=2)
    _padding_is_invisible(m, inputs, pad=2)


def test_ltx_encoder_mask_honoured():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                   cross_attention_dim=32, num_layers=2, caption_channels=16).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 6, dtype=torch.long)
    mask[:, 4:] = 0
    inputs = dict(hidden_states=torch.randn(1, 2 * 4 * 4, 8, generator=g).bfloat16(),
                  encoder_hidden_states=torch.randn(1, 6, 16, generator=g).bfloat16(), timestep=torch.tensor([10]),
                  encoder_attention_mask=mask, num_frames=2, height=4, width=4)
    reset_counters()
    # self-attention runs comfy_sage; cross-attention gets LTX's additive encoder mask: exact SDPA with it
    _check_routing(m, inputs, "dispatch", calls_per_forward=2)
    enable_sage(m)
    reset_counters()
    with torch.no_grad():
        m(**inputs, return_dict=False)
    disable_sage(m)
    assert counters().get("sdpa:mask", 0) == 2, counters()
    _padding_is_invisible(m, inputs, pad=2)


@pytest.mark.skipif(not hasattr(diffusers, "QwenImageTransformer2DModel"), reason="diffusers without QwenImage")
def test_qwen_image_dispatch_route_with_padding_mask():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=16,
                                    axes_dims_rope=(4, 6, 6)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, 6, dtype=torch.long)
    mask[:, 4:] = 0  # text comes first in the joint sequence: the kept keys are not a prefix
    inputs = dict(hidden_states=torch.randn(1, 4 * 4, 16, generator=g).bfloat16(),
                  encoder_hidden_states=torch.randn(1, 6, 16, generator=g).bfloat16(),
                  encoder_hidden_states_mask=mask, timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]])
    # every joint attention carries the key-padding mask and still runs comfy_sage (on the kept keys)
    _check_routing(m, inputs, "dispatch")
    enable_sage(m)
    reset_counters()
    with torch.no_grad():
        m(**inputs, return_dict=False)
    disable_sage(m)
    assert sage_calls() == 2 and "sdpa:mask" not in counters(), counters()
    _padding_is_invisible(m, inputs, pad=2)
    _check_routing(m, {**inputs, "encoder_hidden_states_mask": None}, "dispatch")


def test_enable_sage_bad_arguments():
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                               axes_dims_rope=(4, 6, 6))
    with pytest.raises(ValueError, match="unknown pv 'int4'"):
        enable_sage(m, pv="int4")
    with pytest.raises(TypeError, match="Schedule"):
        enable_sage(m, schedule="0-3")
    with pytest.raises(TypeError, match="diffusers pipeline or model"):
        enable_sage("wan")
    from comfy_sage.kernels.schedule import Schedule, ScheduleError

    with pytest.raises(ScheduleError, match="out of range: this model has 2 blocks"):
        enable_sage(m, schedule=Schedule.from_strings(blocks="5"))
    with pytest.raises(ValueError, match="no attention that comfy_sage can route"):
        enable_sage(torch.nn.Linear(2, 2))


@pytest.mark.skipif(sys.platform != "linux", reason="Triton interpreter run")
def test_kernel_really_runs_in_pipeline_under_interpreter(tmp_path):
    """In a fresh process with TRITON_INTERPRET=1 (set before triton is imported), the embedded Wan pipeline's
    attention runs the real 8-bit Triton kernels: every call is counted int8, and the video stays close to SDPA."""
    code = textwrap.dedent("""
        import json, sys
        from comfy_sage.pipelines.sage_video import generate
        r = generate("a fox", num_frames=5, height=32, width=32, steps=2, compare=True, progress=False,
                     output_path=sys.argv[1])
        print(json.dumps({"counters": r.counters, "psnr": r.compare["psnr_db_mean"],
                          "sdpa": r.compare["sdpa"]["counters"]}))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # cwd outside the repository: from its root, transformers' probe for the PyPI `kernels` package imports our
    # kernels/ a second time as top-level `kernels` (see the pipelines report)
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "v.gif")], env=env, capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    res = json.loads(p.stdout.strip().splitlines()[-1])
    # 2 steps x (cond + uncond) x 2 blocks x (self + cross) = 16 attention calls, all through the INT8 kernel
    assert res["counters"] == {"int8-fp8pv": 16}, res
    assert res["sdpa"] == {}, res
    assert res["psnr"] is not None and res["psnr"] > 30, res
