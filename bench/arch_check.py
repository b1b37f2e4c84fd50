"""Offline arch check: compile every kernel config the arch table can run, for that arch, on a machine without a GPU.

`python bench/arch_check.py [--jobs N] [--arch sm89 ...] [--quick] [--out FILE]`: for each arch of kernels/_arch.py
(sm80, sm86, sm89, sm90, sm120), each head-dim bucket (32, 64, 128, 256), each P·V choice the arch allows (fp16,
fine, and fp8 where the entry has FP8 tensor cores) and causal/full, the attention kernel with exactly the tile
_api._forward picks (block_m, block_n, num_warps, num_stages, maxnreg; tensor descriptors where the tile says tma,
pointer loads elsewhere), and the quantization kernel with that tile's blocks (fp8_v for fp8, k_token for fine:
the combinations a call can make); on Triton 3.6 also the warp-specialized Gluon kernel where the sm90 table names
one (it imports only there). Each is compiled for the arch's own target with Triton's bundled ptxas and read back
with cuobjdump (bench/sass.py). Reports registers, stack (local memory: spills) and shared memory per config,
fails a config whose shared memory exceeds the arch's per-block opt-in limit or whose registers exceed 255, and
writes bench/results/arch-check-triton-<version>.json. Shared memory is the cubin's static shared (1 KB on sm90
and sm120) plus the dynamic shared Triton's metadata asks for: Triton's launcher grants dynamic shared up to the
opt-in limit less the static part, so the sum is what must fit.

Compiled as a call whose head dim is the bucket itself (D == DP, no padding masks), fp16 inputs and output,
without the LSE output, with the launcher's specialization of a contiguous call (bench/sass.py: pointers, padded
sizes and strides divisible by 16; head counts, token counts and the GQA group plain i32). Odd head dims (masked
loads; the pointer path where a tma tile's rows are not 16-byte multiples) are not compiled here.
`--sweep ARCH DIM PV --tile m,n,warps,stages[,maxnreg] ...` compiles candidate tiles for one table key instead.
"""
import argparse
import concurrent.futures as cf
import datetime
import json
import multiprocessing
import os
import sys
import time

ARCHS = ("sm80", "sm86", "sm89", "sm90", "sm120")
DIMS = (32, 64, 128, 256)
# Largest shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin): the SM's shared
# capacity less the 1 KB reserved for the system (CUDA programming guide, compute capabilities; CUTLASS's
# SMEM_CAPACITY_MAP carries the same numbers).
SHARED_LIMIT = {"sm80": 163 * 1024, "sm86": 99 * 1024, "sm89": 99 * 1024, "sm90": 227 * 1024, "sm120": 99 * 1024}
MAX_REGS = 255
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _sass():
    # bench/sass.py both as comfy_sage.bench.sass and as a script's neighbour (python bench/arch_check.py)
    try:
        from . import sass
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import sass
    return sass


def toolchain_missing():
    """Why this machine cannot compile for NVIDIA GPUs (no triton, no CUDA backend, no bundled ptxas or
    cuobjdump), or None."""
    try:
        import triton
        from triton.backends import backends
    except ImportError as e:
        return f"triton is not importable: {e}"
    if "nvidia" not in backends:
        return f"Triton {triton.__version__} has no CUDA backend"
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas", "cuobjdump"):
        if not os.access(os.path.join(tools, name), os.X_OK):
            return f"Triton {triton.__version__} has no bundled {name} ({tools})"
    return None


def ws_supported():
    """The warp-specialized Gluon kernel compiles only on the Triton it was written for (_attention_ws.py)."""
    import triton

    return triton.__version__.startswith("3.6.")


def configs(archs=ARCHS, ws=None):
    """Every compile the table can make: dicts naming the kernel and its parameters."""
    arch_table = _sass().kernel_module("_arch")
    quant_warps = _sass().kernel_module("_quant").quant_warps
    ws = ws_supported() if ws is None else ws
    out, quant_seen = [], set()
    for name in archs:
        entry = arch_table.ARCHES[name]
        cap = int(name[2:])
        for dp in DIMS:
            for pv in ("fp16", "fine") + (("fp8",) if entry.fp8 else ()):
                tile = entry.tiles[(dp, "fp16" if pv == "fine" else pv)]
                base = dict(arch=name, cap=cap, head_dim=dp, pv=pv, block_m=tile.block_m, block_n=tile.block_n)
                for causal in (False, True):
                    out.append(dict(base, kernel="attn", causal=causal, num_warps=tile.num_warps,
                                    num_stages=tile.num_stages, tma=tile.tma, maxnreg=tile.maxnreg))
                    if ws and tile.ws is not None and tile.tma and pv == "fp8" and not causal:
                        out.append(dict(base, kernel="attn_ws", causal=False, num_warps=4, consumers=tile.ws.consumers,
                                        ws_stages=tile.ws.stages, maxnreg=tile.ws.maxnreg))
                key = (name, dp, tile.block_m, tile.block_n, pv)
                if key not in quant_seen:
                    quant_seen.add(key)
                    out += [dict(base, kernel="quant", fp8_v=pv == "fp8", k_token=pv == "fine", lse=lse,
                                 num_warps=quant_warps(dp)) for lse in (False, True)]
    return out


