"""`python -m comfy_sage <command> ...`; `python -m comfy_sage <command> --help` for a command's options.

Every command's arguments are declared here, where nothing but argparse is imported: `--help` and argument errors
answer at once, and torch, Triton and diffusers (seconds of imports) load only once a command runs.
"""
import argparse
import os
import sys

COMMANDS = {
    "video": "generate a video with 8-bit attention through diffusers (no --model: an embedded tiny Wan-style "
             "pipeline with random weights; --compare also runs SDPA and reports the difference)",
    "image": "generate an image (Flux, SD3; no --model: an embedded tiny Flux-style pipeline)",
    "attention": "one attention call against exact fp32 attention: error, path and (on a GPU) speed",
    "doctor": "what this machine has (GPU, arch, Triton) and which kernel path it gets, and why",
    "bench": "kernel benchmark against SDPA's backends (GPU); on CPU, the accuracy table alone",
}


def _generate_args(ap, command):
    ap.add_argument("prompt", help="the text prompt")
    ap.add_argument("--model", default=None, help="local diffusers folder (default: embedded tiny model)")
    if command == "video":
        ap.add_argument("--frames", type=int, default=None, help="number of frames (the model's 4k+1 rule...)")
        ap.add_argument("--fps", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--negative-prompt", default=None)
    ap.add_argument("--attention", default="sage", help="sage (8-bit) or sdpa (PyTorch)")
    ap.add_argument("--pv", default="auto", help="P·V precision: auto, fp16, fp8, int8 or fine")
    ap.add_argument("--sparse", default=None, metavar="auto|keep=F|ratio=F",
                    help="block-sparse self-attention: auto (calibration picks a level per site, dense where "
                    "attention is not local), keep=F (the key blocks holding a share F of each query tile's "
                    "attention mass) or ratio=F (a share F of the key blocks); cross-attention stays dense")
    ap.add_argument("--dense-steps", default=None, help="steps that stay dense with --sparse, e.g. '0-1'")
    ap.add_argument("--sage-steps", default=None, help="steps that run 8-bit, e.g. '2-' style ranges: "
                    "'1-29' or fractions '0.1-1.0' (default: all)")
    ap.add_argument("--exact-steps", default=None, help="steps kept exact, e.g. '0, -1'")
    ap.add_argument("--sage-blocks", default=None, help="blocks that run 8-bit, e.g. '1-28' or 'single'")
    ap.add_argument("--exact-blocks", default=None, help="blocks kept exact, e.g. '0, 39'")
    ap.add_argument("--sage-attention", default=None, help="attention kinds that run 8-bit: all, self, cross")
    ap.add_argument("--schedule", default=None, help="a schedule JSON file (from calibration or the nodes)")
    ap.add_argument("--compare", action="store_true", help="also run SDPA with the same seed; write side by "
                    "side, difference and a JSON report (timings, speed-up, PSNR)")
    default = ("outputs/comfy_sage_video.mp4 (.gif without imageio-ffmpeg)" if command == "video"
               else "outputs/comfy_sage_image.png")
    ap.add_argument("--output", "-o", default=None, help=f"output file, .mp4/.gif for video, .png for image "
                    f"(default: {default}, under the working directory)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")


def _attention_args(ap):
    ap.add_argument("--n", type=int, default=None, help="sequence length (default 4096 on GPU, 64 on CPU)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--pv", default="auto", choices=["auto", "fp16", "fp8", "fine", "int8"])


def _bench_args(ap):
    ap.add_argument("--quick", action="store_true", help="N in {4096, 16384} only")
    ap.add_argument("--n", help="comma-separated sequence lengths instead of the grid's")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "results"))
    ap.add_argument("--sweep", action="store_true", help="tile sweep at N=16384 instead of the grid")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--accuracy-only", action="store_true", help="the accuracy table without the speed grid")
    ap.add_argument("--cpu-n", type=int, default=256, help="sequence length of the accuracy table on a machine "
                    "without CUDA (Triton's interpreter)")


ARGUMENTS = {"video": lambda ap: _generate_args(ap, "video"), "image": lambda ap: _generate_args(ap, "image"),
             "attention": _attention_args, "doctor": lambda ap: None, "bench": _bench_args}


def command_parser(command: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m comfy_sage {command}", description=COMMANDS[command])
    ARGUMENTS[command](ap)
    return ap


def _interpret_on_cpu():
    """Without CUDA, the commands that run our kernels run them through Triton's interpreter. TRITON_INTERPRET is
    read when triton is imported, so this comes before anything imports it (a value the user set wins)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _doctor(args):
    import json

    from .kernels import doctor

    print(json.dumps(doctor(), indent=1))
    return 0


def _bench(args):
    _interpret_on_cpu()
    from .bench.bench import run

    return run(args)


def _attention(args):
    """Run the kernel once against exact attention and print the error (and speed on a GPU)."""
    _interpret_on_cpu()
    import torch
    import torch.nn.functional as F

    from .kernels import counters, sage_attention

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    n = args.n or (4096 if cuda else 64)
    q, k, v = (torch.randn(1, 4, n, args.head_dim, device=dev, dtype=torch.float16) for _ in range(3))
    try:
        out = sage_attention(q, k, v, pv=args.pv)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    rel = ((out.float() - ref).abs().sum() / ref.abs().sum()).item()
    line = (f"sage_attention on {dev} ({'GPU' if cuda else 'Triton interpreter'}), N={n}, D={args.head_dim}: "
            f"relative L1 vs fp32 = {rel:.4f}")
    if cuda:
        from triton.testing import do_bench

        ms = do_bench(lambda: sage_attention(q, k, v, pv=args.pv), return_mode="median")
        sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
        line += f"; {ms:.3f} ms vs SDPA {sdpa:.3f} ms ({sdpa / ms:.2f}x)"
    print(f"{line}; paths {counters()}")
    return 0


def _generate(command):
    def run(args):
        from .pipelines import cli

        return cli.run(command, args)

    return run


RUN = {"video": _generate("video"), "image": _generate("image"), "attention": _attention, "doctor": _doctor,
       "bench": _bench}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m comfy_sage <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    lines += ["", "`python -m comfy_sage <command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"], ["help"]):
        print(usage())
        return 0
    if not argv or argv[0] not in RUN:
        print((f"error: unknown command {argv[0]!r}\n" if argv else "") + usage(), file=sys.stderr)
        return 2
    args = command_parser(argv[0]).parse_args(argv[1:])  # exits 2 on a bad argument, 0 after --help
    return RUN[argv[0]](args) or 0


if __name__ == "__main__":
    sys.exit(main())
