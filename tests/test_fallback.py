"""A failure inside the 8-bit path never reaches the user's workflow: the call runs exact SDPA, counted under
`sdpa:kernel_error`, logged once with the exception text, remembered per config (no second failure) and listed by
`doctor`, through every adapter; malformed calls still raise. And `sage_sdpa` installed as the global
F.scaled_dot_product_attention, eager and compiled."""
import dataclasses
import logging
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from comfy_sage import kernels
from comfy_sage.kernels import _api, _arch, _attention, _fallback, _quant, counters, reset_counters, sage_attention
from comfy_sage.kernels import exact_sdpa, sage_sdpa
from kernel_cases import make_qkv

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def eight_bit_at_any_length(monkeypatch):
    """On a GPU sage_sdpa keeps SDPA below the arch table's crossovers; these tests' short calls must reach the
    8-bit path."""
    if DEV == "cuda":
        entry = _arch.arch_of(torch.device("cuda"))
        monkeypatch.setitem(_arch.ARCHES, entry.name, entry.with_threshold(0))


@pytest.fixture
def broken(monkeypatch):
    """The Triton attention launch fails as on a GPU or Triton we never ran (out of shared memory). Returns the
    list of configs it was asked to launch."""
    monkeypatch.setenv(_fallback.STRICT_ENV, "0")
    _fallback.forget()
    launches = []

    def fail(qz, v, out, lse, *, dims, fp8_v, **kw):
        launches.append((dims[5], fp8_v))
        raise OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(_attention, "attention", fail)
    reset_counters()
    yield launches
    _fallback.forget()


def test_kernel_failure_runs_exact_sdpa_counted_logged_once_and_remembered(broken, caplog):
    q, k, v = make_qkv(1, 2, 2, 40, 40, 64, device=DEV)
    with caplog.at_level(logging.WARNING, logger="comfy_sage"):
        a = sage_attention(q, k, v, pv="fp16")
        b = sage_sdpa(q, k, v, pv="fp16")
    ref = exact_sdpa(q, k, v)
    assert torch.equal(a, ref) and torch.equal(b, ref)
    assert broken == [(64, False)]  # the second call did not pay for the failure again
    assert counters() == {"sdpa:kernel_error": 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "OutOfResources" in warnings[0] and "shared memory" in warnings[0]
    failures = kernels.doctor().get("kernel_failures") if _arch.arch_of(q.device) else _fallback.failures()
    assert len(failures) == 1
    [(config, text)] = failures.items()
    assert "D=64" in config and "fp16" in config and "OutOfResources" in text
    # another config tries the kernel (and fails on its own account)
    sage_attention(q[..., :32], k[..., :32], v[..., :32], pv="fp16")
    assert broken == [(64, False), (32, False)]


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_lse_fallback_is_exact_with_gqa_and_causal(broken, layout):
    q, k, v = make_qkv(2, 4, 2, 30, 45, 64, device=DEV, seed=3)
    args = (q, k, v) if layout == "HND" else tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))
    out, lse = sage_attention(*args, layout=layout, is_causal=True, return_lse=True, pv="fp8")
    kk, vv = (t.float().repeat_interleave(2, dim=1) for t in (k, v))
    s = (q.float() @ kk.transpose(-1, -2)) / 8.0
    s = s.masked_fill(torch.ones(30, 45, dtype=torch.bool, device=DEV).triu(1), float("-inf"))
    ref = torch.softmax(s, -1) @ vv
    out = out if layout == "HND" else out.transpose(1, 2)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.float() - ref).abs().max() < 2e-3
    assert (lse - torch.logsumexp(s, -1)).abs().max() < 1e-4
    assert counters() == {"sdpa:kernel_error": 1}


def test_quantization_failure_and_missing_triton_api_fall_back(broken, monkeypatch):
    def missing(*a, **kw):
        raise AttributeError("module 'triton' has no attribute 'constexpr_function'")

    monkeypatch.setattr(_quant, "quantize", missing)
    q, k, v = make_qkv(1, 2, 1, 20, 20, 32, device=DEV)
    assert torch.equal(sage_sdpa(q, k, v, enable_gqa=True), exact_sdpa(q, k, v, enable_gqa=True))
    assert "constexpr_function" in " ".join(_fallback.failures().values())


def test_strict_mode_raises(broken, monkeypatch):
    monkeypatch.setenv(_fallback.STRICT_ENV, "1")
    q, k, v = make_qkv(1, 1, 1, 16, 16, 64, device=DEV)
    with pytest.raises(OutOfResources):
        sage_attention(q, k, v)


