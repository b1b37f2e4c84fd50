"""Every diffusers family `enable_sage` lists runs through the INT8 kernel on the GPU (skipped without CUDA).

Each test builds a small random-weight model of the family on CUDA in bf16 (kept-in-fp32 modules as
`from_pretrained(torch_dtype=...)` keeps them) with the family's real head dim but few layers and heads, runs one
forward with SDPA and one with `enable_sage`, and asserts from `kernels.counters()`:
  * the 8-bit kernel ran for every unmasked attention call (the exact number of calls per forward);
  * masked sites are honoured, never dropped: LTX's additive encoder mask runs exact SDPA (`sdpa:mask`),
    HunyuanVideo's and QwenImage's boolean key-padding masks run the kernel on the kept keys; in both cases garbage
    written into the padded prompt positions leaves the output unchanged, while without the mask it moves it;
  * the output is finite and its relative L1 against the SDPA output is small.

`sage_sdpa` keeps SDPA below a per-arch (and on sm90 per head dim) number of query-key pairs per head, and on sm90
below 7e8 pairs over batch and heads, where the kernel does not pay off. These models are small, so the thresholds
are lowered to 0 for the test (`min_pairs` fixture), except in `test_wan_real_threshold`, which runs 8192 video
tokens at the arch table's own per-head threshold (at most 8192² pairs on every arch): self-attention runs 8-bit,
cross-attention over the short prompt stays SDPA (`sdpa:short`).
"""
import dataclasses
from collections import Counter

import pytest
import torch

pytest.importorskip("diffusers")

from comfy_sage.kernels import _arch, counters, reset_counters  # noqa: E402
from comfy_sage.pipelines import disable_sage, enable_sage  # noqa: E402
from comfy_sage.pipelines._tiny import cast_keeping_fp32  # noqa: E402

pytestmark = pytest.mark.gpu

DTYPE = torch.bfloat16
MAX_REL_L1 = 0.05


@pytest.fixture
def min_pairs(monkeypatch):
    """Lower sage_sdpa's short-sequence threshold on every arch entry (the table is read at each call)."""
    for name, entry in list(_arch.ARCHES.items()):
        monkeypatch.setitem(_arch.ARCHES, name, entry.with_threshold(0))


def paths(c=None):
    """counters() with the 8-bit paths folded into one "int8" key (FP8 or FP16 P·V depends on arch and head dim)."""
    out = Counter()
    for k, v in (counters() if c is None else c).items():
        out["int8" if k.startswith("int8-") else k] += v
    return dict(out)


def rel_l1(out, ref):
    out, ref = out.float(), ref.float()
    return float((out - ref).abs().sum() / ref.abs().sum().clamp_min(1e-12))


def build(cls, dev, **config):
    torch.manual_seed(0)
    return cast_keeping_fp32(cls(**config), DTYPE).to(dev).eval()


def randn(*shape, dev, seed, dtype=DTYPE):
    g = torch.Generator(device=dev).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=dev).to(dtype)


def compare(model, inputs, expected):
    """One forward with SDPA, one with enable_sage; the counters of the second must equal `expected`.
    Returns (sage output, SDPA output, relative L1)."""
    with torch.inference_mode():
        reset_counters()
        ref = model(**inputs, return_dict=False)[0]
        assert paths() == {}, counters()  # SDPA run: nothing of ours
        enable_sage(model)
        try:
            reset_counters()
            out = model(**inputs, return_dict=False)[0]
            got = paths()
        finally:
            disable_sage(model)
    assert got == expected, (type(model).__name__, counters())
    assert out.shape == ref.shape and torch.isfinite(out).all()
    err = rel_l1(out, ref)
    assert err < MAX_REL_L1, (type(model).__name__, err)
    return out, ref, err


