"""One config table per GPU arch: which P·V precision `pv="auto"` takes, block shapes, and where SDPA is faster.

Numbers for sm90 come from bench/ runs on the lent H100 and H200 (see bench/NOTES.md); the other arches carry the
same shapes scaled to their shared memory until measured there.
"""
import dataclasses
import functools
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WarpSpec:
    """The warp-specialized sm90 kernel (_attention_ws.py): a producer warp and `consumers` warpgroups of the
    tile's block_m rows each, `stages` K/V buffers, `maxnreg` registers per thread of the CTA's pool; `causal`:
    causal calls run it too (else the Triton kernel); `ctas`: CTAs a cluster in full attention, K and V copied
    once for all of them (multicast, Triton 3.9+: _attention_ws.cluster)."""
    consumers: int
    stages: int
    maxnreg: int
    causal: bool = False
    ctas: int = 1


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False  # tiles through tensor descriptors (sm90+)
    maxnreg: int | None = None  # register cap per thread: 168 lets three 4-warp CTAs share an SM
    ws: WarpSpec | None = None  # FP8 or FP16 P·V at exactly this head dim runs _attention_ws.py
    # the cap where a tma tile runs pointer loads instead (no tensor descriptors before Triton 3.4; int8 rows that
    # are not 16-byte multiples): capped as for bulk copies, head dim 40 spilled and ran at 0.58x (FP16 P·V)
    pointer_maxnreg: int | None = None


@dataclass(frozen=True)
class ArchEntry:
    name: str
    fp8: bool                 # FP8 e4m3 tensor cores (sm89+)
    pv_auto: str              # what pv="auto" runs
    why: str                  # one line for `doctor` and README
    tiles: dict = field(default_factory=dict)  # (padded head dim, pv) -> Tile
    # sage_sdpa keeps SDPA below this many (query, key) pairs per head: launch and quantization overhead win there.
    min_pairs: int = 0
    pv_by: dict = field(default_factory=dict)  # (padded head dim, causal) -> pv, where it differs from pv_auto
    # pv_by holds only for calls the warp-specialized kernel runs (unpadded head dims, _attention_ws.usable()): it
    # was measured with that kernel
    pv_by_ws: bool = False
    min_pairs_by: dict = field(default_factory=dict)  # (padded head dim, causal) -> pairs, where not min_pairs
    # ... and for the calls pv_by routes (its path crosses SDPA elsewhere), where they differ
    pv_by_min_pairs: dict = field(default_factory=dict)
    # ... and below this many pairs summed over batch and heads: too few query tiles to fill the GPU's waves
    min_total_pairs: int = 0
    # the P·V path of sparse calls (_sparse.py): sparsity adds its own error, so they take an accurate path
    sparse_pv: str = "int8"
    # the P·V paths fastest first, as calibration tries them after pv_auto (measured on sm90, datasheets elsewhere)
    pv_order: tuple = ("int8", "fp8", "fp16", "fine")
    quant_maxnreg: dict = field(default_factory=dict)  # padded head dim -> register cap of the quantization pass

    def pv_by_holds(self, head_dim: int) -> bool:
        """Whether pv_by (and pv_by_min_pairs) apply to this head dim on this machine."""
        return not self.pv_by_ws or (head_dim == head_dim_bucket(head_dim) and ws_usable())

    def quant_cap(self, bucket: int) -> int | None:
        """quant_maxnreg at this padded head dim on this Triton: none before 3.4 (no tensor descriptors), whose
        compiler spills 288-976 B a thread under it where the pass rotates q and k (sm90, offline)."""
        from ._compat import has_tensor_descriptors

        return self.quant_maxnreg.get(bucket) if has_tensor_descriptors() else None

    def pv_for(self, head_dim: int, causal: bool = False) -> str:
        if not self.pv_by_holds(head_dim):
            return self.pv_auto
        return self.pv_by.get((head_dim_bucket(head_dim), bool(causal)), self.pv_auto)

    def sdpa_below(self, head_dim: int, causal: bool) -> int:
        key = (head_dim_bucket(head_dim), bool(causal))
        if key in self.pv_by_min_pairs and self.pv_by_holds(head_dim):
            return self.pv_by_min_pairs[key]
        return self.min_pairs_by.get(key, self.min_pairs)

    def with_threshold(self, pairs: int = 0) -> "ArchEntry":
        """This entry with every sage_sdpa threshold at `pairs` per head and none over batch and heads (tests and
        runs of small models, where the 8-bit path must run)."""
        return dataclasses.replace(self, min_pairs=pairs, min_pairs_by={}, pv_by_min_pairs={}, min_total_pairs=0)


