"""Offline arch check: compile every kernel config the arch table can run, for that arch, on a machine without a GPU.

`python bench/arch_check.py [--jobs N] [--arch sm89 ...] [--dim 72 ...] [--quick] [--out FILE]`: for each arch of
kernels/_arch.py (sm80, sm86, sm89, sm90, sm120), each head dim of DIMS (the buckets 32, 64, 128, 256 and the
padded head dims real models use, 40, 72, 80, 96, 160: D < DP, masked loads), each P·V choice the arch allows
(fp16, fine, and fp8 where the entry has FP8 tensor cores) and causal/full, the attention kernel as a launch on
the installed Triton runs it: the tile _api._forward picks (block_m, block_n, num_warps, num_stages), through
tensor descriptors where the tile says tma and the launch can take them, else through pointer loads with the
tile's pointer_maxnreg (bench/sass.py launch_path(): a Triton without tensor descriptors, before 3.4, or int8 rows
that are not 16-byte multiples, _quant.row_bytes); the quantization kernel with that tile's blocks (fp8_v for fp8,
k_token for fine), with and without the LSE's q·kmean; a bf16 call with the LSE at head dim 128 (both kernels, each
P·V); the rope kernel (kernels/_rope.py) at head dims 128 (fp16, bf16) and 80 (bf16); the sparse selection kernel
(kernels/_sparse.py _select_kernel) with the blocks of the arch's sparse tile at head dim 128, for 64, 1024 and 8192
key blocks (SELECT_*); on Triton 3.6 also the warp-specialized Gluon kernel where the sm90 table names one (it
imports only there). Each is compiled for the arch's own target with Triton's bundled ptxas and read back with
cuobjdump (bench/sass.py, one code path for Triton 3.2 to 3.9). An arch the bundled ptxas cannot target is skipped
and named in the report (sm120 before Triton 3.3: ptxas 12.4). Reports registers, stack (local memory: spills) and
shared memory per config, fails a config that does not compile, whose shared memory exceeds the arch's per-block
opt-in limit or whose registers exceed 255, and writes bench/results/arch-check-triton-<version>.json. Shared memory
is the cubin's static shared (1 KB on sm90 and sm120) plus the dynamic shared Triton's metadata asks for: Triton's
launcher grants dynamic shared up to the opt-in limit less the static part, so the sum is what must fit.

Compiled with the launcher's specialization of the calls the pack's integrations make (bench/sass.py _divisible:
pointers, padded token counts and the token strides of head-split [B, N, H·D] inputs divisible by 16, strides that
are multiples of D too where D is a multiple of 16; head counts, token counts and the GQA group plain i32), fp16
inputs and output without the LSE output but for the bf16 case. Spills are reported, not failed: spills
the kernels must not have are asserted per Triton in tests/test_arch_check.py.
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
BUCKETS = (32, 64, 128, 256)
# Head dims between the buckets that real models use (SD 1.x: 40, 80, 160; PixArt: 72; 96), padded to the next
# bucket: masked loads, and on sm90 the pointer path where int8 rows of D bytes are not 16-byte multiples (40, 72)
PADDED = (40, 72, 80, 96, 160)
DIMS = tuple(sorted(BUCKETS + PADDED))
SPARSE_DIMS = (64, 128)  # the block-sparse kernel (_sparse.py): video models' head dims
BF16_DIM = 128  # the bf16 call (with the LSE): fp16 and bf16 differ in the loads, casts and the 16-bit P·V MMA
# the rope kernel: Wan's head dim 128, and 80, whose rows of 40 words give head strides not divisible by 16
ROPE = ((128, "fp16"), (128, "bf16"), (80, "bf16"))
# the sparse selection kernel (_sparse._select_kernel): the blocks of each arch's sparse tile at this head dim (its
# sparse_pv entry); key blocks 64 (16 query tiles a program, 4 warps), 1024 (4 tiles, 8 warps) and 8192, the most
# it takes (_sparse.MAX_KEY_BLOCKS: one tile of 8192 scores, 8 warps, 32 a thread); self-attention full and causal,
# and cross-attention (Nq != Nk: no diagonal blocks forced); the ratio mode (a block count as budget instead of the
# mass) only at 8192 full self-attention, where registers are tightest. The sink is 1, what every call passes, and
# H (heads a launch covers) 1 where the shape makes it so (select_heads): the constexprs Triton's launcher makes of 1s
SELECT_DIM = 128
SELECT_KEY_BLOCKS = (64, 1024, 8192)
SELECT_CASES = ((False, True, False), (True, True, False), (False, False, False))  # (causal, self, by_ratio)
SELECT_RATIO = (8192, (False, True, True))
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
    """Whether this Triton's Gluon compiles the warp-specialized kernel (_attention_ws.COMPILES_ON; Triton 3.2 has
    no Gluon to import)."""
    try:
        ws = _sass().kernel_module("_attention_ws")
    except ImportError:
        return False
    import triton

    return triton.__version__.startswith(ws.COMPILES_ON)


def unsupported(arch):
    """Why the bundled ptxas cannot compile for `arch` (sm120 before Triton 3.3: ptxas 12.4 predates it), or None.
    Such a pair never runs: a PyTorch for that GPU brings a newer Triton."""
    targets = _sass().ptxas_targets(int(arch[2:]))
    if targets is None or f"sm_{arch[2:]}" in targets:
        return None
    return f"the ptxas of this Triton ({_ptxas_version(int(arch[2:]))}) has no sm_{arch[2:]} target"


KERNELS = ("attn", "attn_ws", "quant", "rope", "select")


def quant_config(base, entry, pv):
    """The quantization launch that a call on `pv` makes under `base`'s tile and head dim (_api._kernel)."""
    dp = base["bucket"]
    return dict(base, kernel="quant", fp8_v=pv == "fp8", k_token=pv == "fine", int8_v=pv == "int8",
                num_warps=_sass().kernel_module("_quant").quant_warps(dp), maxnreg=entry.quant_cap(dp))


