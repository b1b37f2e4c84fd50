"""bench/clocks.py: what the grid records beside each timing (the clock and power the H200's cap sets)."""
import itertools
import time

from comfy_sage.bench import bench, clocks


def test_parse_reads_nvidia_smi_lines():
    assert clocks.parse("1755, 690.12, 0x0000000000000004\n") == (1755, 690.12, "0x0000000000000004")
    assert clocks.parse("1980, [N/A], 0x0000000000000000") == (1980, None, "0x0000000000000000")
    assert clocks.parse("") is None
    assert clocks.parse("No devices were found") is None


def test_summary_takes_medians_and_the_reasons_seen():
    readings = itertools.cycle([(1700, 690.0, "0x4"), (1760, 695.0, "0x4"), (1980, None, "0x0")])
    with clocks.Clocks(period=0.001, reader=lambda i: next(readings)) as c:
        while len(c.rows) < 3:
            time.sleep(0.001)
    s = c.summary()
    assert s["samples"] >= 3
    assert s["mhz"] in (1700, 1760, 1980) and s["watts"] in (690.0, 695.0)
    assert s["reasons"] == ["0x0", "0x4"]


def test_no_reader_gives_empty_readings():
    with clocks.Clocks(period=0.001, reader=lambda i: None) as c:
        time.sleep(0.01)
    assert c.summary() == dict(mhz=None, watts=None, reasons=[], samples=0)
    assert clocks.Clocks().summary()["samples"] == 0  # never entered


def test_grid_rows_print_methods_not_clocks():
    row = dict(B=1, H=8, N=1024, D=64, causal=False, sage_fp16pv=500.0,
               clocks={"sage_fp16pv": dict(mhz=1755, watts=690.0, reasons=["0x4"], samples=3)})
    line = bench._fmt(row)
    assert "sage_fp16pv=500.0" in line and "clocks" not in line