NEVER = 1 << 62  # a pair count no call reaches: sage_sdpa keeps SDPA


def _tiles(big: Tile, small: Tile, wide: Tile) -> dict:
    return {(d, pv): (wide if d == 256 else big if d >= 128 else small)
            for d in (32, 64, 128, 256) for pv in ("fp16", "fp8", "int8")}


_AMPERE = _tiles(Tile(128, 64, 8, 2), Tile(128, 64, 4, 3), Tile(64, 64, 8, 2))
# INT8 P·V on the mma.sync arches: 8 warps of 16 query rows at every head dim up to 128 (the 4-warp tile spilled
# 8-40 B at 255 registers at head dims 32-64) and 32-key blocks at 256 (64 spilled 8-24 B); none spill
# (bench/arch_check.py). Not yet timed on these GPUs.
_AMPERE.update({(d, "int8"): Tile(128, 64, 8, 2) for d in (32, 64, 128)})
_AMPERE[(256, "int8")] = Tile(64, 32, 8, 2)
# sm89 and sm120 (FP8 through mma.sync, 99 KB of shared memory): Ampere's tiles, but FP8 P·V at head dim 256 takes
# 32-key blocks; with 64 it spills 240-1432 B a thread at 255 registers, 32 spills nothing (bench/arch_check.py).
_ADA = {**_AMPERE, (256, "fp8"): Tile(64, 32, 8, 2)}
# sm90, from the tile sweeps in bench/NOTES.md (H100, N=16384): one warpgroup per 64 query rows, 128-key blocks
# through the bulk-copy engine, registers capped so that three (head dim 128) or four (head dim <= 64) CTAs share
# an SM and one CTA's softmax overlaps another's MMAs.
_HOPPER = {(d, pv): Tile(64, 64, 8, 2) for d in (256,) for pv in ("fp16", "fp8", "int8")}
# FP8 full attention at head dim 128: one producer warp and three consumer warpgroups per CTA (twelve consumer
# warps per SM, as three CTAs of the Triton kernel), three K/V stages: 7-10% over it on the H200 (bench/NOTES.md,
# v9). At head dim 64 it measured 4% slower than the Triton kernel's four CTAs per SM: not used there.
# On pointer loads the FP8 tile keeps its cap: 765 TOPS against 715 uncapped (H200, hd128, N=16k; v9.1 in NOTES).
# FP16 P·V at head dims 64 and 128: the same kernel with two stages (v11, H200 at N=32k: 786 / 551 TOPS against
# the Triton kernel's 625 / 489; three stages, two consumers, FlashAttention-3's in-warpgroup overlap and a lazy
# rescale all measured slower), causal calls too (v12, H200, N=8k-32k: 1.14-1.21x the Triton kernel at head dim
# 128, 0.98-1.08x at 64). FP8 causal stays on the Triton kernel (the warp-specialized one: 0.93-0.98x at 128).
# Head dim 128, full attention: clusters of two CTAs share each K/V copy (Triton 3.9), half the L2 -> shared
# traffic: under the 700 W cap the clock rises 30-45 MHz, FP16 P·V +1-2%, FP8 +2-3% (H200, v15 in NOTES); at head
# dim 64 (below the cap) 1.4% slower: one CTA.
_HOPPER.update({(128, "fp8"): Tile(64, 128, 4, 2, True, 168, WarpSpec(3, 3, 128, ctas=2), pointer_maxnreg=168),
                (128, "fp16"): Tile(64, 128, 4, 2, True, ws=WarpSpec(3, 2, 128, causal=True, ctas=2))})