def label(c):
    s = f"{c['kernel']} {c['arch']} hd{c['head_dim']} {c['pv']}"
    if c["kernel"] != "quant":
        s += " causal" if c["causal"] else " full"
    elif c.get("lse"):
        s += " lse"
    return s


def tile_text(c):
    if c["kernel"] == "quant":
        return f"({c['block_m']},{c['block_n']},{c['num_warps']})"
    if c["kernel"] == "attn_ws":
        return (f"({c['block_m']},{c['block_n']}) ws {c['consumers']}x4 warps +1, {c['ws_stages']} stages, "
                f"maxnreg {c['maxnreg']}")
    parts = [c["block_m"], c["block_n"], c["num_warps"], c["num_stages"]]
    parts += ["tma"] * c["tma"] + [c["maxnreg"]] * bool(c["maxnreg"])
    return "(" + ",".join(map(str, parts)) + ")"


def compile_one(c):
    """Compile one config (in a worker process) and return it with its resources, or with the error."""
    os.environ.pop("TRITON_INTERPRET", None)  # tests set it; the kernels must be real JIT functions here
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    sass = _sass()
    t0, cpu0 = time.perf_counter(), _cpu()
    try:
        if c["kernel"] == "attn":
            k = sass.compile_attention(
                sass.kernel_module("_attention")._attn_kernel, arch=c["cap"], D=c["head_dim"], block_m=c["block_m"],
                block_n=c["block_n"], fp8=c["pv"] == "fp8", causal=c["causal"], warps=c["num_warps"],
                stages=c["num_stages"], maxnreg=c["maxnreg"], k_token=c["pv"] == "fine", tma=c["tma"])
        elif c["kernel"] == "quant":
            k = sass.compile_quant(sass.kernel_module("_quant")._quant_kernel, arch=c["cap"], D=c["head_dim"],
                                   block_m=c["block_m"], block_n=c["block_n"], fp8_v=c["fp8_v"], k_token=c["k_token"],
                                   warps=c["num_warps"], lse=c.get("lse", False))
        else:
            ws = sass.kernel_module("_attention_ws")
            k = sass.compile_ws(ws._attn_ws_kernel, D=c["head_dim"], block_m=c["block_m"], block_n=c["block_n"],
                                consumers=c["consumers"], stages=c["ws_stages"], maxnreg=c["maxnreg"],
                                consumer_regs=ws.consumer_regs(c["consumers"], c["maxnreg"]))
        r = sass.resources(k)
    except Exception as e:  # reported per config: one failing compile must not hide the others
        r = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]}
    r["compile_s"] = round(time.perf_counter() - t0, 2)
    r["cpu_s"] = round(_cpu() - cpu0, 2)  # this process and its ptxas/cuobjdump: the cost without contention
    return dict(c, **r)


def _cpu():
    import resource

    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def check(r):
    """What is wrong with one result: a compile error, shared memory over the arch's limit, registers over 255."""
    if "error" in r:
        return [r["error"]]
    bad = []
    limit = SHARED_LIMIT[r["arch"]]
    if r["shared"] > limit:
        bad.append(f"shared {r['shared']} B > {limit} B")
    if r["regs"] > MAX_REGS:
        bad.append(f"{r['regs']} registers > {MAX_REGS}")
    return bad


def _pool_map(todo, jobs, log):
    results = [None] * len(todo)
    # spawn: each worker imports triton afresh (no forked compiler state), with TRITON_INTERPRET dropped
    with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futs = {pool.submit(compile_one, c): i for i, c in enumerate(todo)}
        for n, f in enumerate(cf.as_completed(futs), 1):
            r = results[futs[f]] = f.result()
            if log:
                log(f"[{n}/{len(todo)}] {_line(r)}")
    for r in results:
        r["problems"] = check(r)
    return results


