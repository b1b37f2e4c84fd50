"""Per-step time of a video denoiser, comfy_sage vs SDPA in the same process (needs a CUDA GPU).

    python -m comfy_sage.bench.video_step bench/results/video_step-h100.json [--steps 3] [--layers 30]

1. A Wan 2.1 1.3B-shaped transformer (30 blocks, 12 heads x 128, ffn 8960, text 4096) with random bf16 weights at
   480p / 81 frames (latent 21 x 60 x 104: 32,760 tokens; 512 text tokens). One step = cond + uncond forwards
   (classifier-free guidance), as WanPipeline runs it. SDPA (diffusers' native backend: flash) and comfy_sage run
   the same inputs; the JSON gets median step times, the per-step speed-up, the relative L1 difference of the
   outputs and the counters that prove which path ran.
2. The embedded tiny Wan pipeline end to end (`sage_video.generate(compare=True)`): a smoke run of the full path.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics

import torch

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)


def environment() -> dict:
    """Where a result was measured: the header of every bench JSON written on the GPU machine (and the CPU smoke)."""
    from ..kernels import doctor

    d = doctor()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "triton": d["triton"], "python": platform.python_version(), "doctor": d}


def _time_steps(model, inputs, steps, warmup=1):
    """Median and all per-step times (s) of `steps` CFG steps (2 forwards each), after `warmup` steps."""
    times = []
    with torch.no_grad():
        for i in range(warmup + steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for cond in inputs:
                out = model(**cond, return_dict=False)[0]
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), times, out


def wan_shaped(steps, layers, frames, height, width):
    from diffusers import WanTransformer3DModel

    from ..kernels import counters, reset_counters
    from ..pipelines import disable_sage, enable_sage
    from ..pipelines._tiny import cast_keeping_fp32

    cfg = dict(WAN_1_3B, num_layers=layers)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    with dev:
        model = cast_keeping_fp32(WanTransformer3DModel(**cfg), torch.bfloat16).eval()
    lat = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(lat, generator=g, device=dev, dtype=torch.bfloat16)
    t = torch.tensor([500.0], device=dev)
    cond = torch.randn(1, 512, 4096, generator=g, device=dev, dtype=torch.bfloat16)
    uncond = torch.randn(1, 512, 4096, generator=g, device=dev, dtype=torch.bfloat16)
    inputs = [dict(hidden_states=x, timestep=t, encoder_hidden_states=e) for e in (cond, uncond)]
    tokens = lat[2] * (lat[3] // 2) * (lat[4] // 2)

    disable_sage(model)
    reset_counters()
    sdpa_med, sdpa_all, ref = _time_steps(model, inputs, steps)
    sdpa_counts = counters()
    res = {"config": cfg, "latent": list(lat), "tokens": tokens, "text_tokens": 512, "frames": frames,
           "height": height, "width": width, "steps_timed": steps,
           "sdpa": {"median_step_s": sdpa_med, "step_times_s": sdpa_all, "counters": sdpa_counts}}
    for pv in ("auto", "fp16"):
        enable_sage(model, pv=pv)
        reset_counters()
        med, all_, out = _time_steps(model, inputs, steps)
        cnt = counters()
        disable_sage(model)
        rel_l1 = ((out.float() - ref.float()).abs().sum() / ref.float().abs().sum()).item()
        res[f"sage_{pv}"] = {"median_step_s": med, "step_times_s": all_, "counters": cnt,
                             "speedup_per_step": sdpa_med / med, "rel_l1_vs_sdpa_last_forward": rel_l1}
    del model
    torch.cuda.empty_cache()
    return res


def embedded(tmp_dir):
    from ..pipelines.sage_video import generate

    r = generate("a red fox running through snow", compare=True, progress=False,
                 output_path=os.path.join(tmp_dir, "embedded.gif"), device="cuda")
    c = r.compare
    return {k: c[k] for k in ("speedup_per_step", "median_step_s", "psnr_db_mean", "max_abs_diff",
                              "sage_8bit_calls", "sage_fallback_calls")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m comfy_sage.bench.video_step")
    ap.add_argument("out", help="JSON file to write (e.g. bench/results/video_step-h100.json)")
    ap.add_argument("--steps", type=int, default=3, help="timed CFG steps per attention (after one warm-up)")
    ap.add_argument("--layers", type=int, default=30, help="transformer blocks (30 = Wan 2.1 1.3B)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--skip-embedded", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench/video_step.py needs a CUDA GPU")
        return 2
    if (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        print(f"error: Wan takes 4k+1 frames and sizes that are multiples of 16 (got {args.frames} frames, "
              f"{args.height}x{args.width})")
        return 2
    res = dict(environment(),
               wan_1_3b_shaped=wan_shaped(args.steps, args.layers, args.frames, args.height, args.width))
    print(json.dumps(res["wan_1_3b_shaped"], default=str), flush=True)  # kept even if the embedded run fails
    if not args.skip_embedded:
        res["embedded_tiny_wan"] = embedded(os.path.dirname(os.path.abspath(args.out)))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2, default=str)
    w = res["wan_1_3b_shaped"]
    print(f"{res['gpu']}: Wan-1.3B-shaped, {w['tokens']} tokens, per CFG step: SDPA {w['sdpa']['median_step_s']:.3f}s")
    for pv in ("auto", "fp16"):
        s = w[f"sage_{pv}"]
        print(f"  sage pv={pv}: {s['median_step_s']:.3f}s  speed-up {s['speedup_per_step']:.2f}x  "
              f"rel L1 {s['rel_l1_vs_sdpa_last_forward']:.4f}  {s['counters']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
