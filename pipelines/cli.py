"""`python -m comfy_sage video ...` and `python -m comfy_sage image ...`: `generate` on the command line.

    python -m comfy_sage video "a red fox running through snow" --compare
    python -m comfy_sage video "..." --model /models/Wan2.1-T2V-1.3B-Diffusers --frames 81 --steps 30
    python -m comfy_sage image "a lighthouse at dawn" --model /models/FLUX.1-dev --compare
"""
from __future__ import annotations

import argparse
import json
import sys


def _parser():
    p = argparse.ArgumentParser(prog="python -m comfy_sage", description="Generate with 8-bit SageAttention "
                                "through diffusers (no model given: an embedded tiny pipeline with random weights).")
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in (("video", "a video (Wan 2.1/2.2, CogVideoX, LTX, HunyuanVideo)"),
                       ("image", "an image (Flux, SD3)")):
        s = sub.add_parser(name, help=f"generate {what}")
        s.add_argument("prompt", help="the text prompt")
        s.add_argument("--model", default=None, help="local diffusers folder (default: embedded tiny model)")
        if name == "video":
            s.add_argument("--frames", type=int, default=None, help="number of frames (the model's 4k+1 rule...)")
            s.add_argument("--fps", type=int, default=None)
        s.add_argument("--height", type=int, default=None)
        s.add_argument("--width", type=int, default=None)
        s.add_argument("--steps", type=int, default=None, help="denoising steps")
        s.add_argument("--guidance", type=float, default=None, help="guidance scale")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--negative-prompt", default=None)
        s.add_argument("--attention", default="sage", help="sage (8-bit) or sdpa (PyTorch)")
        s.add_argument("--pv", default="auto", help="P·V precision: auto, fp16, fp8, int8 or fine")
        s.add_argument("--sparse", default=None, metavar="auto|keep=F|ratio=F",
                       help="block-sparse self-attention: auto (calibration picks a level per site, dense where "
                       "attention is not local), keep=F (the key blocks holding a share F of each query tile's "
                       "attention mass) or ratio=F (a share F of the key blocks); cross-attention stays dense")
        s.add_argument("--dense-steps", default=None, help="steps that stay dense with --sparse, e.g. '0-1'")
        s.add_argument("--sage-steps", default=None, help="steps that run 8-bit, e.g. '2-' style ranges: "
                       "'1-29' or fractions '0.1-1.0' (default: all)")
        s.add_argument("--exact-steps", default=None, help="steps kept exact, e.g. '0, -1'")
        s.add_argument("--sage-blocks", default=None, help="blocks that run 8-bit, e.g. '1-28' or 'single'")
        s.add_argument("--exact-blocks", default=None, help="blocks kept exact, e.g. '0, 39'")
        s.add_argument("--sage-attention", default=None, help="attention kinds that run 8-bit: all, self, cross")
        s.add_argument("--schedule", default=None, help="a schedule JSON file (from calibration or the nodes)")
        s.add_argument("--compare", action="store_true", help="also run SDPA with the same seed; write side by "
                       "side, difference and a JSON report (timings, speed-up, PSNR)")
        s.add_argument("--output", "-o", default=None, help="output file (.mp4/.gif for video, .png for image)")
        s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
        s.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _schedule(args):
    from ..kernels.schedule import Schedule

    flags = (args.sage_steps, args.exact_steps, args.sage_blocks, args.exact_blocks, args.sage_attention)
    sched = None
    if any(f is not None for f in flags):
        sched = Schedule.from_strings(steps=args.sage_steps or "", blocks=args.sage_blocks or "",
                                      attention=args.sage_attention or "all", pv=args.pv,
                                      exact_steps=args.exact_steps or "", exact_blocks=args.exact_blocks or "")
    if args.schedule is not None:
        try:
            with open(args.schedule) as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"--schedule {args.schedule!r}: {e.strerror}") from e
        loaded = Schedule.from_json(text)
        sched = loaded if sched is None else sched & loaded
    return sched


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        schedule = _schedule(args)
        common = dict(model=args.model, height=args.height, width=args.width, steps=args.steps,
                      guidance=args.guidance, seed=args.seed, attention=args.attention, schedule=schedule,
                      compare=args.compare, output_path=args.output, device=args.device, pv=args.pv,
                      negative_prompt=args.negative_prompt, progress=not args.quiet, sparse=args.sparse,
                      dense_steps=args.dense_steps or "")
        if args.command == "video":
            from .sage_video import generate

            res = generate(args.prompt, num_frames=args.frames, fps=args.fps, **common)
        else:
            from .sage_image import generate

            res = generate(args.prompt, **common)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ..kernels import doctor

    info = doctor()
    print(f"wrote {res.path}  ({res.model}, {res.device}, {res.attention}, {len(res.step_times)} steps, "
          f"median step {res.median_step_s * 1e3:.1f} ms)")
    print(f"attention paths: {json.dumps(res.counters, sort_keys=True)}")
    if args.sparse and res.attention == "sage":
        d = [x for x in res.densities.values() if x is not None]
        print(f"sparse ({args.sparse}): " + (f"{len(d)} sites ran sparse, mean density {sum(d) / len(d):.1%} "
                                             f"(min {min(d):.1%}, max {max(d):.1%})" if d else "no site ran sparse"))
    if res.attention == "sage" and not any(k.startswith("int8-") for k in res.counters):
        print(f"note: the 8-bit kernel did not run here ({info.get('why')}); every call fell back to exact SDPA")
    if res.compare is not None:
        c = res.compare
        sp, ps = c["speedup_per_step"], c["psnr_db_mean"]
        interp = info.get("arch") == "interpret"
        sp_text = ("n/a (no 8-bit calls)" if sp is None else f"{sp:.2f}x"
                   + (" (Triton interpreter: not a speed measurement)" if interp else ""))
        print(f"compare: per-step speed-up vs SDPA {sp_text}, mean PSNR "
              f"{'identical' if ps is None else f'{ps:.1f} dB'}; files: "
              + ", ".join(f"{k}={v}" for k, v in res.files.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