def test_out_of_memory_falls_back_without_being_remembered(broken, monkeypatch):
    def oom(*a, **kw):
        broken.append("oom")
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(_attention, "attention", oom)
    q, k, v = make_qkv(1, 1, 1, 16, 16, 64, device=DEV)
    for _ in range(2):
        assert torch.equal(sage_attention(q, k, v), exact_sdpa(q, k, v))
    assert broken == ["oom", "oom"] and not _fallback.failures()  # memory may be free next time
    assert counters() == {"sdpa:out_of_memory": 2}


def test_malformed_calls_still_raise(broken):
    q, k, v = make_qkv(1, 2, 2, 16, 16, 64, device=DEV)
    with pytest.raises(ValueError, match="head dims differ"):
        sage_attention(q, k[..., :32], v)
    with pytest.raises(TypeError, match="mixed dtypes"):
        sage_attention(q, k.float(), v)
    assert broken == [] and counters() == {}


def test_warp_specialized_failure_runs_the_triton_kernel(monkeypatch):
    """The Gluon kernel failing (a Gluon API that moved) sends the call to the Triton kernel, not to SDPA."""
    try:
        from comfy_sage.kernels import _attention_ws
    except ImportError:  # a Triton without Gluon (3.2-3.3): a stand-in module takes the Gluon kernel's place
        _attention_ws = types.ModuleType("comfy_sage.kernels._attention_ws")
        monkeypatch.setitem(sys.modules, _attention_ws.__name__, _attention_ws)
        monkeypatch.setattr(kernels, "_attention_ws", _attention_ws, raising=False)
    monkeypatch.setenv(_fallback.STRICT_ENV, "0")
    monkeypatch.setattr(_attention_ws, "usable", lambda: True, raising=False)
    _fallback.forget()
    tries = []

    def fail(*a, **kw):
        tries.append(1)
        raise TypeError("async_copy_global_to_shared() got an unexpected keyword argument")

    monkeypatch.setattr(_attention_ws, "attention", fail, raising=False)
    tile = _arch.Tile(32, 32, 4, 1, True, None, _arch.WarpSpec(3, 2, 128))
    q, k, v = make_qkv(1, 2, 2, 40, 70, 64, device=DEV, seed=3)
    reset_counters()
    try:
        for _ in range(2):
            out, _ = _api._forward(q, k, v, "HND", False, None, "fp8", False, tile=tile)
        ref, _ = _api._forward(q, k, v, "HND", False, None, "fp8", False, tile=dataclasses.replace(tile, ws=None))
    finally:
        failures = _fallback.failures()
        _fallback.forget()
    assert torch.equal(out, ref)
    assert tries == [1] and counters() == {"int8-fp8pv": 3}
    assert any(c.startswith("ws ") and "unexpected keyword" in t for c, t in failures.items())


# ---- adapters ------------------------------------------------------------------------------------------------
def test_comfyui_override_falls_back(broken):
    from comfy_sage.nodes import _runtime

    def original(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kw):
        b, n, _ = q.shape
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)

    st = _runtime.SageState(True, "auto", None, False, {"family": "test", "num_blocks": None})
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 32, 64, generator=g).half().to(DEV) for _ in range(3))
    out = st(original, q, k, v, 2, transformer_options={}, _inside_attn_wrapper=True)
    assert torch.equal(out, original(q, k, v, 2))
    assert dict(st.run["paths"]) == {"sdpa:kernel_error": 1}


def test_diffusers_backends_and_processor_route_fall_back(broken):
    pytest.importorskip("diffusers")
    import diffusers
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from comfy_sage.pipelines.backend import attend_with_lse, redirect_sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 24, 2, 32, generator=g).bfloat16().to(DEV) for _ in range(3))
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    with diffusers.attention_backend("comfy_sage"):
        assert torch.equal(dispatch_attention_fn(q, k, v), ref)
    with redirect_sdpa("auto"):  # processors that call F.scaled_dot_product_attention themselves (CogVideoX, SD3)
        assert torch.equal(F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2),
                           ref)
    out, lse = attend_with_lse(q, k, v, pv="auto")  # context parallelism's forward op
    assert (out.float() - ref.float()).abs().max() < 1e-2 and lse.shape == (1, 24, 2)
    assert counters() == {"sdpa:kernel_error": 3}


