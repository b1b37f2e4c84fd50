"""Which attention path ran, counted per call; each fallback reason is logged once per process."""
import logging
import threading
from collections import Counter

log = logging.getLogger("comfy_sage")
_lock = threading.Lock()
_calls: Counter = Counter()
_logged: set = set()


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


def reset_counters() -> None:
    with _lock:
        _calls.clear()
