"""GPU check (run by hand on the GPU machine; not collected by pytest):

    COMFYUI_PATH=/path/to/ComfyUI TRITON_INTERPRET=0 python tests/comfyui/gpu_sampling_check.py [--dim 1536 --layers 30]

Builds a Wan-2.1-shaped model from ComfyUI's own classes (random weights, fp16, default: the 1.3B shape: dim 1536,
12 heads of 128, 30 layers) plus tiny Flux and UNet, samples each with default attention and with Apply
SageAttention (same seed), and prints: finite-ness, closeness (PSNR and max abs of the latents, cosine similarity),
which paths ran (counters), and timing (median of --repeats runs after a warm-up, model time per step).
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import conftest as C  # noqa: E402


def build_wan(dim, layers, heads, dtype, device):
    import comfy.model_patcher
    import comfy.supported_models as sm

    uc = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16,
          "dim": dim, "ffn_dim": 8960 if dim == 1536 else dim * 4, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": heads,
          "num_layers": layers, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
    cfg = sm.WAN21_T2V(uc)
    cfg.set_inference_dtype(dtype, dtype)  # manual-cast ops: Wan's patch embedding runs in fp32
    cfg.unet_config["dtype"] = dtype
    model = cfg.get_model({}, device=device)
    C._init_weights(model.diffusion_model, std=0.02)
    model.diffusion_model.to(device=device, dtype=dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def sample_wan(model, frames, h, w, steps, seed, dtype):
    import comfy.sample

    lat = torch.zeros(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8)
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, 512, 4096, generator=g).to(dtype), {}]]
    neg = [[torch.randn(1, 512, 4096, generator=g).to(dtype), {}]]
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "simple", pos, neg, lat, seed=seed,
                               disable_pbar=True)


def closeness(ref, out):
    ref, out = ref.float().flatten(), out.float().flatten()
    mse = float(((ref - out) ** 2).mean())
    rng = float(ref.max() - ref.min())
    psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(rng ** 2 / mse)).item()
    cos = float(torch.nn.functional.cosine_similarity(ref, out, dim=0))
    return {"finite": bool(torch.isfinite(out).all()), "psnr_db": round(psnr, 2),
            "max_abs": float((ref - out).abs().max()), "cosine": round(cos, 6)}


def timed(fn, repeats):
    fn()  # warm-up (Triton compile, cudnn autotune)
    ts = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return out, statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pv", default="auto", choices=["auto", "fp16", "fp8"])
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    C.comfy_import()
    pack = C.load_pack()
    M = pack.NODE_CLASS_MAPPINGS
    from comfy_sage.kernels import counters, reset_counters

    dev, dtype = torch.device("cuda"), torch.float16
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    base = build_wan(a.dim, a.layers, a.heads, dtype, dev)
    default, = M["ApplySageAttention"]().apply(base, False, a.pv, False, None)
    sage, = M["ApplySageAttention"]().apply(base, True, a.pv, False, None)
    args = (a.frames, a.height, a.width, a.steps, 0, dtype)
    ref, t_ref = timed(lambda: sample_wan(default, *args), a.repeats)
    reset_counters()
    out, t_sage = timed(lambda: sample_wan(sage, *args), a.repeats)
    st = sage.model_options["transformer_options"]["comfy_sage_state"]
    tokens = ((a.frames - 1) // 4 + 1) * (a.height // 16) * (a.width // 16)
    print(f"wan-shaped dim={a.dim} heads={a.heads} layers={a.layers} tokens={tokens} steps={a.steps} (cfg batch 2)")
    print(f"  default: {t_ref:.3f}s   sage: {t_sage:.3f}s   speed-up {t_ref / t_sage:.3f}x (whole sampling)")
    print(f"  closeness: {closeness(ref, out)}")
    print(f"  paths (last run): {dict(st.run['paths'])}; kernel counters: {counters()}")
    print(pack.nodes._runtime.summary(st, default.model_options['transformer_options']['comfy_sage_state']))

    for kind in ("flux", "unet"):
        m = C.BUILDERS[kind](dtype)
        m.load_device = dev
        d, = M["ApplySageAttention"]().apply(m, False, a.pv, False, None)
        s, = M["ApplySageAttention"]().apply(m, True, a.pv, False, None)
        r = C.sample(d, kind, dtype, steps=4)
        o = C.sample(s, kind, dtype, steps=4)
        print(f"tiny {kind}: {closeness(r, o)}; paths {dict(s.model_options['transformer_options']['comfy_sage_state'].run['paths'])}")


if __name__ == "__main__":
    main()