_HOPPER.update({(d, "fp8"): Tile(64, 128, 4, 3, True, 128) for d in (32, 64)})
_HOPPER.update({(d, "fp16"): Tile(64, 128, 4, 2, True, 128, WarpSpec(3, 2, 128, causal=True) if d == 64 else None)
                for d in (32, 64)})
# INT8 P·V (pv="int8"): the FP8 tiles without the warp-specialized kernel or a register cap (capped at 168, head
# dim 128 spilled 280 B), until measured on the H200
_HOPPER.update({(d, "int8"): dataclasses.replace(_HOPPER[(d, "fp8")], ws=None, maxnreg=None, pointer_maxnreg=None)
                for d in (32, 64, 128)})

# INT8 P·V on sm86/89/120 is chosen from datasheets and compiled code, not timed on those cards (bench/NOTES.md,
# v10): their INT8 tensor cores run at 2x FP8-with-FP32-accumulate (RTX 40xx/50xx) and 4x FP16-with-FP32-accumulate
# (RTX 30xx); the loop's extra instructions (int32 -> fp32 per key block) cost less than that. A100's FP16 runs at
# full rate with FP32 accumulation, so INT8's 2x does not repay them there (predicted ~0.8x): FP16 P·V stays.
ARCHES = {
    "sm80": ArchEntry("sm80", False, "fp16", "A100: no FP8 tensor cores; INT8 Q·K + FP16 P·V (INT8 P·V predicted "
                      "~0.8x: FP16 accumulates in FP32 at full rate here)", _AMPERE, 1 << 22, sparse_pv="fp16",
                      pv_order=("fp16", "fine", "int8")),
    "sm86": ArchEntry("sm86", False, "int8", "RTX 30xx: INT8 P·V (4x FP16-with-FP32-accumulate's rate; by "
                      "datasheet, not measured)", _AMPERE, 1 << 22, pv_order=("int8", "fp16", "fine")),
    "sm89": ArchEntry("sm89", True, "int8", "RTX 40xx: INT8 P·V (2x the rate of FP8 with FP32 accumulation; by "
                      "datasheet, not measured)", _ADA, 1 << 22),
    "sm90": ArchEntry("sm90", True, "fp8", "H100/H200: head dims 64 and 128 (full and causal) take FP16 P·V "
                      "with rotated q and k in the warp-specialized kernel (relative L1 0.010-0.011 against FP8's "
                      "0.037, at 0.89-0.95x FP8's speed, H200); FP8 P·V at other head dims and where that kernel is "
                      "off (a Triton other than 3.6 or 3.9), where FP16 P·V runs the slower Triton kernel", _HOPPER,
                      8192 * 8192,
                      # crossovers with cuDNN in the H200 grid (bench/results): full attention gains from N=4096
                      # with FP8 P·V (kernel v7; v12: 490 against 439 at hd64), causal from N=8192; with FP16 P·V
                      # (pv_by) full attention from N=8192 at head dims 64/128 (v11: 596 / 441 TOPS against
                      # cuDNN's 636 / 451 at 4096, 674 / 498 against 601 / 443 at 8192), causal from 8192, but
                      # from 16384 at head dim 64 (v12: 419 against cuDNN's 437 at 8192, 472 against 447 at 16384)
                      min_pairs_by={(128, False): 4096 * 4096, (64, False): 4096 * 4096, (32, False): 4096 * 4096,
                                    # head dim 256 (64x64 tiles, no bulk copies): 342 TOPS against cuDNN's 641 at
                                    # N=16k (H200, v9.1): sage_sdpa keeps SDPA at every length
                                    (256, False): NEVER, (256, True): NEVER},
                      pv_by_min_pairs={(128, False): 8192 * 8192, (64, False): 8192 * 8192,
                                       (64, True): 16384 * 16384},
                      # H200, head dim 128, full: 24 heads x 4608² (Flux at 1024²) and 40 x 4096² measured slower
                      # or even in 8-bit, 24 x 6144² and 48 x 4608² (>= 9e8 pairs) 7-10% faster
                      min_total_pairs=700_000_000,
                      # H200, Wan 720p shape at 15% density: FP16 P·V 37 ms, INT8 46 ms (bench/NOTES.md, v10), and
                      # FP8's own error (0.031-0.038) leaves no room for sparsity's under 0.03
                      sparse_pv="fp16",
                      # H200 hd128 N=32k: fp8 854, fp16 611, fine 573, int8 477 TOPS (bench/results, v10)
                      pv_order=("fp8", "fp16", "fine", "int8"),
                      # H200, v11 grid (bench/results): FP16 P·V in the warp-specialized kernel, rotated q and k,
                      # meets every accuracy target of issue 14 at 0.88-0.93x FP8 (1.01-1.04x SageAttention 2 at
                      # N=8k-16k, 0.96x at 32k); causal too from v12 (0.90-0.94x FP8 from N=8192, 0.99-1.13x
                      # SageAttention 2). Where that kernel does not run, FP16 P·V is the Triton kernel's (hd128
                      # 32k: 583-626 TOPS, cuDNN's speed, against FP8's 790-800 in v8): auto stays FP8 there.
                      pv_by={(d, c): "fp16" for d in (64, 128) for c in (False, True)}, pv_by_ws=True,
                      # the rotation takes the 8-warp pass to 134 registers at head dim 128: over 128, one program
                      # an SM instead of two. Capped, the pass ran 0.64-0.68x the time and auto's call 0.6-1.5%
                      # faster from N=8k (H200; Triton 3.6: no spill, 3.9: 16-24 B and 1.3-2.6%). Not on sm80-120:
                      # there the cap spills 96-152 B in the launch with the LSE (offline), not measurable here.
                      quant_maxnreg={128: 128}),
    "sm120": ArchEntry("sm120", True, "int8", "RTX 50xx: INT8 P·V (2x the rate of FP8 with FP32 accumulation; by "
                       "datasheet, not measured)", _ADA, 1 << 22),
    # TRITON_INTERPRET=1 on CPU tensors: the same kernels run in numpy; small tiles keep tests fast.
    "interpret": ArchEntry("interpret", True, "fp8", "Triton interpreter on CPU (tests)",
                           _tiles(Tile(32, 32, 4, 1), Tile(32, 32, 4, 1), Tile(16, 32, 4, 1)), 0, sparse_pv="fp16",
                           pv_order=("fp8", "fp16", "fine", "int8")),
}