def mask_honoured(model, inputs, unmasked, pad):
    """With enable_sage, garbage in the padded prompt positions changes nothing (the padded keys are never seen),
    while the same garbage moves the output a lot once the mask is gone (so the check would catch a dropped mask)."""
    text = inputs["encoder_hidden_states"]
    garbage = text.clone()
    garbage[:, -pad:] = 30 * randn(*garbage[:, -pad:].shape, dev=text.device, seed=9)
    with torch.inference_mode():
        enable_sage(model)
        try:
            reset_counters()
            out = model(**inputs, return_dict=False)[0]
            out_garbage = model(**{**inputs, "encoder_hidden_states": garbage}, return_dict=False)[0]
            sage_paths = paths()
            free = model(**unmasked, return_dict=False)[0]
            free_garbage = model(**{**unmasked, "encoder_hidden_states": garbage}, return_dict=False)[0]
        finally:
            disable_sage(model)
    kept, dropped = rel_l1(out_garbage, out), rel_l1(free_garbage, free)
    print(f"{type(model).__name__}: garbage in padding moves the output {kept:.2e} with the mask, {dropped:.2e} "
          "without")
    assert "int8" in sage_paths, counters()
    assert kept < 1e-4 and dropped > 5e-4, (type(model).__name__, kept, dropped)


# ---------------------------------------------------------------------------------------------------------------
# builders: (model, inputs[, inputs without the mask]) at a size, on a device
# ---------------------------------------------------------------------------------------------------------------

def wan(dev, frames=4, hw=32, layers=2, text=64):
    from diffusers import WanTransformer3DModel

    m = build(WanTransformer3DModel, dev, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128,
              in_channels=16, out_channels=16, text_dim=64, freq_dim=64, ffn_dim=512, num_layers=layers)
    inputs = dict(hidden_states=randn(1, 16, frames, hw, hw, dev=dev, seed=1), timestep=torch.tensor([500], device=dev),
                  encoder_hidden_states=randn(1, text, 64, dev=dev, seed=2))
    return m, inputs


def cogvideox(dev, frames=3, hw=32, layers=2, text=32):
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    m = build(CogVideoXTransformer3DModel, dev, num_attention_heads=2, attention_head_dim=64, in_channels=16,
              out_channels=16, time_embed_dim=64, text_embed_dim=64, num_layers=layers, sample_width=hw,
              sample_height=hw, sample_frames=(frames - 1) * 4 + 1, patch_size=2, max_text_seq_length=text,
              use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False)
    g = hw // 2
    cos, sin = get_3d_rotary_pos_embed(64, crops_coords=((0, 0), (g, g)), grid_size=(g, g), temporal_size=frames,
                                       device=dev)
    inputs = dict(hidden_states=randn(1, frames, 16, hw, hw, dev=dev, seed=1),
                  encoder_hidden_states=randn(1, text, 64, dev=dev, seed=2), timestep=torch.tensor([500], device=dev),
                  image_rotary_emb=(cos, sin))
    return m, inputs


def ltx(dev, frames=4, hw=16, layers=2, text=64, pad=48):
    from diffusers import LTXVideoTransformer3DModel

    m = build(LTXVideoTransformer3DModel, dev, in_channels=32, out_channels=32, num_attention_heads=2,
              attention_head_dim=64, cross_attention_dim=128, num_layers=layers, caption_channels=64)
    mask = torch.ones(1, text, dtype=torch.long, device=dev)
    mask[:, text - pad:] = 0  # prompt padding, as the pipeline pads to max_sequence_length
    inputs = dict(hidden_states=randn(1, frames * hw * hw, 32, dev=dev, seed=1),
                  encoder_hidden_states=randn(1, text, 64, dev=dev, seed=2), timestep=torch.tensor([500], device=dev),
                  encoder_attention_mask=mask, num_frames=frames, height=hw, width=hw)
    return m, inputs, {**inputs, "encoder_attention_mask": torch.ones_like(mask)}


