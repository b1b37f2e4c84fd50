"""`python -m comfy_sage {video,image,attention,doctor,bench} ...`"""
import argparse
import json
import sys


def _doctor(argv):
    from .kernels import doctor

    print(json.dumps(doctor(), indent=1))
    return 0


def _bench(argv):
    from .bench.bench import main

    return main(argv)


def _attention(argv):
    """Run the kernel once against exact attention and print the error (and speed on a GPU)."""
    import os

    ap = argparse.ArgumentParser(prog="python -m comfy_sage attention")
    ap.add_argument("--n", type=int, default=None, help="sequence length (default 4096 on GPU, 64 on CPU)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--pv", default="auto", choices=["auto", "fp16", "fp8"])
    args = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the real kernels, run by Triton's interpreter
    from .kernels import counters, sage_attention
    import torch.nn.functional as F

    dev = "cuda" if cuda else "cpu"
    n = args.n or (4096 if cuda else 64)
    q, k, v = (torch.randn(1, 4, n, args.head_dim, device=dev, dtype=torch.float16) for _ in range(3))
    out = sage_attention(q, k, v, pv=args.pv)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    rel = ((out.float() - ref).abs().sum() / ref.abs().sum()).item()
    print(f"sage_attention on {dev} ({'GPU' if cuda else 'Triton interpreter'}), N={n}, D={args.head_dim}: "
          f"relative L1 vs fp32 = {rel:.4f}; paths {counters()}")
    return 0


COMMANDS = {"doctor": _doctor, "bench": _bench, "attention": _attention}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from .pipelines import cli
    except ImportError:
        cli = None
    commands = dict(COMMANDS)
    if cli is not None:
        commands["video"] = lambda a: cli.main(["video", *a])
        commands["image"] = lambda a: cli.main(["image", *a])
    if not argv or argv[0] not in commands:
        print(f"usage: python -m comfy_sage {{{','.join(commands)}}} [options]\n{__doc__}", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