def bulk_copyable(t) -> bool:
    """Whether sm90's bulk-copy engine (tensor descriptors) can read this [B, H, N, D] view in place: 16-byte
    aligned base and strides (the last dim contiguous)."""
    es = t.element_size()
    return t.data_ptr() % 16 == 0 and not any(s * es % 16 for s in t.stride()[:3])


def ws_usable() -> bool:
    """Whether the warp-specialized sm90 kernel may run here (_attention_ws.usable(); False where this Triton's Gluon
    does not import)."""
    ws = _ws_module()
    return ws is not None and ws.usable()


@functools.cache
def _ws_module():
    try:
        from . import _attention_ws
    except Exception:  # noqa: BLE001 - a Triton without Gluon, or with another Gluon API
        return None
    return _attention_ws


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def arch_of(device) -> ArchEntry | None:
    """The table entry for a device, or None where the INT8 kernel does not apply (old GPUs, CPU without the
    interpreter)."""
    if device.type == "cpu":
        return ARCHES["interpret"] if interpreting() else None
    if device.type != "cuda":
        return None
    index = device.index
    if index is None:
        import torch

        index = torch.cuda.current_device()
    key = _cuda_arch_key(index)
    return ARCHES[key] if key else None


@functools.cache
def _cuda_arch_key(index) -> str | None:
    # cached: sage_sdpa asks on every call, and its fallback must cost no more than SDPA's own dispatch (the key,
    # not the entry, so that a patched table is seen)
    import torch

    if torch.version.hip:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return None
    key = f"sm{major}{minor}"
    if key in ARCHES:
        return key
    if major >= 12:
        return "sm120"
    if major >= 9:
        return "sm90"
    return "sm89" if minor >= 9 else "sm86"


def head_dim_bucket(d: int) -> int:
    return max(32, 1 << (d - 1).bit_length())


