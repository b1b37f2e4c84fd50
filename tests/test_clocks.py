"""bench/clocks.py: what the grid records beside each timing (the clock and power the H200's cap sets)."""
import itertools
import time

from comfy_sage.bench import bench, clocks


def test_parse_reads_nvidia_smi_lines():
    assert clocks.parse("1755, 690.12, 0x0000000000000004\n") == (1755, 690.12, "0x0000000000000004")
    assert clocks.parse("1980, [N/A], 0x0000000000000000") == (1980, None, "0x0000000000000000")
    assert clocks.parse("") is None
    assert clocks.parse("No devices were found") is None


def test_summary_keeps_the_loaded_samples():
    c = clocks.Clocks()
    c.rows = [(1980, 120.0, "0x0"), (1700, 690.0, "0x4"), (1760, 695.0, "0x4"), (1740, 680.0, "0x4"),
              (1980, None, "0x0"), (1980, 125.0, "0x0")]
    assert c.summary() == dict(mhz=1740, watts=695.0, reasons=["0x4"], samples="3/6")
    c.rows = [(1980, None, "0x0"), (1800, None, "0x4"), (1900, None, "0x4")]  # no power reported: every sample
    assert c.summary() == dict(mhz=1900, watts=None, reasons=["0x0", "0x4"], samples="3/3")


def test_sampling_runs_until_the_block_ends():
    readings = itertools.cycle([(1700, 690.0, "0x4"), (1760, 695.0, "0x4")])
    with clocks.Clocks(period=0.001, reader=lambda i: next(readings)) as c:
        while len(c.rows) < 4:
            time.sleep(0.001)
    n = len(c.rows)
    time.sleep(0.01)
    assert len(c.rows) == n and c.summary()["mhz"] in (1700, 1760)


def test_no_reader_gives_empty_readings():
    with clocks.Clocks(period=0.001, reader=lambda i: None) as c:
        time.sleep(0.01)
    assert c.summary() == dict(mhz=None, watts=None, reasons=[], samples="0/0")
    assert clocks.Clocks().summary()["samples"] == "0/0"  # never entered


def test_grid_rows_print_methods_not_clocks():
    row = dict(B=1, H=8, N=1024, D=64, causal=False, sage_fp16pv=500.0,
               clocks={"sage_fp16pv": dict(mhz=1755, watts=690.0, reasons=["0x4"], samples="3/5")})
    line = bench._fmt(row)
    assert "sage_fp16pv=500.0" in line and "clocks" not in line
