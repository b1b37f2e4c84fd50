"""Which attention path ran, counted per call; each fallback reason is logged once per process."""
import logging
import sys
import threading
import types
from collections import Counter

log = logging.getLogger("comfy_sage")

# One store per process, not per module object: the pack can be imported under two names at once (ComfyUI loads
# it by folder as custom_nodes.<name>, scripts import comfy_sage), and the custom op registered by the first import
# serves both.
_store = sys.modules.setdefault("_comfy_sage_counters", types.ModuleType("_comfy_sage_counters"))
if not hasattr(_store, "calls"):
    _store.lock, _store.calls, _store.logged = threading.Lock(), Counter(), set()
if not hasattr(_store, "density"):
    _store.density = [0.0, 0]  # sum and number of sparse calls' densities since the last reset
_lock, _calls, _logged = _store.lock, _store.calls, _store.logged


def count(path: str, why: str | None = None) -> None:
    """Count one call of `path` (e.g. "int8-fp8pv", "sdpa:mask"); log `why` the first time a path is seen."""
    with _lock:
        _calls[path] += 1
        first = path not in _logged
        if first:
            _logged.add(path)
    if first and why:
        log.info("comfy_sage: %s (%s); further calls are counted, not logged", path, why)


def counters() -> dict[str, int]:
    """A copy of `{path: calls}` since the last reset."""
    with _lock:
        return dict(_calls)


def note_density(density: float) -> None:
    with _lock:
        _store.density[0] += float(density)
        _store.density[1] += 1


def sparse_density() -> float | None:
    """The mean density (share of (query, key) block pairs computed) of the sparse calls since the last reset, or
    None when there was none."""
    with _lock:
        total, n = _store.density
    return total / n if n else None


def reset_counters() -> None:
    with _lock:
        _calls.clear()
        _store.density[:] = [0.0, 0]
