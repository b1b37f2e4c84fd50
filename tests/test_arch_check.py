"""The offline arch check (bench/arch_check.py) on CPU: every kernel config compiled for every arch of the table with
Triton's bundled ptxas, as a launch on the installed Triton runs it; shared memory within each arch's per-block
opt-in limit and registers within 255.

By default the check's `quick` subset; COMFY_SAGE_ARCH_CHECK=full compiles every config. Costs with a cold Triton
cache on two cores (CPU-seconds: the compiles' own cost; wall times on a shared machine, other jobs running): quick,
Triton 3.9: 132 compiles, 313 CPU-s, 2 min 53 s; Triton 3.2: 102 compiles (no sm120, no Gluon), 359 CPU-s, 6 min
40 s. Full, Triton 3.9: 509 compiles, 1376 CPU-s, 12 min 48 s; Triton 3.2: 392 compiles, 1223 CPU-s, 26 min 35 s
(contended). Since then pv="int8" and the sparse kernel added 210 compiles to the full check (719 on 3.9), and the
sparse selection kernel 50 more (10 an arch, 1-4 CPU-s each; 25 of them in quick: 212 on 3.9). Runs in a subprocess:
tests/conftest.py sets TRITON_INTERPRET=1, under which Triton's decorators make interpreter functions that do not
compile.

Which Tritons the spill assertions hold on: the compile limits (shared memory, 255 registers) are asserted on every
Triton, as they decide whether a launch works at all. Spills only cost speed, and the tiles were chosen and
measured on Tritons with tensor descriptors (3.4+: 3.6 on the lent GPUs, 3.9 in CI), so the spill-free claims the
table's comments rest on are asserted there only. Triton 3.2 is another compiler for these kernels: every sm90
tile takes the pointer path, and every attention config with fp16 or FP8 P·V spills (72-1424 B a thread in
bench/results/arch-check-triton-3.2.0.json, against at most 256 B anywhere on 3.9). There the test bounds the worst
stack by SPILL_CAP_3_2, which catches a kernel change making 3.2 much worse without claiming 3.2 runs the tuned
kernels as measured. (Triton 3.3, also without tensor descriptors, is not measured.) The sparse selection kernel
holds no spill on every Triton but the ones SELECT_SPILLS names."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import arch_check  # noqa: E402
import sass  # noqa: E402

FULL = os.environ.get("COMFY_SAGE_ARCH_CHECK") == "full"


def _has_descriptors():
    return sass.compat().has_tensor_descriptors()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    why = arch_check.toolchain_missing()
    if why:
        pytest.skip(f"cannot compile for NVIDIA GPUs here: {why}")
    out = tmp_path_factory.mktemp("arch") / "arch-check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "bench", "arch_check.py"), "--out", str(out)]
    proc = subprocess.run(cmd + ([] if FULL else ["--quick"]), env=env, capture_output=True, text=True,
                          timeout=3600)
    if not out.exists():
        pytest.fail(f"arch check wrote no report (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text()), proc


def _attn(rep, **kw):
    return [r for r in rep["configs"] if r["kernel"] == "attn" and all(r.get(k) == v for k, v in kw.items())]


def test_limits(report):
    rep, proc = report
    assert not rep["problems"], "\n".join(rep["problems"])
    assert proc.returncode == 0, proc.stdout[-4000:]
    for r in rep["configs"]:
        assert r["shared"] <= arch_check.SHARED_LIMIT[r["arch"]] and r["regs"] <= 255, r


def test_skips_only_what_never_runs(report):
    """An arch is skipped only where the bundled ptxas cannot target it: sm120 before Triton 3.3 (ptxas 12.4;
    a PyTorch for RTX 50xx brings Triton 3.3+)."""
    rep, _ = report
    import triton

    old = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3)
    assert set(rep["skipped"]) == ({"sm120"} if old else set()), rep["skipped"]


def test_every_table_key_compiled(report):
    rep, _ = report
    table = sass.kernel_module("_arch").ARCHES
    archs = [a for a in arch_check.ARCHS if a not in rep["skipped"]]
    dims = arch_check.DIMS if FULL else arch_check.QUICK_DIMS
    want = {(a, d, pv) for a in archs for d in dims
            for pv in ("fp16", "fine", "int8") + (("fp8",) if table[a].fp8 else ())}
    assert {(r["arch"], r["head_dim"], r["pv"]) for r in _attn(rep)} == want
    assert {(r["arch"], r["pv"]) for r in _attn(rep, dtype="bf16", lse=True)} == {(a, pv) for a, _, pv in want}
    quant = {(r["arch"], r["head_dim"], r["pv"], r["lse"]) for r in rep["configs"] if r["kernel"] == "quant"}
    assert {(a, 256, pv, lse) for a, _, pv in want for lse in (False, True)} <= quant
    assert {(r["arch"], r["head_dim"], r["dtype"]) for r in rep["configs"] if r["kernel"] == "rope"} == {
        (a, d, dt) for a in archs for d, dt in arch_check.ROPE}
    if arch_check.ws_supported():
        assert [r for r in rep["configs"] if r["kernel"] == "attn_ws"]


def test_select_configs_follow_the_sparse_launch(report):
    """The sparse selection kernel on every arch: with the blocks of the arch's sparse tile (its sparse_pv entry at
    head dim SELECT_DIM, as _api._kernel passes them to _sparse.select), at the most key blocks the kernel takes
    (_sparse.MAX_KEY_BLOCKS: one tile of 8192 scores a program) in every case, and at the fewest."""
    rep, _ = report
    table = sass.kernel_module("_arch").ARCHES
    assert max(arch_check.SELECT_KEY_BLOCKS) == sass.kernel_module("_sparse").MAX_KEY_BLOCKS
    rows = [r for r in rep["configs"] if r["kernel"] == "select"]
    archs = [a for a in arch_check.ARCHS if a not in rep["skipped"]]
    assert {r["arch"] for r in rows} == set(archs)
    for r in rows:
        tile = table[r["arch"]].tiles[(sass.head_dim_bucket(arch_check.SELECT_DIM), table[r["arch"]].sparse_pv)]
        assert (r["block_m"], r["block_n"]) == (tile.block_m, tile.block_n), arch_check.label(r)
        assert (r["nkb"], r["rows"], r["num_warps"]) == sass.select_launch(r["nkb"]), arch_check.label(r)
    cases = set(arch_check.SELECT_CASES) | {arch_check.SELECT_RATIO[1]}
    for a in archs:
        assert {(r["causal"], r["self_attn"], r["by_ratio"]) for r in rows
                if r["arch"] == a and r["nkb"] == max(arch_check.SELECT_KEY_BLOCKS)} == cases, a
        assert min(arch_check.SELECT_KEY_BLOCKS) in {r["nkb"] for r in rows if r["arch"] == a}, a
    if FULL:
        assert len(rows) == len(archs) * (len(arch_check.SELECT_KEY_BLOCKS) * len(arch_check.SELECT_CASES) + 1)


def test_select_launch_mirrors_sparse_select(monkeypatch):
    """bench/sass.py select_launch() and compile_select's argument types against what _sparse.select really
    launches: NKB, ROWS (the grid's first axis), num_warps, CAUSAL/SELF/BY_RATIO, fp32 scores and int32 lut and
    counts, scale and share as floats, up to _sparse.MAX_KEY_BLOCKS key blocks (of 16 keys here); the sink (1) and,
    where arch_check.select_heads says so, the chunk's head count H as the 1s the check compiles as constexprs (the
    chunk made smaller so that H=1 is met at these sizes; CPU tensors take the kernel's path, as under the
    interpreter)."""
    sp = sass.kernel_module("_sparse")
    monkeypatch.setattr(sp, "CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(sp._arch, "arch_of", lambda device: sp._arch.ARCHES["interpret"])
    launched, one_head = [], 0

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append((grid, args, kw))

    monkeypatch.setattr(sp, "_select_kernel", Kernel())
    bm, bn = 1024, 16  # few query tiles: the scores of 8192 key blocks stay small
    for nkb in (1, 3, 64, 100, 256, 257, 1024, 3000, sp.MAX_KEY_BLOCKS):
        for causal, self_attn, by_ratio in arch_check.SELECT_CASES + (arch_check.SELECT_RATIO[1],):
            nq = nkb * bn if self_attn else 5 * bm
            q, k = torch.zeros(1, 2, nq, 8), torch.zeros(1, 2, nkb * bn, 8)
            sparsity = sp.Sparsity(ratio=0.5) if by_ratio else sp.Sparsity(keep=0.9)
            sp.select(q, k, block_m=bm, block_n=bn, causal=causal, scale=0.1, sparsity=sparsity)
            grid, args, kw = launched.pop()
            NKB, rows, warps = sass.select_launch(nkb)
            assert (kw["NKB"], kw["ROWS"], kw["num_warps"]) == (NKB, rows, warps), nkb
            nqb = -(-nq // bm)
            assert grid[0] == -(-nqb // rows)
            assert (kw["CAUSAL"], kw["SELF"], kw["BY_RATIO"]) == (causal, self_attn, by_ratio)
            assert (kw["BLOCK_M"], kw["BLOCK_N"]) == (bm, bn)
            assert [a.dtype for a in args[:3]] == [torch.float32, torch.int32, torch.int32]
            assert [type(a) for a in args[8:11]] == [float, float, int]  # scale, share (fp32), sink
            assert all(type(a) is int for a in args[3:8] + args[11:])
            assert args[10] == 1  # sink
            if arch_check.select_heads(nkb, types.SimpleNamespace(block_m=bm, block_n=bn), self_attn) == 1:
                assert args[3] == 1, (nkb, causal, self_attn)  # H
                one_head += 1
    assert one_head


def test_launch_path_mirrors_attention_launch(monkeypatch):
    """bench/sass.py launch_path() (what the check compiles) against what _attention.attention really launches, for
    every tile of the table and head dim of the check: tensor descriptors or pointers, and the register cap."""
    att = sass.kernel_module("_attention")
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append(kw)

    monkeypatch.setattr(att, "_attn_kernel", Kernel())
    table = sass.kernel_module("_arch")
    seen = set()
    for name in arch_check.ARCHS:
        for D in arch_check.DIMS:
            dp = table.head_dim_bucket(D)
            for pv in ("fp16", "fp8", "int8"):
                tile = table.ARCHES[name].tiles[(dp, pv)]
                if (tile, D, pv) in seen:
                    continue
                seen.add((tile, D, pv))
                B, H, N = 1, 2, 2 * tile.block_n
                ds = sass.kernel_module("_quant").row_bytes(D)
                qz = types.SimpleNamespace(
                    q8=torch.zeros(B, H, N, ds, dtype=torch.int8), qs=torch.zeros(B, H, N),
                    k8=torch.zeros(B, H, N, ds, dtype=torch.int8), ks=torch.zeros(B, H, N),
                    v8=torch.zeros(B, H, D, N, dtype=torch.int8 if pv == "int8" else torch.float8_e4m3fn),
                    vs=torch.zeros(B, H, dp), vc=torch.zeros(B, H, N, D, dtype=torch.int16))
                v = torch.zeros(B, H, N, D, dtype=torch.float16)
                att.attention(qz, v, torch.empty_like(v), None, dims=(B, H, H, N, N, D, dp), block_m=tile.block_m,
                              block_n=tile.block_n, causal=False, fp8_v=pv == "fp8", num_warps=tile.num_warps,
                              num_stages=tile.num_stages, tma=tile.tma, maxnreg=tile.maxnreg,
                              pointer_maxnreg=tile.pointer_maxnreg, int8_v=pv == "int8", k_token=pv == "int8")
                kw = launched.pop()
                assert (kw["USE_TMA"], kw.get("maxnreg")) == sass.launch_path(tile, D), (name, D, pv)
    # both sides of the fallback were met: sm90's bulk-copy tiles at head dim 40 (unpadded 40-byte rows) always,
    # and at 16-byte rows with descriptors where this Triton has them
    bulk = table.Tile(64, 128, 4, 2, True, 168)
    assert any(not sass.launch_path(bulk, D)[0] for D in arch_check.DIMS)
    assert any(sass.launch_path(bulk, D)[0] for D in arch_check.DIMS) == _has_descriptors()


def test_sm90_bulk_copy_tiles_follow_the_launch(report):
    """sm90's tma tiles: through tensor descriptors with the tile's register cap where the launch can take them,
    else pointer loads with the tile's pointer cap (Triton < 3.4: every head dim; otherwise rows that stay
    unpadded at a size that is no 16-byte multiple: head dim 40)."""
    rep, _ = report
    rows = [r for r in _attn(rep, arch="sm90") if r["tile_tma"]]
    assert rows
    for r in rows:
        use = _has_descriptors() and sass.kernel_module("_quant").row_bytes(r["head_dim"]) % 16 == 0
        tile = sass.kernel_module("_arch").ARCHES["sm90"].tiles[(r["bucket"], "fp16" if r["pv"] == "fine" else r["pv"])]
        want = (True, tile.maxnreg) if use else (False, tile.pointer_maxnreg)
        assert (r["tma"], r["maxnreg"]) == want, arch_check.label(r)


def _spills(rows):
    return [(arch_check.label(r), r["stack"]) for r in rows if r["stack"]]


def _int8_tiles_checked():
    """The INT8 P·V path's tiles and the rotation's width were chosen from Triton 3.9's compiles: on 3.6 three
    rotating quantization configs spill 8 B (sm80/86/89 hd80 fp16), on 3.2 rotating ones (every pv but fp8)
    40-320 B (sm80 with the LSE at head dims 40-128, sm90 int8 at 80-96; bench/results/arch-check-*, kernel v14)."""
    return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9)


# The quantization pass under the arch table's register cap (quant_maxnreg, sm90 hd128): Triton 3.9 spills 16-24 B
# there (3.6 none), and the capped pass still ran 0.64x the uncapped one's time (H200, bench/NOTES.md)
CAPPED_QUANT_SPILL = 32


def _capped_quant(r):
    return r["kernel"] == "quant" and bool(r.get("maxnreg"))


def test_quant_and_rope_never_spill(report):
    """On every Triton: the quantization kernel (8 warps from head dim 128, _quant.quant_warps) and rope; the
    quantization that rotates q and k on the tensor cores (every pv but fp8: _quant.rotation_for) where its choices
    were made (_int8_tiles_checked; elsewhere bounded like every other spill). Capped builds within
    CAPPED_QUANT_SPILL."""
    rep, _ = report
    rows = [r for r in rep["configs"] if r["kernel"] == "rope"
            or (r["kernel"] == "quant" and (_int8_tiles_checked() or r["pv"] == "fp8"))]
    assert rows and not _spills([r for r in rows if not _capped_quant(r)])
    capped = [r for r in rows if _capped_quant(r)]
    assert all(r["stack"] <= CAPPED_QUANT_SPILL for r in capped), _spills(capped)


@pytest.mark.skipif(not _has_descriptors(), reason="tiles tuned on Tritons with tensor descriptors (docstring)")
def test_no_spill_hd256_fp8_on_mma_sync_fp8_arches(report):
    """sm89/sm120 at head dim 256 with FP8 P·V spilled 240-1432 B with 64-key blocks; the table takes 32. Also at
    head dim 160, which runs the same tile masked."""
    rep, _ = report
    rows = [r for a in ("sm89", "sm120") for d in (160, 256) for r in _attn(rep, arch=a, head_dim=d, pv="fp8")]
    assert rows and not _spills(rows)


# Triton 3.2: the largest stack any config may have (worst in the report: 1424 B, sm90 hd72 fp16 causal)
SPILL_CAP_3_2 = 2048


@pytest.mark.skipif(_has_descriptors(), reason="the bound for Tritons without tensor descriptors")
def test_spills_bounded_without_descriptors(report):
    rep, _ = report
    assert max(r["stack"] for r in rep["configs"]) <= SPILL_CAP_3_2, _spills(rep["configs"])


# Spills of the sparse selection kernel per Triton (major.minor): label -> bytes a thread. Triton 3.6's ptxas keeps
# cross-attention at 64 key blocks (16 query tiles, 4 warps) on sm86/sm89 to 64 registers and spills 8 B (3.9: 72
# registers and 3.2: 80, no spill; bench/results has no report of it yet).
SELECT_SPILLS = {"3.6": {"select sm86 nkb64 full cross": 8, "select sm89 nkb64 full cross": 8}}


def test_select_never_spills(report):
    """The sparse selection kernel (one program's ROWS x NKB scores in registers, 32 a thread at 8192 key blocks on
    8 warps) on every Triton: no spill but those SELECT_SPILLS names, at most as large."""
    rep, _ = report
    rows = [r for r in rep["configs"] if r["kernel"] == "select"]
    known = SELECT_SPILLS.get(".".join(triton.__version__.split(".")[:2]), {})
    assert rows
    assert all(stack <= known.get(name, 0) for name, stack in _spills(rows)), _spills(rows)


@pytest.mark.skipif(not _int8_tiles_checked(), reason="int8 tiles chosen from Triton 3.9's compiles")
def test_int8_pv_never_spills(report):
    """pv="int8" on every arch: the tiles its table entries name were chosen so that nothing spills (the 4-warp
    Ampere tile spilled 8-40 B at head dims 32-64, 128-wide Hadamard blocks 272-736 B in the quantization kernel);
    the capped quantization builds are bounded in test_quant_and_rope_never_spill."""
    rep, _ = report
    rows = [r for r in rep["configs"] if r.get("pv") == "int8" and not _capped_quant(r)]
    assert rows and not _spills(rows)


def test_merge_replaces_only_the_named_kernels_rows(report, tmp_path):
    # `--kernel K --merge`: a changed kernel recompiled alone into a committed report (bench/results)
    rep, _ = report
    out = tmp_path / "merged.json"
    stale = [dict(r, regs=0, stale=True) if r["kernel"] == "rope" and r["arch"] == "sm80" else r
             for r in rep["configs"]]
    out.write_text(json.dumps(dict(rep, configs=stale)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "bench", "arch_check.py"), "--out", str(out), "--arch", "sm80",
           "--kernel", "rope", "--merge", "--jobs", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = json.loads(out.read_text())
    assert len(got["configs"]) == len(rep["configs"])
    rope = [r for r in got["configs"] if r["kernel"] == "rope" and r["arch"] == "sm80"]
    assert rope and all(r["regs"] > 0 and "stale" not in r for r in rope)
    assert [r for r in got["configs"] if r not in rope] == [r for r in rep["configs"] if not (
        r["kernel"] == "rope" and r["arch"] == "sm80")]
    assert got["merged"][-1]["kernels"] == ["rope"] and got["merged"][-1]["configs"] == len(rope)


def test_merge_drops_configs_the_table_no_longer_makes(tmp_path):
    """A kernel recompiled alone (--kernel K --merge): its rows for the arches and head dims the new run covered are
    the new run's (a config whose label changed replaces the old one, not beside it); other rows stay."""
    row = dict(kernel="attn_ws", arch="sm90", cap=90, head_dim=128, bucket=128, pv="fp16", causal=False, block_m=64,
               block_n=128, dtype="fp16", lse=False, num_warps=4, consumers=3, ws_stages=2, maxnreg=128, regs=128,
               stack=0, shared=1000, compile_s=1.0, cpu_s=1.0, problems=[])
    other = dict(row, head_dim=64, bucket=64)
    quant = dict(row, kernel="quant", fp8_v=False, k_token=False, int8_v=False)
    old = arch_check._report([row, other, quant], ("sm90",), 1.0, 1)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(old))
    new = arch_check._report([dict(row, ctas=2)], ("sm90",), 1.0, 1)
    rows = arch_check.merged(str(path), new, {"attn_ws"})["configs"]
    assert [(r["kernel"], r["head_dim"], r.get("ctas", 1)) for r in rows] == [("attn_ws", 64, 1), ("quant", 128, 1),
                                                                            ("attn_ws", 128, 2)]