def hunyuan_video(dev, frames=4, hw=32, text=64, pad=48):
    from diffusers import HunyuanVideoTransformer3DModel

    m = build(HunyuanVideoTransformer3DModel, dev, in_channels=16, out_channels=16, num_attention_heads=2,
              attention_head_dim=128, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
              patch_size_t=1, guidance_embeds=True, text_embed_dim=64, pooled_projection_dim=32,
              rope_axes_dim=(16, 56, 56))
    mask = torch.ones(1, text, dtype=torch.long, device=dev)
    mask[:, text - pad:] = 0
    inputs = dict(hidden_states=randn(1, 16, frames, hw, hw, dev=dev, seed=1), timestep=torch.tensor([500], device=dev),
                  encoder_hidden_states=randn(1, text, 64, dev=dev, seed=2), encoder_attention_mask=mask,
                  pooled_projections=randn(1, 32, dev=dev, seed=3), guidance=torch.tensor([6000.0], device=dev))
    return m, inputs, {**inputs, "encoder_attention_mask": torch.ones_like(mask)}


def _flux_ids(h, w, text, dev):
    img = torch.zeros(h, w, 3, device=dev)
    img[..., 1] = torch.arange(h, device=dev)[:, None]
    img[..., 2] = torch.arange(w, device=dev)[None, :]
    return img.reshape(h * w, 3), torch.zeros(text, 3, device=dev)


