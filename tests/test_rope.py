"""The one-pass rotary embedding (kernels/_rope.py, the Triton kernel: interpreted on CPU) against diffusers' Wan
rotation (float64 and float32 tables), and its hooks on diffusers' Wan attention (pipelines/wan_rope.py)."""
import pytest
import torch

from comfy_sage.kernels import _rope
from comfy_sage.kernels._rope import rotate_pairs

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (conftest sets TRITON_INTERPRET=1)


def diffusers_rotation(x, freqs_cos, freqs_sin):
    """What diffusers' WanAttnProcessor computes: products in the tables' dtype, rounded to x's dtype (float64 tables
    make it the exact rotation rounded once)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def tables(n, d, batch=1, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(batch, n, 1, d // 2, generator=g, dtype=torch.float64) * 200
    return (torch.cos(angle).repeat_interleave(2, -1).to(dtype), torch.sin(angle).repeat_interleave(2, -1).to(dtype))


def within_rounding(got, ref, x):
    """Each element within one unit in the last place of ref's dtype, or, where the pair's two products cancel,
    within fp32's rounding of them (a fused multiply-add keeps a residue that a rounded product loses)."""
    pair = (x.double()[..., 0::2].abs() + x.double()[..., 1::2].abs()).repeat_interleave(2, -1)
    bound = torch.maximum(ref.double().abs() * torch.finfo(ref.dtype).eps, 4 * torch.finfo(torch.float32).eps * pair)
    return bool(((got.double() - ref.double()).abs() <= bound).all())


