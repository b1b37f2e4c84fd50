"""The SM clock, board power and clock-event reasons that nvidia-smi reads while a timing runs.

Under sustained attention the lent H200 sits at its 700 W cap and each kernel settles at its own clock (FP16 P·V
1.71-1.76 GHz, FP8 P·V 1.88-1.95 at head dim 128: bench/NOTES.md, session 13), so a TOPS figure means little
without the clock it ran at. Where nvidia-smi is missing (CPU machines) the readings are simply empty."""
import subprocess
import threading

QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"


def read(index=0):
    """One reading: (SM MHz, watts or None, reasons bit mask as nvidia-smi prints it), or None."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-i", str(index)],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse(out)


def parse(line):
    f = [x.strip() for x in line.split(",")]
    if len(f) != 3 or not f[0].isdigit():
        return None
    try:
        watts = float(f[1])
    except ValueError:  # "[N/A]" on boards that do not report power
        watts = None
    return int(f[0]), watts, f[2]


class Clocks:
    """`with Clocks(index) as c:` samples every `period` seconds on a thread until the block ends;
    `c.summary()` gives the medians and the set of reasons seen."""

    def __init__(self, index=0, period=0.05, reader=read):
        self.index, self.period, self.reader, self.rows = index, period, reader, []

    def __enter__(self):
        self.stop = threading.Event()

        def sample():
            while not self.stop.is_set():
                r = self.reader(self.index)
                if r is None:  # no nvidia-smi, or it cannot read this board: stop asking
                    return
                self.rows.append(r)
                self.stop.wait(self.period)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def summary(self):
        """Over the loaded samples (power within 80% of the highest seen; all where the board reports none): the
        median clock, the highest power, the reasons. A timing's block also holds compilation and idle gaps,
        whose readings (1980 MHz at ~120 W on the H200) would otherwise be the median."""
        top = max((r[1] for r in self.rows if r[1] is not None), default=None)
        rows = [r for r in self.rows if top is None or (r[1] is not None and r[1] >= 0.8 * top)]
        mhz = sorted(r[0] for r in rows)
        return dict(mhz=mhz[len(mhz) // 2] if mhz else None, watts=top, reasons=sorted({r[2] for r in rows}),
                    samples=f"{len(rows)}/{len(self.rows)}")