def _report(results, archs, wall, jobs):
    import triton

    return {
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "wall_s": round(wall, 1),
        "cpu_s": round(sum(r["cpu_s"] for r in results), 1),
        "jobs": jobs,
        "limits": {"shared_bytes_per_block": {a: SHARED_LIMIT[a] for a in archs}, "registers_per_thread": MAX_REGS},
        "ptxas": _ptxas_versions(archs),
        "configs": results,
        "spills": [label(r) + " " + tile_text(r) + f": {r['stack']} B" for r in results if r.get("stack")],
        "problems": [label(r) + ": " + "; ".join(r["problems"]) for r in results if r["problems"]],
    }


def quick(c):
    """The subset the CPU test compiles by default (about half the compile time): every table key once, as
    causal attention (the same tile and shared buffers as full attention, plus the diagonal's masks), and the
    quantization kernel at head dim 256 only (its largest; at most 9 KB of shared memory anywhere)."""
    return c["kernel"] == "attn_ws" or (c["causal"] if c["kernel"] == "attn" else c["head_dim"] == 256)


def run(archs=ARCHS, jobs=None, ws=None, select=None, log=print):
    """Compile every config (those `select` keeps, if given) in `jobs` processes; returns the report dict
    (results in config order)."""
    todo = [c for c in configs(archs, ws) if select is None or select(c)]
    jobs = jobs or os.cpu_count() or 1
    t0 = time.perf_counter()
    results = _pool_map(todo, jobs, log)
    return _report(results, archs, time.perf_counter() - t0, jobs)


def sweep(arch, head_dim, pv, tiles, jobs=None, log=print):
    """Candidate tiles for one table key (pointer path): each (block_m, block_n, num_warps, num_stages[,
    maxnreg]) compiled for full and causal attention, with the quantization kernel its blocks need."""
    todo = []
    for t in tiles:
        bm, bn, w, st, mr = (list(t) + [None])[:5]
        base = dict(arch=arch, cap=int(arch[2:]), head_dim=head_dim, pv=pv, block_m=bm, block_n=bn)
        todo += [dict(base, kernel="attn", causal=c, num_warps=w, num_stages=st, tma=False, maxnreg=mr)
                 for c in (False, True)]
        todo.append(dict(base, kernel="quant", fp8_v=pv == "fp8", k_token=pv == "fine",
                         num_warps=_sass().kernel_module("_quant").quant_warps(head_dim)))
    jobs = jobs or os.cpu_count() or 1
    t0 = time.perf_counter()
    results = _pool_map(todo, jobs, log)
    return _report(results, (arch,), time.perf_counter() - t0, jobs)


def _line(r):
    if "error" in r:
        return f"{label(r)} {tile_text(r)}: ERROR {r['error']}"
    return (f"{label(r):32s} {tile_text(r):34s} regs {r['regs']:3d}  stack {r['stack']:4d} B  "
            f"shared {r['shared']:6d} B  ({r['compile_s']} s)")


def _ptxas_versions(archs):
    import subprocess

    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return {}
    out = {}
    for name in archs:
        try:
            text = subprocess.run([get_ptxas(int(name[2:])).path, "--version"], capture_output=True, text=True).stdout
            out[name] = text.strip().splitlines()[-1]
        except Exception as e:  # a report field, never a reason to fail
            out[name] = f"unknown ({e})"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    ap.add_argument("--arch", action="append", choices=ARCHS, help="only these arches (repeatable)")
    ap.add_argument("--out", help="JSON path (default bench/results/arch-check-triton-<version>.json)")
    ap.add_argument("--quick", action="store_true", help="the CPU test's subset (quick(): causal attention only)")
    ap.add_argument("--sweep", nargs=3, metavar=("ARCH", "DIM", "PV"),
                    help="compile the --tile candidates for one table key instead of the table")
    ap.add_argument("--tile", action="append", default=[], help="block_m,block_n,warps,stages[,maxnreg]")
    a = ap.parse_args(argv)
    why = toolchain_missing()
    if why:
        print(f"arch check skipped: {why}")
        return 0
    import triton

    if a.sweep:
        report = sweep(a.sweep[0], int(a.sweep[1]), a.sweep[2], [tuple(map(int, t.split(","))) for t in a.tile],
                       a.jobs)
    else:
        report = run(tuple(a.arch or ARCHS), a.jobs, select=quick if a.quick else None)
    out = a.out or os.path.join(RESULTS, f"arch-check-triton-{triton.__version__}.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(f"\n{len(report['configs'])} compiles in {report['wall_s']} s ({report['jobs']} processes, "
          f"{report['cpu_s']} CPU-s), Triton {report['triton']}: {out}")
    print("spills:" if report["spills"] else "no spills", *report["spills"], sep="\n  ")
    if report["problems"]:
        print("FAILED:", *report["problems"], sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