@pytest.mark.parametrize("B,N,H,D,table_batch", [(1, 37, 5, 128, 1), (2, 20, 3, 40, 2), (2, 16, 4, 64, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rotation_matches_diffusers_float64(B, N, H, D, table_batch, dtype):
    # 16-bit: the Triton kernel; fp32 takes the torch path (the Wan hooks leave fp32 calls to diffusers)
    assert _rope.can_rotate(torch.empty(0, dtype=dtype, device=DEV)) == (dtype != torch.float32)
    g = torch.Generator().manual_seed(0)
    # a view with strides like the one diffusers rotates: [B, N, H*D] from a wider projection, unflattened
    wide = torch.randn(B, N, H * D + 8, generator=g).mul(4).to(dtype).to(DEV)
    x = wide[..., 8:].unflatten(-1, (H, D))
    cos, sin = (t.to(DEV) for t in tables(N, D, table_batch))
    got, ref = rotate_pairs(x, cos, sin), diffusers_rotation(x, cos, sin)
    assert got.shape == ref.shape and got.dtype == dtype and got.is_contiguous()
    assert within_rounding(got, ref, x)
    if dtype != torch.float32:
        # fp32 products instead of float64 ones flip a rounding only where the exact value sits near a tie
        assert (got != ref).double().mean() < 1e-3
    assert (got != x).double().mean() > 0.9  # it did rotate


def test_float32_tables_and_per_batch_angles():
    """float32 tables are what diffusers' Wan builds (get_1d_rotary_pos_embed returns .float())."""
    x = torch.randn(2, 9, 2, 16).bfloat16().to(DEV)
    cos, sin = (t.to(DEV) for t in tables(9, 16, batch=2, dtype=torch.float32))
    got = rotate_pairs(x, cos, sin)
    assert torch.equal(got[1], diffusers_rotation(x[1:], cos[1:], sin[1:])[0])  # row 1 used its own angles
    assert not torch.equal(got[1], rotate_pairs(x[1:], cos[:1], sin[:1])[0])


@pytest.mark.gpu
def test_rotation_on_the_gpu_at_a_wan_shape():
    """The compiled kernel (not the interpreter): Wan's 40 heads of 128, float32 tables as diffusers has them."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 4680, 40, 128, device="cuda", generator=g).bfloat16()
    cos, sin = (t.cuda() for t in tables(4680, 128, dtype=torch.float32))
    got, ref = rotate_pairs(x, cos, sin), diffusers_rotation(x, cos, sin)
    assert within_rounding(got, ref, x) and (got != ref).double().mean() < 1e-3
    assert within_rounding(got, diffusers_rotation(x, cos.double(), sin.double()), x)


@pytest.mark.parametrize("shape,table_shape,match", [
    ((1, 8, 2, 15), (1, 8, 1, 15), "D even"),
    ((1, 8, 30), (1, 8, 1, 30), r"\[B, N, H, D\]"),
    ((1, 8, 2, 16), (1, 9, 1, 16), r"freqs_cos must be \[1 or 1, 8, 1, 16\]"),
    ((2, 8, 2, 16), (3, 8, 1, 16), "freqs_cos must be"),
])
def test_bad_shapes_are_named(shape, table_shape, match):
    with pytest.raises(ValueError, match=match):
        rotate_pairs(torch.randn(shape, device=DEV).half(), torch.ones(table_shape, device=DEV),
                     torch.ones(table_shape, device=DEV))


diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def wan():
    from comfy_sage.pipelines._tiny import tiny_wan_pipeline

    return tiny_wan_pipeline(dtype=torch.bfloat16).transformer.to(DEV)


def wan_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, model.config.in_channels, 3, 8, 8, generator=g).bfloat16().to(DEV)
    text = torch.randn(1, 16, model.config.text_dim, generator=g).bfloat16().to(DEV)
    return dict(hidden_states=x, timestep=torch.tensor([500.0], device=DEV), encoder_hidden_states=text,
                return_dict=False)


def test_wan_rotation_runs_once_in_our_pass(wan, monkeypatch):
    """With enable_sage, each self-attention's q and k are rotated by our pass once, diffusers' own rotation is
    skipped, and the attention output is diffusers' to rounding: a skipped or doubled rotation is far off."""
    from comfy_sage.pipelines import disable_sage, enable_sage, wan_rope

    inputs = wan_inputs(wan)
    x = wan.patch_embedding(inputs["hidden_states"]).flatten(2).transpose(1, 2)  # [B, tokens, dim]
    rot = wan.rope(inputs["hidden_states"])
    attn = wan.blocks[0].attn1
    calls = []
    monkeypatch.setattr(wan_rope, "rotate_pairs", lambda *a, **kw: calls.append(a[0].shape) or rotate_pairs(*a, **kw))
    with torch.no_grad():
        enable_sage(wan, fuse_rope=False)  # the same attention path, diffusers' rotation
        ref, unrotated = attn(x, None, None, rot).float(), attn(x, None, None, None).float()
        disable_sage(wan)
        assert not calls
        report, = enable_sage(wan)
        ours = attn(x, None, None, rot).float()
        assert len(calls) == 2 and calls[0][2] == attn.heads
        twice = attn(x, None, None, (rot[0] ** 2 - rot[1] ** 2, 2 * rot[0] * rot[1])).float()  # angle doubled
        as_keyword = attn(x, rotary_emb=rot).float()
        wan(**inputs)
    disable_sage(wan)
    assert report.rope_fused == len(wan.blocks) and "rotary embedding in one pass at 2" in str(report)
    assert len(calls) == 2 + 4 + 2 * len(wan.blocks)  # self-attention only: cross-attention has no rotation
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= 1e-3 * scale
    assert torch.equal(as_keyword, ours)
    for wrong in (unrotated, twice):
        assert (wrong - ref).abs().max() > 0.05 * scale


def test_wan_rotation_compiles_in_one_graph(wan):
    """torch.compile(fullgraph=True) traces the hooks and keeps the rotation whole (a custom op): a graph break
    would raise here."""
    from comfy_sage.pipelines import disable_sage, enable_sage

    inputs = wan_inputs(wan, seed=2)
    x = wan.patch_embedding(inputs["hidden_states"]).flatten(2).transpose(1, 2)
    rot = wan.rope(inputs["hidden_states"])
    attn = wan.blocks[1].attn1
    graphs = []

    def keep(gm, example_inputs):  # the traced graph, run as it is
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            enable_sage(wan)
            eager = attn(x, None, None, rot)
            compiled = torch.compile(attn, backend=keep, fullgraph=True)(x, None, None, rot)
    finally:
        disable_sage(wan)
    assert torch.equal(compiled, eager)
    ops = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.comfy_sage.rotate_pairs.default) == 2  # q and k, inside the one graph


def test_disable_removes_every_hook_and_other_processors_are_left_alone(wan):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from comfy_sage.pipelines import disable_sage, enable_sage, wan_rope

    attn = wan.blocks[0].attn1
    enable_sage(wan)
    assert attn._forward_pre_hooks and attn.norm_q._forward_hooks and attn.norm_k._forward_hooks
    disable_sage(wan)
    assert not (attn._forward_pre_hooks or attn.norm_q._forward_hooks or attn.norm_k._forward_hooks)

    class Custom(WanAttnProcessor):  # a user's processor may compute anything: not ours to rewrite
        pass

    original = attn.processor
    attn.set_processor(Custom())
    try:
        assert not wan_rope.applies(attn) and wan_rope.applies(wan.blocks[1].attn1)
        report, = enable_sage(wan)
        assert report.rope_fused == len(wan.blocks) - 1
        disable_sage(wan)
        report, = enable_sage(wan, fuse_rope=False)
        assert report.rope_fused == 0 and not wan.blocks[1].attn1.norm_q._forward_hooks
        disable_sage(wan)
    finally:
        attn.set_processor(original)