def flux(dev, hw=32, text=64):
    from diffusers import FluxTransformer2DModel

    m = build(FluxTransformer2DModel, dev, patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
              attention_head_dim=128, num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
              guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    img_ids, txt_ids = _flux_ids(hw, hw, text, dev)
    inputs = dict(hidden_states=randn(1, hw * hw, 64, dev=dev, seed=1),
                  encoder_hidden_states=randn(1, text, 64, dev=dev, seed=2),
                  pooled_projections=randn(1, 32, dev=dev, seed=3), timestep=torch.tensor([0.5], device=dev),
                  guidance=torch.tensor([3.5], device=dev), img_ids=img_ids, txt_ids=txt_ids)
    return m, inputs


def sd3(dev, hw=64, text=32):
    from diffusers import SD3Transformer2DModel

    # SD3.5-style: qk RMS norm and a dual-attention first layer (its attn2 is image-only self-attention)
    m = build(SD3Transformer2DModel, dev, sample_size=hw, patch_size=2, in_channels=16, num_layers=2,
              attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128,
              pooled_projection_dim=32, out_channels=16, qk_norm="rms_norm", dual_attention_layers=(0,))
    inputs = dict(hidden_states=randn(1, 16, hw, hw, dev=dev, seed=1),
                  encoder_hidden_states=randn(1, text, 64, dev=dev, seed=2),
                  pooled_projections=randn(1, 32, dev=dev, seed=3), timestep=torch.tensor([500], device=dev))
    return m, inputs


def qwen_image(dev, hw=32, text=64, pad=48):
    import diffusers

    cls = diffusers.QwenImageTransformer2DModel
    m = build(cls, dev, patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128,
              num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(16, 56, 56))
    mask = torch.ones(1, text, dtype=torch.long, device=dev)
    mask[:, text - pad:] = 0  # text comes first in Qwen's joint sequence: the kept keys are not a prefix
    inputs = dict(hidden_states=randn(1, hw * hw, 64, dev=dev, seed=1),
                  encoder_hidden_states=randn(1, text, 64, dev=dev, seed=2), encoder_hidden_states_mask=mask,
                  timestep=torch.tensor([0.5], device=dev), img_shapes=[[(1, hw, hw)]])
    return m, inputs, {**inputs, "encoder_hidden_states_mask": None}


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------

DEV = "cuda"


def test_wan21(min_pairs):
    m, inputs = wan(DEV)
    compare(m, inputs, {"int8": 2 * 2})  # 2 blocks x (self + cross)


def test_wan_real_threshold(monkeypatch):
    """8192 video tokens (2 x 64 x 64 after 1x2x2 patches), the arch table's own per-head threshold (its total-work
    one is lowered: this model has 2 heads, not 40): self-attention has 8192² pairs and runs 8-bit;
    cross-attention over 64 prompt tokens (524k pairs) stays SDPA."""
    for name, entry in list(_arch.ARCHES.items()):
        monkeypatch.setitem(_arch.ARCHES, name, dataclasses.replace(entry, min_total_pairs=0))
    m, inputs = wan(DEV, frames=2, hw=128, layers=1)
    compare(m, inputs, {"int8": 1, "sdpa:short": 1})


def test_cogvideox(min_pairs):
    m, inputs = cogvideox(DEV)
    compare(m, inputs, {"int8": 2})  # joint text+video attention, one call per block (processor calls SDPA)


def test_ltx_encoder_mask_exact(min_pairs):
    m, inputs, unmasked = ltx(DEV)
    # self-attention 8-bit; cross-attention carries the additive encoder mask: exact SDPA with it
    compare(m, inputs, {"int8": 2, "sdpa:mask": 2})
    mask_honoured(m, inputs, unmasked, pad=48)


def test_hunyuanvideo_padding_mask_native(min_pairs):
    m, inputs, unmasked = hunyuan_video(DEV)
    # double + single block: the boolean key-padding mask is honoured by leaving the padded keys out (8-bit);
    # the token refiner's [B, 1, N, N] mask runs exact SDPA
    compare(m, inputs, {"int8": 2, "sdpa:mask": 1})
    mask_honoured(m, inputs, unmasked, pad=48)


def test_flux(min_pairs):
    m, inputs = flux(DEV)
    compare(m, inputs, {"int8": 3})  # 1 double + 2 single blocks


def test_sd3(min_pairs):
    m, inputs = sd3(DEV)
    compare(m, inputs, {"int8": 3})  # 2 joint attentions + the dual-attention layer's image self-attention


def test_qwen_image_padding_mask_native(min_pairs):
    import diffusers

    if not hasattr(diffusers, "QwenImageTransformer2DModel"):
        pytest.skip(f"diffusers {diffusers.__version__} has no QwenImageTransformer2DModel")
    m, inputs, unmasked = qwen_image(DEV)
    compare(m, inputs, {"int8": 2})
    mask_honoured(m, inputs, unmasked, pad=48)


def wan22_pipeline(dev, layers=1):
    """The embedded tiny Wan pipeline's text encoder and VAE with two Wan transformers of the real head dim, as
    Wan 2.2 A14B has (transformer for high noise, transformer_2 for low noise)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from comfy_sage.pipelines._tiny import TINY_WAN, tiny_wan_pipeline

    base = tiny_wan_pipeline()
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=4, out_channels=4,
               text_dim=TINY_WAN["text_encoder"]["d_model"], freq_dim=64, ffn_dim=512, num_layers=layers)
    t1 = build(WanTransformer3DModel, dev, **cfg)
    t2 = build(WanTransformer3DModel, dev, **cfg)
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       scheduler=base.scheduler, transformer=t1, transformer_2=t2, boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def _count_per_model(models):
    """8-bit calls made inside each model's forwards."""
    seen = {id(m): 0 for m in models}
    handles = []
    for m in models:
        state = {}

        def pre(mod, args, kwargs, state=state):
            state["before"] = paths().get("int8", 0)

        def post(mod, args, kwargs, out, state=state):
            seen[id(mod)] += paths().get("int8", 0) - state["before"]

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    return seen, handles


def test_wan22_two_transformers(min_pairs):
    pipe = wan22_pipeline(DEV)
    steps = 4
    call = dict(prompt="a fox", num_frames=5, height=256, width=256, num_inference_steps=steps, guidance_scale=1.0,
                max_sequence_length=16, output_type="latent")
    with torch.inference_mode():
        reset_counters()
        ref = pipe(**call, generator=torch.Generator(DEV).manual_seed(0)).frames
        assert paths() == {}
        enable_sage(pipe)
        seen, handles = _count_per_model([pipe.transformer, pipe.transformer_2])
        try:
            reset_counters()
            out = pipe(**call, generator=torch.Generator(DEV).manual_seed(0)).frames
        finally:
            for h in handles:
                h.remove()
            disable_sage(pipe)
    # one forward per step (no CFG), 1 block x (self + cross) each; the boundary splits the steps between the two
    assert paths() == {"int8": steps * 2}, counters()
    assert seen[id(pipe.transformer)] > 0 and seen[id(pipe.transformer_2)] > 0, seen
    assert torch.isfinite(out).all() and rel_l1(out, ref) < MAX_REL_L1, rel_l1(out, ref)