def configs(archs=ARCHS, ws=None, dims=DIMS):
    """Every compile the table can make: dicts naming the kernel and its parameters."""
    sass = _sass()
    arch_table = sass.kernel_module("_arch")
    ws = ws_supported() if ws is None else ws
    out = []
    for name in archs:
        entry = arch_table.ARCHES[name]
        cap = int(name[2:])
        for D in dims:
            dp = arch_table.head_dim_bucket(D)
            for pv in ("fp16", "fine", "int8") + (("fp8",) if entry.fp8 else ()):
                tile = entry.tiles[(dp, "fp16" if pv == "fine" else pv)]
                tma, maxnreg = sass.launch_path(tile, D)
                base = dict(arch=name, cap=cap, head_dim=D, bucket=dp, pv=pv, block_m=tile.block_m,
                            block_n=tile.block_n, dtype="fp16", lse=False)
                attn = dict(base, kernel="attn", num_warps=tile.num_warps, num_stages=tile.num_stages, tma=tma,
                            maxnreg=maxnreg, tile_tma=tile.tma, tile_maxnreg=tile.maxnreg)
                quant = quant_config(base, entry, pv)
                for causal in (False, True):
                    out.append(dict(attn, causal=causal))
                    if D in SPARSE_DIMS and pv == entry.sparse_pv:  # the block-sparse variant sparse calls run
                        out.append(dict(attn, causal=causal, sparse=True))
                    # as _api._warp_specialized picks it: FP8 or FP16 P·V, an unpadded head dim, a tma tile, causal
                    # calls where the tile says so
                    if (ws and tile.ws is not None and tile.tma and pv in ("fp8", "fp16") and D == dp
                            and (tile.ws.causal or not causal)):
                        out.append(dict(base, kernel="attn_ws", causal=causal, num_warps=4, consumers=tile.ws.consumers,
                                        ws_stages=tile.ws.stages, maxnreg=tile.ws.maxnreg,
                                        ctas=sass.kernel_module("_attention_ws").cluster(tile.ws.ctas, causal)))
                out += [dict(quant, lse=lse) for lse in (False, True)]
                if D == BF16_DIM:  # a bf16 call that returns the LSE
                    out += [dict(attn, causal=False, dtype="bf16", lse=True), dict(quant, dtype="bf16", lse=True)]
        out += [dict(arch=name, cap=cap, head_dim=D, bucket=D, kernel="rope", dtype=dt, num_warps=4)
                for D, dt in ROPE if D in dims]
        if SELECT_DIM in dims:
            tile = entry.tiles[(arch_table.head_dim_bucket(SELECT_DIM), entry.sparse_pv)]
            for nkb, (causal, self_attn, by_ratio) in [(n, c) for n in SELECT_KEY_BLOCKS for c in SELECT_CASES] + [
                    SELECT_RATIO]:
                nkb_p, rows, warps = sass.select_launch(nkb)
                out.append(dict(arch=name, cap=cap, head_dim=SELECT_DIM, bucket=SELECT_DIM, kernel="select",
                                sparse_pv=entry.sparse_pv, block_m=tile.block_m, block_n=tile.block_n, nkb=nkb_p,
                                rows=rows, num_warps=warps, causal=causal, self_attn=self_attn, by_ratio=by_ratio,
                                sink=1, heads=select_heads(nkb, tile, self_attn)))
    return out