def test_calibration_never_picks_a_variant_that_failed(monkeypatch):
    from comfy_sage.kernels.calibrate import variant_errors

    monkeypatch.setenv(_fallback.STRICT_ENV, "0")
    _fallback.forget()
    reset_counters()
    launch = _attention.attention

    def fp8_fails(qz, v, out, lse, *, fp8_v, **kw):
        if fp8_v:
            raise OutOfResources(1, 0, "shared memory")
        return launch(qz, v, out, lse, fp8_v=fp8_v, **kw)

    monkeypatch.setattr(_attention, "attention", fp8_fails)
    q, k, v = make_qkv(1, 2, 2, 48, 48, 64, device=DEV, seed=5)
    errs = variant_errors(q, k, v, variants=("fp8", "fp16"))
    _fallback.forget()
    assert errs["fp8"] == float("inf") and 0 < errs["fp16"] < 0.02
    assert counters() == {}  # calibration's calls stay uncounted


# ---- the global replacement ------------------------------------------------------------------------------------
def test_global_replacement_does_not_recurse(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", sage_sdpa)
    reset_counters()
    q, k, v = make_qkv(1, 2, 2, 24, 24, 32, device=DEV)
    mask = torch.ones(24, 24, dtype=torch.bool, device=DEV).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # falls back: must reach the real SDPA
    assert torch.equal(out, exact_sdpa(q, k, v, attn_mask=mask))
    out = F.scaled_dot_product_attention(q, k, v)
    assert (out.float() - exact_sdpa(q, k, v).float()).abs().max() < 0.05
    assert counters() == {"sdpa:mask": 1, **({"int8-fp8pv": 1} if _arch.arch_of(q.device) else {"sdpa:cpu": 1})}


def test_global_replacement_under_torch_compile_fullgraph(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", sage_sdpa)
    torch._dynamo.reset()

    def attn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = make_qkv(1, 2, 2, 24, 24, 32, device=DEV)
    mask = torch.ones(24, 24, dtype=torch.bool, device=DEV).tril()
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager" if DEV == "cpu" else "inductor")
    reset_counters()
    out = compiled(q, k, v, mask)
    ref = exact_sdpa(q, k, v) + exact_sdpa(q, k, v, attn_mask=mask)
    assert (out.float() - ref.float()).abs().max() < 0.05
    if _arch.arch_of(q.device):
        assert counters() == {"int8-fp8pv": 1}  # the 8-bit op ran inside the graph; the masked call is SDPA's
    torch._dynamo.reset()


def test_ptxas_release_names_the_ptxas_triton_runs(monkeypatch, tmp_path):
    """The release of the ptxas Triton picks for an arch (3.9 compiles sm90 with CUDA 13.4's, sm80-89 with 12.9's):
    read from the tool itself; None where it does not run."""
    from comfy_sage.kernels import _compat

    nv = pytest.importorskip("triton.backends.nvidia.compiler")
    fake = tmp_path / "ptxas-fake"
    fake.write_text("#!/bin/sh\necho 'ptxas: NVIDIA (R) Ptx optimizing assembler'\n"
                    "echo 'Cuda compilation tools, release 13.4, V13.4.99'\n")
    fake.chmod(0o755)
    asked = []
    monkeypatch.setattr(nv, "get_ptxas", lambda arch: asked.append(arch) or types.SimpleNamespace(path=str(fake)),
                        raising=False)
    assert _compat.ptxas_release(90) == f"13.4 ({fake})" and asked == [90]
    fake.write_text("#!/bin/sh\nexit 3\n")
    assert _compat.ptxas_release(120) is None
    monkeypatch.undo()
    mine = _compat.ptxas_release(90)  # this machine's Triton: a release and a path, or None where it cannot run
    assert mine is None or re.fullmatch(r"\d+\.\d+ \(.*ptxas[^/]*\)", mine), mine


def test_doctor_states_where_this_triton_stands(monkeypatch):
    from comfy_sage.kernels import _compat

    assert _arch._triton_support("3.1.0").startswith("older than Triton 3.2")
    assert _arch._triton_support("3.10.1").startswith("newer than the Triton 3.9")
    monkeypatch.setattr(_compat, "has_tensor_descriptors", lambda: False)
    assert _arch._triton_support("3.2.0") == ("tested (Triton 3.2-3.9); no tensor descriptors (before 3.4): sm90 "
                                              "tiles use pointer loads")
    assert "triton_support" in kernels.doctor()
