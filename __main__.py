"""`python -m comfy_sage <command> ...`; `python -m comfy_sage <command> --help` for a command's options."""
import argparse
import json
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


def _interpret_on_cpu():
    """Without CUDA, the commands that run our kernels run them through Triton's interpreter. TRITON_INTERPRET is
    read when triton is imported, so this comes before anything imports it (a value the user set wins)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _doctor(argv):
    argparse.ArgumentParser(prog="python -m comfy_sage doctor", description=COMMANDS["doctor"]).parse_args(argv)
    from .kernels import doctor

    print(json.dumps(doctor(), indent=1))
    return 0


def _bench(argv):
    _interpret_on_cpu()
    from .bench.bench import main

    return main(argv)


def _attention(argv):
    """Run the kernel once against exact attention and print the error (and speed on a GPU)."""
    ap = argparse.ArgumentParser(prog="python -m comfy_sage attention", description=COMMANDS["attention"])
    ap.add_argument("--n", type=int, default=None, help="sequence length (default 4096 on GPU, 64 on CPU)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--pv", default="auto", choices=["auto", "fp16", "fp8", "fine", "int8"])
    args = ap.parse_args(argv)
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
    def run(argv):
        from .pipelines import cli

        return cli.main([command, *argv])

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
    return RUN[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