def select_heads(nkb, tile, self_attn):
    """H of _sparse.select's launch where a shape fixes it: 1 where a chunk of scores (_sparse.CHUNK_BYTES) holds one
    head even at batch 1, as self-attention at nkb key blocks does (query tiles of tile.block_m over the same
    tokens); else None (any count). At 8192 key blocks that is every self-attention launch from 4097 blocks up."""
    if not self_attn:
        return None
    nqb = -(-nkb * tile.block_n // tile.block_m)
    return 1 if _sass().kernel_module("_sparse").CHUNK_BYTES // (nqb * nkb * 8) <= 1 else None


def label(c):
    s = f"{c['kernel']} {c['arch']} hd{c['head_dim']}"
    if c["kernel"] == "rope":
        return f"{s} {c['dtype']}"
    if c["kernel"] == "select":
        return (f"select {c['arch']} nkb{c['nkb']} {'causal' if c['causal'] else 'full'} "
                f"{'self' if c['self_attn'] else 'cross'}" + " ratio" * c["by_ratio"])
    s += f" {c['pv']}"
    if c["kernel"] != "quant":
        s += " causal" if c["causal"] else " full"
    if c.get("sparse"):
        s += " sparse"
    if c.get("dtype", "fp16") != "fp16":
        s += f" {c['dtype']}"
    return s + " lse" * bool(c.get("lse"))


def tile_text(c):
    if c["kernel"] == "rope":
        return f"({c['num_warps']} warps)"
    if c["kernel"] == "select":  # the sparse tile's blocks at head dim SELECT_DIM
        return (f"({c['block_m']},{c['block_n']}) rows {c['rows']}, {c['num_warps']} warps"
                + " H=1" * (c.get("heads") == 1))
    if c["kernel"] == "quant":
        cap = f" maxnreg {c['maxnreg']}" if c.get("maxnreg") else ""
        return f"({c['block_m']},{c['block_n']},{c['num_warps']}){cap}"
    if c["kernel"] == "attn_ws":
        return (f"({c['block_m']},{c['block_n']}) ws {c['consumers']}x4 warps +1, {c['ws_stages']} stages, "
                f"maxnreg {c['maxnreg']}" + (f", {c['ctas']}-CTA clusters" if c.get("ctas", 1) > 1 else ""))
    parts = [c["block_m"], c["block_n"], c["num_warps"], c["num_stages"]]
    parts += ["tma"] * c["tma"] + [c["maxnreg"]] * bool(c["maxnreg"])
    s = "(" + ",".join(map(str, parts)) + ")"
    if c.get("tile_tma") and not c["tma"]:  # the launch's fallback from the tile's tensor descriptors
        s += " pointers, tile " + ",".join(["tma"] + [str(c["tile_maxnreg"])] * bool(c.get("tile_maxnreg")))
    return s


def compile_one(c):
    """Compile one config (in a worker process) and return it with its resources, or with the error."""
    os.environ.pop("TRITON_INTERPRET", None)  # tests set it; the kernels must be real JIT functions here
    sass = _sass()
    t0, cpu0 = time.perf_counter(), _cpu()
    try:
        if c["kernel"] == "attn":
            k = sass.compile_attention(
                sass.kernel_module("_attention")._attn_kernel, arch=c["cap"], D=c["head_dim"], block_m=c["block_m"],
                block_n=c["block_n"], fp8=c["pv"] == "fp8", causal=c["causal"], warps=c["num_warps"],
                stages=c["num_stages"], maxnreg=c["maxnreg"], k_token=c["pv"] == "fine", tma=c["tma"],
                store_lse=c.get("lse", False), dtype=c.get("dtype", "fp16"), int8=c["pv"] == "int8",
                sparse=c.get("sparse", False))
        elif c["kernel"] == "quant":
            k = sass.compile_quant(sass.kernel_module("_quant")._quant_kernel, arch=c["cap"], D=c["head_dim"],
                                   block_m=c["block_m"], block_n=c["block_n"], fp8_v=c["fp8_v"], k_token=c["k_token"],
                                   warps=c["num_warps"], lse=c.get("lse", False), dtype=c.get("dtype", "fp16"),
                                   int8_v=c.get("int8_v", False), maxnreg=c.get("maxnreg"))
        elif c["kernel"] == "rope":
            k = sass.compile_rope(sass.kernel_module("_rope")._rotate_kernel, arch=c["cap"], D=c["head_dim"],
                                  dtype=c["dtype"])
        elif c["kernel"] == "select":
            k = sass.compile_select(sass.kernel_module("_sparse")._select_kernel, arch=c["cap"], block_m=c["block_m"],
                                    block_n=c["block_n"], nkb=c["nkb"], causal=c["causal"], self_attn=c["self_attn"],
                                    by_ratio=c["by_ratio"], sink=c.get("sink", 1), heads=c.get("heads"))
        else:
            ws = sass.kernel_module("_attention_ws")
            k = sass.compile_ws(ws._attn_ws_kernel, D=c["head_dim"], block_m=c["block_m"], block_n=c["block_n"],
                                consumers=c["consumers"], stages=c["ws_stages"], maxnreg=c["maxnreg"],
                                consumer_regs=ws.consumer_regs(c["consumers"], c["maxnreg"]), pv16=c["pv"] == "fp16",
                                causal=c["causal"], ctas=c.get("ctas", 1))
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


def _report(results, archs, wall, jobs, skipped=None):
    import triton

    compiled = [a for a in archs if a not in (skipped or {})]
    return {
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "wall_s": round(wall, 1),
        "cpu_s": round(sum(r["cpu_s"] for r in results), 1),
        "jobs": jobs,
        "tensor_descriptors": _sass().compat().has_tensor_descriptors(),
        "skipped": skipped or {},
        "limits": {"shared_bytes_per_block": {a: SHARED_LIMIT[a] for a in archs}, "registers_per_thread": MAX_REGS},
        "ptxas": {a: _ptxas_version(int(a[2:])) for a in compiled},
        "configs": results,
        "spills": [label(r) + " " + tile_text(r) + f": {r['stack']} B" for r in results if r.get("stack")],
        "problems": [label(r) + ": " + "; ".join(r["problems"]) for r in results if r["problems"]],
    }


# The CPU test's default subset: its head dims (each bucket, and of the padded ones 72: masked loads in the
# largest pointer-path bucket, the pointer path on sm90's bulk-copy tiles, strides that are not multiples of 16)
QUICK_DIMS = (32, 64, 72, 128, 256)


def quick(c):
    """The subset the CPU test compiles by default (about a quarter of the compile time): causal attention at
    QUICK_DIMS (every table key once: the same tile and shared buffers as full attention, plus the diagonal's
    masks), the bf16 call, the quantization kernel at head dim 256 only (its largest; at most 17 KB of shared
    memory and 128 registers anywhere), the rope kernel, the Gluon kernel, and the sparse selection kernel at 8192
    key blocks (every case: one tile of 8192 scores, the most registers) and at 64 (full self-attention: 16 tiles a
    program on 4 warps)."""
    if c["kernel"] in ("attn_ws", "rope") or c.get("dtype") == "bf16":
        return True
    if c["kernel"] == "select":
        return c["nkb"] == max(SELECT_KEY_BLOCKS) or (c["nkb"] == min(SELECT_KEY_BLOCKS) and not c["causal"]
                                                       and c["self_attn"] and not c["by_ratio"])
    if c["kernel"] == "attn":
        return c["causal"] and c["head_dim"] in QUICK_DIMS
    return c["head_dim"] == 256


def run(archs=ARCHS, jobs=None, ws=None, select=None, log=print, dims=DIMS):
    """Compile every config (those `select` keeps, if given) in `jobs` processes for the arches this Triton's
    ptxas can target; returns the report dict (results in config order, the arches skipped and why)."""
    skipped = {a: why for a in archs for why in [unsupported(a)] if why}
    if log:
        for a, why in skipped.items():
            log(f"{a} skipped: {why}")
    todo = [c for c in configs(tuple(a for a in archs if a not in skipped), ws, dims)
            if select is None or select(c)]
    jobs = jobs or os.cpu_count() or 1
    t0 = time.perf_counter()
    results = _pool_map(todo, jobs, log)
    return _report(results, archs, time.perf_counter() - t0, jobs, skipped)


def sweep(arch, head_dim, pv, tiles, jobs=None, log=print):
    """Candidate tiles for one table key (pointer path): each (block_m, block_n, num_warps, num_stages[,
    maxnreg]) compiled for full and causal attention, with the quantization kernel its blocks need."""
    sass = _sass()
    dp = sass.head_dim_bucket(head_dim)
    todo = []
    for t in tiles:
        bm, bn, w, st, mr = (list(t) + [None])[:5]
        base = dict(arch=arch, cap=int(arch[2:]), head_dim=head_dim, bucket=dp, pv=pv, block_m=bm, block_n=bn,
                    dtype="fp16", lse=False)
        todo += [dict(base, kernel="attn", causal=c, num_warps=w, num_stages=st, tma=False, maxnreg=mr)
                 for c in (False, True)]
        todo.append(quant_config(base, sass.kernel_module("_arch").ARCHES[arch], pv))
    jobs = jobs or os.cpu_count() or 1
    t0 = time.perf_counter()
    results = _pool_map(todo, jobs, log)
    return _report(results, (arch,), time.perf_counter() - t0, jobs)


def merged(path, new, kernels):
    """The report at `path` with its rows of `kernels` replaced by `new`'s where `new` compiled the same config (a
    new config is appended; a row of a kernel, arch and head dim that `new` compiled but not with that config is
    gone from the table, and dropped; other rows, e.g. other arches, stay), its totals recomputed and the merge
    recorded: a kernel that changed, recompiled alone."""
    with open(path) as f:
        old = json.load(f)
    if old["triton"] != new["triton"]:
        raise SystemExit(f"{path} was compiled with Triton {old['triton']}, this is {new['triton']}")
    fresh = {label(r) + tile_text(r): r for r in new["configs"]}
    covered = {(r["kernel"], r["arch"], r["head_dim"]) for r in new["configs"]}
    rows = [fresh.pop(label(r) + tile_text(r), None if (r["kernel"], r["arch"], r["head_dim"]) in covered else r)
            if r["kernel"] in kernels else r for r in old["configs"]]
    rows = [r for r in rows if r is not None] + list(fresh.values())
    report = _report(rows, tuple(old["limits"]["shared_bytes_per_block"]), old["wall_s"], old["jobs"], old["skipped"])
    report.update({k: old[k] for k in ("date", "note") if k in old}, merged=old.get("merged", []) + [
        {"kernels": sorted(kernels), "date": new["date"], "configs": len(new["configs"]), "wall_s": new["wall_s"]}])
    return report


def _line(r):
    if "error" in r:
        return f"{label(r)} {tile_text(r)}: ERROR {r['error']}"
    return (f"{label(r):36s} {tile_text(r):34s} regs {r['regs']:3d}  stack {r['stack']:4d} B  "
            f"shared {r['shared']:6d} B  ({r['compile_s']} s)")


def _ptxas_version(cap):
    import subprocess

    try:
        text = subprocess.run([_sass().ptxas(cap), "--version"], capture_output=True, text=True).stdout
        return text.strip().splitlines()[-1]
    except Exception as e:  # a report field, never a reason to fail
        return f"unknown ({e})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    ap.add_argument("--arch", action="append", choices=ARCHS, help="only these arches (repeatable)")
    ap.add_argument("--dim", type=int, action="append", choices=DIMS, help="only these head dims (repeatable)")
    ap.add_argument("--out", help="JSON path (default bench/results/arch-check-triton-<version>.json)")
    ap.add_argument("--quick", action="store_true", help="the CPU test's default subset (quick())")
    ap.add_argument("--sweep", nargs=3, metavar=("ARCH", "DIM", "PV"),
                    help="compile the --tile candidates for one table key instead of the table")
    ap.add_argument("--tile", action="append", default=[], help="block_m,block_n,warps,stages[,maxnreg]")
    ap.add_argument("--kernel", action="append", choices=KERNELS, help="only these kernels (repeatable)")
    ap.add_argument("--merge", action="store_true",
                    help="with --kernel: put the new rows in place of those kernels' rows of the report at --out")
    a = ap.parse_args(argv)
    if a.merge and not a.kernel:
        ap.error("--merge replaces the rows of the kernels --kernel names")
    why = toolchain_missing()
    if why:
        print(f"arch check skipped: {why}")
        return 0
    import triton

    if a.sweep:
        report = sweep(a.sweep[0], int(a.sweep[1]), a.sweep[2], [tuple(map(int, t.split(","))) for t in a.tile],
                       a.jobs)
    else:
        kernels = set(a.kernel or KERNELS)
        report = run(tuple(a.arch or ARCHS), a.jobs, dims=tuple(a.dim or DIMS),
                     select=lambda c: c["kernel"] in kernels and (not a.quick or quick(c)))
    out = a.out or os.path.join(RESULTS, f"arch-check-triton-{triton.__version__}.json")
    if a.merge:
        report = merged(out, report, a.kernel)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    for arch, why in report["skipped"].items():
        print(f"{arch} skipped: {why}")
    print(f"\n{len(report['configs'])} compiles in {report['wall_s']} s ({report['jobs']} processes, "
          f"{report['cpu_s']} CPU-s), Triton {report['triton']}: {out}")
    print("spills:" if report["spills"] else "no spills", *report["spills"], sep="\n  ")
    if report["problems"]:
        print("FAILED:", *report["problems"], sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
