"""`python -m comfy_sage video ...` and `python -m comfy_sage image ...`: `generate` on the command line.

    python -m comfy_sage video "a red fox running through snow" --compare
    python -m comfy_sage video "..." --model /models/Wan2.1-T2V-1.3B-Diffusers --frames 81 --steps 30
    python -m comfy_sage image "a lighthouse at dawn" --model /models/FLUX.1-dev --compare
"""
from __future__ import annotations

import json
import sys


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
    """`python -m comfy_sage video|image ...` from Python: argv starts with the command."""
    from ..__main__ import main as cli_main

    return cli_main(argv)


def run(command: str, args) -> int:
    """Generate from arguments parsed by `comfy_sage.__main__` (which declares them without importing diffusers)."""
    try:
        schedule = _schedule(args)
        common = dict(model=args.model, height=args.height, width=args.width, steps=args.steps,
                      guidance=args.guidance, seed=args.seed, attention=args.attention, schedule=schedule,
                      compare=args.compare, output_path=args.output, device=args.device, pv=args.pv,
                      negative_prompt=args.negative_prompt, progress=not args.quiet, sparse=args.sparse,
                      dense_steps=args.dense_steps or "")
        if command == "video":
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
        sp_text = c["speed"] if sp is None else f"{sp:.2f}x"
        print(f"compare: per-step speed-up vs SDPA {sp_text}; mean PSNR "
              f"{'identical' if ps is None else f'{ps:.1f} dB'}; files: "
              + ", ".join(f"{k}={v}" for k, v in res.files.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
