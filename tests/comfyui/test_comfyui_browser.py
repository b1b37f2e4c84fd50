"""Each workflow loaded through ComfyUI's real UI (comfyui-frontend-package) in Debian's headless chromium driven by
Playwright: no node type reported missing, and the pack's nodes render with their widgets."""
import json
import os
import shutil
from pathlib import Path

import pytest

import conftest as C

CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
playwright = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip("Debian chromium is not installed (apt-get install chromium)", allow_module_level=True)

WORKFLOWS = sorted((C.REPO / "workflows").glob("*.json"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(comfy_server, tmp_path_factory):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        pg.goto(comfy_server["url"], wait_until="domcontentloaded")
        pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120000)
        pg.wait_for_timeout(2000)
        pg.keyboard.press("Escape")  # the template browser opens on first start
        yield pg
        browser.close()


EXPECTED = {
    "ApplySageAttention": ["enabled", "pv", "print_summary"],
    "SageAttentionStepSchedule": ["steps", "exact_steps"],
    "SageAttentionBlockSchedule": ["blocks", "exact_blocks", "attention"],
}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_in_ui(page, path, tmp_path):
    wf = json.loads(path.read_text())
    page.evaluate("() => document.querySelectorAll('.p-toast-message').forEach(e => e.remove())")
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
    page.wait_for_timeout(1000)
    got = page.evaluate("""() => {
        const nodes = window.app.graph._nodes || window.app.graph.nodes;
        return nodes.map(n => ({type: n.type, registered: !!LiteGraph.registered_node_types[n.type],
                                 widgets: (n.widgets || []).map(w => [w.name, w.value]),
                                 missing: !!(n.has_errors || n.constructor?.nodeData === undefined)}));
    }""")
    assert len(got) == len(wf["nodes"])
    unregistered = [g["type"] for g in got if not g["registered"]]
    assert not unregistered, f"missing node types in the UI: {unregistered}"
    body = page.inner_text("body").lower()
    assert "missing node types" not in body and "the following node types were not found" not in body
    assert "invalid workflow" not in body, body[:2000]
    for g in got:
        if g["type"] in EXPECTED:
            names = [w[0] for w in g["widgets"]]
            assert names[:len(EXPECTED[g["type"]])] == EXPECTED[g["type"]], g
    src = {n["type"]: n["widgets_values"] for n in wf["nodes"] if n["type"] in EXPECTED}
    for g in got:
        if g["type"] in src and g["type"] != "ApplySageAttention":
            assert [w[1] for w in g["widgets"]][:len(src[g["type"]])] == src[g["type"]]
    page.screenshot(path=str(tmp_path / f"{path.stem}.png"))
    shot_dir = os.environ.get("COMFY_SAGE_SCREENSHOTS")
    if shot_dir:
        Path(shot_dir).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(shot_dir) / f"{path.stem}.png"))