def doctor() -> dict:
    """What this machine has and which kernel path it gets, and why."""
    import torch

    info = {"torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
        info["triton_support"] = _triton_support(triton.__version__)
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["capability"] = "sm%d%d" % torch.cuda.get_device_capability(dev)
        if info["triton"] is not None:
            from ._compat import ptxas_release

            major, minor = torch.cuda.get_device_capability(dev)
            info["ptxas"] = ptxas_release(10 * major + minor)
        entry = arch_of(dev)
    else:
        info["gpu"] = None
        dev = torch.device("cpu")
        entry = arch_of(dev)
    if info["triton"] is None:
        info["path"], info["why"] = "sdpa", "triton is not installed: every call falls back to SDPA"
    elif entry is None:
        info["path"] = "sdpa"
        info["why"] = ("no CUDA GPU: sage_sdpa falls back to SDPA (set TRITON_INTERPRET=1 to run the kernels on CPU)"
                       if dev.type == "cpu" else "GPU older than sm80 (no INT8 tensor-core path): SDPA")
    else:
        info["arch"] = entry.name
        info["path"] = f"int8-{entry.pv_auto}pv"
        by_dim = {f"{d}{' causal' if c else ' full'}": f"int8-{pv}pv" for (d, c), pv in entry.pv_by.items()
                  if entry.pv_by_holds(d)}
        if by_dim:
            info["path_by_head_dim"] = by_dim
        info["why"] = entry.why
        info["sdpa_below_pairs"] = entry.min_pairs
        if entry.min_total_pairs:
            info["sdpa_below_pairs_over_batch_and_heads"] = entry.min_total_pairs
        ws_dims = {(pv, causal): sorted(d for (d, p), t in entry.tiles.items()
                                        if t.ws is not None and p == pv and (t.ws.causal or not causal))
                   for pv in ("fp8", "fp16") for causal in (False, True)}
        if any(ws_dims.values()):
            clusters = sorted({d for (d, p), t in entry.tiles.items() if t.ws is not None and t.ws.ctas > 1})
            info["warp_specialized"] = _ws_status(ws_dims, clusters)
        below = {}
        for d, c in {**entry.min_pairs_by, **entry.pv_by_min_pairs}:  # as this machine routes those calls
            n = entry.sdpa_below(d, c)
            below[f"{d}{'-causal' if c else ''}"] = "always" if n == NEVER else n
        if below:
            info["sdpa_below_pairs_by_head_dim_causal"] = below
    from . import _fallback

    # what failed in this process (each such config runs exact SDPA); empty in a fresh `doctor` run
    info["kernel_failures"] = _fallback.failures()
    return info


def _triton_support(version: str) -> str:
    from ._compat import TESTED_TRITON, has_tensor_descriptors

    major_minor = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    if major_minor < TESTED_TRITON[0]:
        return "older than Triton 3.2: the kernels may not compile; each config that fails runs exact SDPA"
    note = "" if has_tensor_descriptors() else "; no tensor descriptors (before 3.4): sm90 tiles use pointer loads"
    if major_minor > TESTED_TRITON[1]:
        return f"newer than the Triton 3.9 we tested: a config that fails to compile runs exact SDPA{note}"
    return f"tested (Triton 3.2-3.9){note}"


def _ws_status(dims, clusters=()) -> str:
    try:
        from . import _attention_ws
    except (ImportError, AttributeError) as e:
        return f"off: this Triton has no usable Gluon ({e})"
    if _attention_ws.usable():
        on = "on: " + "; ".join(f"{pv.upper()} P·V {'causal' if causal else 'full'} at head dim "
                                f"{', '.join(map(str, d))}" for (pv, causal), d in dims.items() if d)
        if clusters:
            on += (f"; full attention at head dim {', '.join(map(str, clusters))} in 2-CTA clusters sharing K and V"
                   if _attention_ws.MULTICAST else
                   "; one CTA a cluster (K and V multicast needs Triton 3.9's Gluon)")
        return on
    return (f"off: {_attention_ws.ENV}=0" if os.environ.get(_attention_ws.ENV) == "0" else
            f"off: measured with Triton {', '.join(v + 'x' for v in _attention_ws.TESTED_TRITON)} "
            f"({_attention_ws.ENV}=1 turns it on)")
