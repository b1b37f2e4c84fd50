"""End-to-end benchmark: diffusers transformers at real shapes, every attention variant in one process.

    python -m comfy_sage.bench.e2e bench/results/e2e-h100.json [--quick] [--layers 2] [--models ...] [--variants ...]
    python -m comfy_sage.bench.e2e /tmp/e2e.json --cpu-smoke     # tiny configs on CPU: the whole script, exact paths

Models (random bf16 weights, created on the GPU; diffusers' own classes and real configs):
  Wan 2.1 1.3B (12x128 heads) and 14B (40x128, ffn 13824) at 480p and 720p, 81 frames: 32,760 and 75,600 tokens
  (+512 text); Flux-dev at 1024x1024: 4,096 image + 512 text tokens (24x128); CogVideoX-5B at 720x480, 49 frames:
  17,550 + 226 text tokens (48x64); HunyuanVideo at 960x544, 61 frames: 32,640 + 256 text tokens (24x128).

Layers are cut, shapes are not: each model runs `--layers` blocks of each kind (double/single) instead of its
full depth. CUDA events around every block give the median ms per block of each kind; the full forward is
extrapolated as (forward - its blocks) + sum over kinds of (real block count x ms per block), and a step as
`calls_per_step` such forwards (2 where the pipeline runs classifier-free guidance as two calls).

Variants (same weights, same inputs): `none` (attention replaced by a free identity: the rest of the step, so
attention share = 1 - none / variant), `sdpa_flash` and `sdpa_cudnn` (forced with sdpa_kernel; cuDNN first is what
ComfyUI users get), `sdpa_default` (PyTorch's own choice), `sage` (`enable_sage(model)`), `sage_calibrated`
(`enable_sage(model, calibrate=True)`), `sage_fp8` (`enable_sage(model, pv="fp8")`: the speed-first path, which
`auto` was on sm90 before kernel v11), `sage_attention_only` (`enable_sage(model, fuse_rope=False)`: Wan's
rotary embedding left to diffusers' torch ops, so the gain is the attention's alone; the same as `sage` for the
other families), `sage_sparse25` (`enable_sage(model, sparse="ratio=0.25")`: every self-attention runs the
block-sparse kernel on a quarter of its key blocks, cross-attention dense; the JSON gives each site's density. It
times attention at a fixed density: random weights have no locality, so its fidelity here is that of dropping 3/4
of the blocks of near-uniform attention, not what a real model loses; sparse fidelity is measured at kernel level
on local inputs, bench/sparse.py), and the peers where they import on a GPU (../shared/peers/): `sageattention2`
(SageAttention 2's CUDA kernel) and `comfy_kitchen_int8` (ComfyUI core's INT8 attention), each answering the
unmasked, non-causal 16-bit calls of F.scaled_dot_product_attention (SDPA the rest; the JSON counts both).
Speed-ups are baseline time / variant time, on the extrapolated step and per layer.

Fidelity: a short flow-matching Euler loop (shifted sigmas, conditional calls only) from the same noise, on the
same cut model, with exact attention (default SDPA) as reference; each variant's final latents get cosine, PSNR
(peak = the reference's range) and relative L1. A variant that errors (e.g. forced flash with HunyuanVideo's
attention mask) is recorded with its error and the run goes on. The JSON is rewritten after every model.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .video_step import WAN_1_3B, WAN_14B, environment

# the peers (../shared/peers/) run where they import, on a GPU: SageAttention 2's CUDA kernel and comfy-kitchen's
# INT8 attention (ComfyUI core's), each as F.scaled_dot_product_attention for the calls it takes
PEERS = ("sageattention2", "comfy_kitchen_int8")
VARIANTS = ("sdpa_default", "sdpa_cudnn", "sdpa_flash", "sage", "sage_fp8", "sage_calibrated", "sage_attention_only",
            "sage_sparse25", *PEERS, "none")
BASELINES = ("sdpa_cudnn", "sdpa_flash", "sdpa_default")
EIGHT_BIT = ("sage", "sage_fp8", "sage_calibrated", "sage_attention_only", "sage_sparse25")
SPARSE = {"sage_sparse25": "ratio=0.25"}  # variant -> enable_sage's sparse level

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
COGVIDEOX_5B = dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
                    text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49,
                    patch_size=2, max_text_seq_length=226, use_rotary_positional_embeddings=True)
HUNYUAN_VIDEO = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                     num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                     qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                     rope_theta=256.0, rope_axes_dim=(16, 56, 56))


@dataclass(frozen=True)
class Family:
    cls: str
    blocks: tuple           # ((block list attribute, config key of its depth), ...) in forward order
    text_dim_key: str
    pooled_dim_key: str | None = None


FAMILIES = {
    "wan": Family("WanTransformer3DModel", (("blocks", "num_layers"),), "text_dim"),
    "flux": Family("FluxTransformer2DModel", (("transformer_blocks", "num_layers"),
                                              ("single_transformer_blocks", "num_single_layers")),
                   "joint_attention_dim", "pooled_projection_dim"),
    "cogvideox": Family("CogVideoXTransformer3DModel", (("transformer_blocks", "num_layers"),), "text_embed_dim"),
    "hunyuan": Family("HunyuanVideoTransformer3DModel", (("transformer_blocks", "num_layers"),
                                                         ("single_transformer_blocks", "num_single_layers")),
                      "text_embed_dim", "pooled_projection_dim"),
}


@dataclass(frozen=True)
class Case:
    family: str
    config: dict            # the full-depth config of the real model
    frames: int             # 1 for images
    height: int
    width: int
    text_len: int
    calls_per_step: int     # transformer calls per sampling step in the real pipeline (2 = CFG as two calls)
    note: str = ""


CASES = {
    "wan-1.3b-480p": Case("wan", WAN_1_3B, 81, 480, 832, 512, 2),
    "wan-1.3b-720p": Case("wan", WAN_1_3B, 81, 720, 1280, 512, 2, "1.3B is trained at 480p; shape reference only"),
    "wan-14b-480p": Case("wan", WAN_14B, 81, 480, 832, 512, 2),
    "wan-14b-720p": Case("wan", WAN_14B, 81, 720, 1280, 512, 2),
    "flux-dev-1024": Case("flux", FLUX_DEV, 1, 1024, 1024, 512, 1, "guidance-distilled: one call per step"),
    "cogvideox-5b": Case("cogvideox", COGVIDEOX_5B, 49, 480, 720, 226, 2, "its pipeline batches CFG (batch 2)"),
    "hunyuan-video-544p": Case("hunyuan", HUNYUAN_VIDEO, 61, 544, 960, 256, 1,
                               "guidance-distilled; diffusers passes a key-padding mask (all true here)"),
}
QUICK = ("wan-1.3b-480p", "wan-14b-480p", "wan-14b-720p", "flux-dev-1024", "cogvideox-5b", "hunyuan-video-544p")

# --cpu-smoke: the same classes at toy sizes; real depths of 3 so that the extrapolation is exercised.
_T = dict(num_attention_heads=2, attention_head_dim=16)
TINY_CASES = {
    "tiny-wan": Case("wan", dict(WAN_1_3B, **_T, in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                 num_layers=3, rope_max_seq_len=64), 5, 32, 32, 8, 2),
    "tiny-flux": Case("flux", dict(FLUX_DEV, **_T, in_channels=16, num_layers=3, num_single_layers=3,
                                   joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
                      1, 64, 64, 8, 1),
    "tiny-cogvideox": Case("cogvideox", dict(COGVIDEOX_5B, **_T, in_channels=4, out_channels=4, time_embed_dim=16,
                                             text_embed_dim=32, num_layers=3, sample_width=4, sample_height=4,
                                             sample_frames=5, max_text_seq_length=8), 5, 32, 32, 8, 2),
    "tiny-hunyuan": Case("hunyuan", dict(HUNYUAN_VIDEO, **_T, in_channels=4, out_channels=4, num_layers=3,
                                         num_single_layers=3, num_refiner_layers=1, text_embed_dim=32,
                                         pooled_projection_dim=32, rope_axes_dim=(4, 6, 6)), 5, 32, 32, 8, 1),
}


def latent_shape(case: Case) -> tuple:
    """The transformer's input latent (batch 1): VAE /8 in space, /4 in time (4k+1 frames); Flux's pipeline packs
    2x2 latent patches into its 64 input channels."""
    c = case.config
    h, w = case.height // 8, case.width // 8
    if case.family == "flux":
        return (1, (h // 2) * (w // 2), c["in_channels"])
    t = (case.frames - 1) // 4 + 1
    if case.family == "cogvideox":
        return (1, t, c["in_channels"], h, w)
    return (1, c["in_channels"], t, h, w)


def tokens(case: Case) -> tuple[int, int]:
    """(latent tokens, text tokens) that every joint/self attention of the model sees, from the config's patches."""
    c, lat = case.config, latent_shape(case)
    if case.family == "flux":
        return lat[1], case.text_len
    if case.family == "wan":
        pt, ph, pw = c["patch_size"]
        t, h, w = lat[2:]
    else:
        pt, ph = c.get("patch_size_t") or 1, c["patch_size"]
        pw = ph
        t, h, w = (lat[1], lat[3], lat[4]) if case.family == "cogvideox" else lat[2:]
    return (t // pt) * (h // ph) * (w // pw), case.text_len


def _inputs(case: Case, device, dtype):
    """(noise latent, {extra model kwargs}) from a fixed seed: the same for every variant."""
    c = case.config
    fam = FAMILIES[case.family]
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(s, generator=g, device=device, dtype=dtype)  # noqa: E731
    noise = rnd(*latent_shape(case))
    ex = {"encoder_hidden_states": rnd(1, case.text_len, c[fam.text_dim_key])}
    if fam.pooled_dim_key:
        ex["pooled_projections"] = rnd(1, c[fam.pooled_dim_key])
    if case.family == "flux":
        rows, cols = torch.meshgrid(torch.arange(case.height // 16), torch.arange(case.width // 16), indexing="ij")
        ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).flatten(0, 1)  # (0, row, col) per packed token
        ex["img_ids"] = ids.to(device, dtype)
        ex["txt_ids"] = torch.zeros(case.text_len, 3, device=device, dtype=dtype)
        ex["guidance"] = torch.full((1,), 3.5, device=device)
    elif case.family == "hunyuan":
        # a full-length prompt: every text token valid (the mask is still built and passed by the model)
        ex["encoder_attention_mask"] = torch.ones(1, case.text_len, device=device, dtype=torch.int64)
        ex["guidance"] = torch.full((1,), 6.0 * 1000, device=device)  # the pipeline passes guidance x 1000
    elif case.family == "cogvideox":
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        p = c["patch_size"]
        grid = (noise.shape[3] // p, noise.shape[4] // p)
        # CogVideoXPipeline crops the rope grid to the model's sample size: at that size the crop is the whole grid
        if grid != (c["sample_height"] // p, c["sample_width"] // p):
            raise ValueError(f"CogVideoX case must use the model's sample size, got grid {grid}")
        ex["image_rotary_emb"] = get_3d_rotary_pos_embed(c["attention_head_dim"], ((0, 0), grid), grid,
                                                         noise.shape[1], device=device)
    return noise, ex


def _call(model, case, x, sigma, extras):
    """One transformer call at noise level sigma in [0, 1], with each family's timestep convention."""
    t = torch.full((x.shape[0],), float(sigma), device=x.device)
    t = t if case.family == "flux" else t * 1000  # Flux multiplies by 1000 inside
    return model(hidden_states=x, timestep=t, **extras, return_dict=False)[0]


def sigmas(steps, shift=3.0):
    """Flow-matching schedule 1 -> 0 with the usual time shift (Wan/SD3 style)."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).tolist()


def denoise(model, case, noise, extras, steps):
    """Euler steps of a flow-matching sampler, latents kept in fp32 between calls."""
    x = noise.float()
    sig = sigmas(steps)
    with torch.no_grad():
        for s0, s1 in zip(sig[:-1], sig[1:]):
            x = x + (s1 - s0) * _call(model, case, x.to(noise.dtype), s0, extras).float()
    return x


def fidelity(out, ref) -> dict:
    """Cosine, PSNR (peak = range of the reference; None when bit-identical) and relative L1."""
    o, r = out.double().flatten(), ref.double().flatten()
    mse = ((o - r) ** 2).mean().item()
    peak = (r.max() - r.min()).item()
    return {"cosine": F.cosine_similarity(o, r, dim=0).item(),
            "psnr_db": 10 * math.log10(peak ** 2 / mse) if mse > 0 else None,
            "rel_l1": ((o - r).abs().sum() / r.abs().sum()).item()}


class _Clock:
    """CUDA events on the GPU (nothing synchronizes inside a forward), perf_counter on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def ms(self, a, b):
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def time_forward(model, call, kinds, clock, warmup, reps):
    """Median ms of one forward, per block of each kind (mean over the kind's blocks), and outside the blocks."""
    marks = {k: [] for k in kinds}
    hooks = []
    for kind in kinds:
        for block in getattr(model, kind):
            hooks.append(block.register_forward_pre_hook(lambda m, a, k=kind: marks[k].append([clock.mark()])))
            hooks.append(block.register_forward_hook(lambda m, a, o, k=kind: marks[k][-1].append(clock.mark())))
    total, per_block, outside = [], {k: [] for k in kinds}, []
    try:
        with torch.no_grad():
            for i in range(warmup + reps):
                for m in marks.values():
                    m.clear()
                a = clock.mark()
                call()
                b = clock.mark()
                clock.sync()
                if i < warmup:
                    continue
                blocks = {k: [clock.ms(s, e) for s, e in m] for k, m in marks.items()}
                total.append(clock.ms(a, b))
                outside.append(total[-1] - sum(map(sum, blocks.values())))
                for k, v in blocks.items():
                    per_block[k].append(statistics.mean(v))
    finally:
        for h in hooks:
            h.remove()
    med = statistics.median
    return {"forward_ms": med(total), "block_ms": {k: med(v) for k, v in per_block.items()},
            "non_block_ms": med(outside)}


@contextlib.contextmanager
def attention_variant(name, model, cuda):
    """Run the model's attention as `name`; yields a dict of facts about the variant for the JSON."""
    from torch.nn.attention import sdpa_kernel

    from ..pipelines import disable_sage, enable_sage
    from .bench import SDPA

    info = {}
    if name == "none":
        # Both routes of diffusers end in F.scaled_dot_product_attention (the dispatcher's native backend looks it
        # up at call time, CogVideoX's processor calls it directly): answering with the query costs nothing.
        # Every family here has equal query and value head dims.
        orig = F.scaled_dot_product_attention
        info["attention_calls_replaced"] = 0

        def free(query, key, value, *args, **kwargs):
            info["attention_calls_replaced"] += 1
            return query

        F.scaled_dot_product_attention = free
        try:
            yield info
        finally:
            F.scaled_dot_product_attention = orig
    elif name in SDPA:
        info["forced"] = cuda  # a CPU has no cuDNN/flash kernels to force: the smoke runs the default there
        with sdpa_kernel([SDPA[name]]) if cuda else contextlib.nullcontext():
            yield info
    elif name == "sdpa_default":
        yield info
    elif name in PEERS:
        with _as_sdpa(_peer(name), info):
            yield info
    elif name in EIGHT_BIT:
        # calibrated: the first call measures every site (running exactly), the later ones run its decision
        reports = enable_sage(model, calibrate=name == "sage_calibrated", fuse_rope=name != "sage_attention_only",
                              sparse=SPARSE.get(name), pv="fp8" if name == "sage_fp8" else "auto")
        info["sites"] = sum(len(r.sites) for r in reports)
        try:
            yield info
        finally:
            cals = [r.calibrator for r in reports if getattr(r, "calibrator", None) is not None]
            if cals:  # per-site decisions, and whether they were measured in the first call or loaded
                info["calibration"] = [line for c in cals for line in c.describe()]
            if name in SPARSE:  # mean density of each site's sparse calls (none where the kernel did not run)
                info["sparse"] = SPARSE[name]
                info["densities"] = {site: d for r in reports for site, d in r.densities().items()}
            disable_sage(model)
    else:
        raise ValueError(f"unknown variant {name!r}: use {', '.join(VARIANTS)}")


def _peer(name):
    """The peer's attention as fn(q, k, v, scale) on [B, H, N, D]; ImportError where it is not installed."""
    if name == "sageattention2":
        from sageattention import sageattn

        return lambda q, k, v, scale: sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale)
    from comfy_kitchen import int8_attention

    return lambda q, k, v, scale: int8_attention(q, k, v, scale=scale)


def default_variants(cuda: bool) -> list:
    """VARIANTS, less the peers that are not installed (or a CPU: they are CUDA kernels)."""
    out = []
    for v in VARIANTS:
        if v in PEERS:
            try:
                if not cuda:
                    continue
                _peer(v)
            except ImportError:
                continue
        out.append(v)
    return out


@contextlib.contextmanager
def _as_sdpa(fn, info):
    """F.scaled_dot_product_attention answered by fn for the calls it takes (no mask, dropout or causal flag; equal
    head counts; 16-bit), by SDPA for the rest; info["calls"] counts both over every call of the variant."""
    orig = F.scaled_dot_product_attention
    calls = info["calls"] = {"peer": 0, "sdpa": 0}
    inside = []  # a peer that calls SDPA itself gets SDPA

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if (inside or attn_mask is not None or dropout_p or is_causal or query.dim() != 4
                or key.shape[1] != query.shape[1] or query.dtype not in (torch.float16, torch.bfloat16)):
            calls["sdpa"] += 1
            return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
        calls["peer"] += 1
        inside.append(True)
        try:
            return fn(query, key, value, scale)
        finally:
            inside.pop()

    F.scaled_dot_product_attention = sdpa
    try:
        yield info
    finally:
        F.scaled_dot_product_attention = orig


def build(case: Case, layers: int, device, dtype):
    import diffusers

    from ..pipelines._tiny import cast_keeping_fp32

    fam = FAMILIES[case.family]
    cfg = dict(case.config, **{key: min(layers, case.config[key]) for _, key in fam.blocks})
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(diffusers, fam.cls)(**cfg)
    return cast_keeping_fp32(model, dtype).eval(), cfg


def run_case(case: Case, variants, layers, warmup, reps, fid_steps, fid_variants, device, dtype=torch.bfloat16):
    from ..kernels import counters, reset_counters

    cuda = device.type == "cuda"
    clock = _Clock(cuda)
    fam = FAMILIES[case.family]
    model, cfg = build(case, layers, device, dtype)
    kinds = [attr for attr, _ in fam.blocks]
    n_tok, n_txt = tokens(case)
    res = {"family": case.family, "class": fam.cls, "note": case.note, "config_full": case.config,
           "blocks_run": {a: cfg[k] for a, k in fam.blocks}, "blocks_real": {a: case.config[k] for a, k in fam.blocks},
           "frames": case.frames, "height": case.height, "width": case.width, "latent": list(latent_shape(case)),
           "tokens": n_tok, "text_tokens": n_txt, "calls_per_step": case.calls_per_step, "variants": {}}
    noise, extras = _inputs(case, device, dtype)
    ref = None
    if fid_steps:
        ref = denoise(model, case, noise, extras, fid_steps)
        res["fidelity_reference"] = f"sdpa_default, {fid_steps} Euler steps, final latents"
    call = lambda: _call(model, case, noise, 0.5, extras)  # noqa: E731
    for name in variants:
        r = res["variants"][name] = {}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            with attention_variant(name, model, cuda) as info:
                reset_counters()
                a = clock.mark()
                with torch.no_grad():
                    call()  # first call: Triton compilation, calibration
                b = clock.mark()
                clock.sync()
                r["first_call_s"] = clock.ms(a, b) / 1e3
                r.update(time_forward(model, call, kinds, clock, warmup, reps))
                if name == "none":  # counted over every call so far: report per forward
                    info["attention_calls_replaced"] //= 1 + warmup + reps
                    if not info["attention_calls_replaced"]:
                        raise RuntimeError("no attention went through F.scaled_dot_product_attention (another "
                                           "diffusers backend set?): 'none' would time the whole model")
                r["counters"] = counters()  # paths of the timed calls
                if ref is not None and name in fid_variants:
                    r["fidelity"] = fidelity(denoise(model, case, noise, extras, fid_steps), ref)
            r.update(info)
        except Exception as e:  # one variant failing (a backend refusing a mask, OOM) must not lose the others
            r["error"] = f"{type(e).__name__}: {e}"[:400]
        if cuda:
            r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    mem = [r["peak_mem_gib"] for r in res["variants"].values() if "peak_mem_gib" in r]
    if mem:
        res["peak_mem_gib"] = max(mem)
    summarize(res)
    return res


def summarize(res):
    """Extrapolate each timed variant to the full depth, then speed-ups and attention share from those numbers."""
    real = res["blocks_real"]
    ok = {n: r for n, r in res["variants"].items() if "forward_ms" in r}
    for r in ok.values():
        blocks = sum(real[k] * r["block_ms"][k] for k in real)
        r["ms_per_layer"] = blocks / sum(real.values())
        r["full_forward_ms"] = r["non_block_ms"] + blocks
        r["full_step_ms"] = r["full_forward_ms"] * res["calls_per_step"]
    for name, r in ok.items():
        r["speedup_vs"] = {b: ok[b]["full_step_ms"] / r["full_step_ms"] for b in BASELINES if b in ok}
        r["layer_speedup_vs"] = {b: ok[b]["ms_per_layer"] / r["ms_per_layer"] for b in BASELINES if b in ok}
        if "none" in ok and name != "none":
            r["attention_share"] = 1 - ok["none"]["full_forward_ms"] / r["full_forward_ms"]
    return res


def table(name, res) -> str:
    head = (f"{name}: {res['tokens']:,} + {res['text_tokens']} text tokens, {res['blocks_run']} of "
            f"{res['blocks_real']} blocks timed, {res['calls_per_step']} call(s)/step")
    rows = [head, f"  {'variant':16}{'ms/layer':>10}{'step s':>9}{'x cuDNN':>9}{'x flash':>9}{'x default':>10}"
                  f"{'attn %':>8}{'cosine':>10}{'PSNR':>7}  paths"]
    for v, r in res["variants"].items():
        if "error" in r:
            rows.append(f"  {v:16}error: {r['error'][:100]}")
            continue
        sp = r["speedup_vs"]
        fid = r.get("fidelity", {})
        cells = [f"{r['ms_per_layer']:10.2f}", f"{r['full_step_ms'] / 1e3:9.3f}"]
        cells += [f"{sp[b]:{w}.2f}" if b in sp else " " * w for b, w in zip(BASELINES, (9, 9, 10))]
        cells.append(f"{100 * r['attention_share']:8.1f}" if "attention_share" in r else " " * 8)
        cells.append(f"{fid['cosine']:10.6f}" if fid else " " * 10)
        cells.append(f"{fid['psnr_db']:7.1f}" if fid.get("psnr_db") else " " * 7)
        rows.append(f"  {v:16}" + "".join(cells) + "  " + ",".join(f"{k}={n}" for k, n in r["counters"].items()))
    return "\n".join(rows)


def _bars(result):
    """[(case, [(variant, speed-up vs cuDNN of the step)])] for the plot."""
    out = []
    for case, res in result["cases"].items():
        bars = [(v, r["speedup_vs"].get("sdpa_cudnn")) for v, r in res["variants"].items()
                if v != "none" and "speedup_vs" in r]
        out.append((case, [(v, s) for v, s in bars if s is not None]))
    return out


def plot(result, path):
    """Step speed-up over SDPA cuDNN per model and variant: matplotlib where installed, else drawn with Pillow."""
    groups = [g for g in _bars(result) if g[1]]
    if not groups:
        return
    names = sorted({v for _, bars in groups for v, _ in bars}, key=VARIANTS.index)
    title = f"e2e step speed-up over SDPA cuDNN, {result['gpu']} ({result['method_short']})"
    try:
        import matplotlib
    except ImportError:
        return _plot_pillow(groups, names, title, path)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5))
    width = 0.8 / len(names)
    for i, v in enumerate(names):
        xs = [j + i * width for j, (_, bars) in enumerate(groups) if v in dict(bars)]
        ax.bar(xs, [dict(bars)[v] for _, bars in groups if v in dict(bars)], width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [c for c, _ in groups], rotation=20, fontsize=8)
    ax.set_ylabel("x SDPA cuDNN (higher is faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_pillow(groups, names, title, path):
    from PIL import Image, ImageDraw

    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    bw, gap, top, bottom, left = 26, 40, 40, 90, 50
    W = left + len(groups) * (len(names) * bw + gap) + 20
    H = 420
    ymax = max(1.25, max(s for _, bars in groups for _, s in bars) * 1.1)
    y = lambda s: H - bottom - (H - top - bottom) * s / ymax  # noqa: E731
    img = Image.new("RGB", (max(W, 640), H), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill="black")
    d.line([(left, y(1.0)), (W - 10, y(1.0))], fill="black")
    d.text((5, y(1.0) - 6), "1.0x", fill="black")
    for j, (case, bars) in enumerate(groups):
        x0 = left + j * (len(names) * bw + gap)
        for i, v in enumerate(names):
            if v in dict(bars):
                s = dict(bars)[v]
                d.rectangle([x0 + i * bw, y(s), x0 + (i + 1) * bw - 2, y(0)], fill=colors[i % len(colors)])
                d.text((x0 + i * bw, y(s) - 12), f"{s:.2f}", fill="black")
        d.text((x0, H - bottom + 6), case, fill="black")
    for i, v in enumerate(names):
        d.rectangle([left + 150 * i, H - 30, left + 150 * i + 10, H - 20], fill=colors[i % len(colors)])
        d.text((left + 150 * i + 14, H - 32), v, fill="black")
    img.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m comfy_sage.bench.e2e", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="JSON to write (the PNG goes beside it), e.g. bench/results/e2e-h100.json")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no wan-1.3b-720p, fidelity of 8-bit only")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny configs on CPU (exact fallbacks): checks the script")
    ap.add_argument("--models", help=f"comma-separated subset of {', '.join(CASES)}")
    ap.add_argument("--variants", help="comma-separated subset of VARIANTS, run in this order (default: all, less the "
                    "peers that are not installed)")
    ap.add_argument("--layers", type=int, default=2, help="blocks of each kind actually run (real shapes)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--fidelity-steps", type=int, help="Euler steps of the fidelity loop (0 = skip)")
    args = ap.parse_args(argv)
    quick = args.quick or args.cpu_smoke
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    reps = args.reps if args.reps is not None else (2 if args.cpu_smoke else 3 if quick else 5)
    fid_steps = args.fidelity_steps if args.fidelity_steps is not None else (2 if args.cpu_smoke else 4)
    variants = ([v for v in args.variants.split(",") if v] if args.variants
                else default_variants(not args.cpu_smoke and torch.cuda.is_available()))
    bad = [v for v in variants if v not in VARIANTS]
    cases = TINY_CASES if args.cpu_smoke else CASES
    names = args.models.split(",") if args.models else list(QUICK if args.quick and not args.cpu_smoke else cases)
    bad += [n for n in names if n not in cases]
    if bad or args.layers < 1 or reps < 1:
        print(f"error: unknown {bad} (variants: {', '.join(VARIANTS)}; models: {', '.join(cases)}) or "
              "--layers/--reps < 1")
        return 2
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: bench/e2e.py needs a CUDA GPU (or --cpu-smoke)")
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    # the smoke checks every fidelity field; the GPU --quick run keeps the loop for the 8-bit variants only
    fid_variants = EIGHT_BIT if args.quick else tuple(v for v in VARIANTS if v != "none")
    result = dict(environment(), method=__doc__.split("\n\n", 2)[2].strip(),
                  method_short=f"{args.layers} block(s)/kind timed, extrapolated to full depth",
                  args=dict(vars(args), warmup=warmup, reps=reps, fidelity_steps=fid_steps), cases={})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    threads = torch.get_num_threads()
    if args.cpu_smoke:
        torch.set_num_threads(1)  # toy tensors: spreading them over threads costs more than it gains
    try:
        for name in names:
            t0 = time.perf_counter()
            res = run_case(cases[name], variants, args.layers, warmup, reps, fid_steps, fid_variants, device)
            res["wall_s"] = time.perf_counter() - t0
            result["cases"][name] = res
            print(table(name, res) + f"\n  ({res['wall_s']:.0f} s)", flush=True)
            with open(args.out, "w") as f:  # after every model: a run cut short keeps what it measured
                json.dump(result, f, indent=1, default=str)
    finally:
        torch.set_num_threads(threads)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(result, png)
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
