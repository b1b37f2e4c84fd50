"""A real ComfyUI server (main.py --cpu on loopback): the pack loads, its nodes are listed, an API-format prompt with
the pack's nodes runs and its result is read from /history, and a bad schedule string is refused naming the token."""
import json
import time
import urllib.error
import urllib.request
import uuid

import pytest


def get(url):
    return json.loads(urllib.request.urlopen(url, timeout=30).read())


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        return 200, json.loads(urllib.request.urlopen(req, timeout=30).read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_pack_nodes_listed(comfy_server):
    info = get(comfy_server["url"] + "/object_info")
    for name in ("ApplySageAttention", "SageAttentionStepSchedule", "SageAttentionBlockSchedule",
                 "SageAttentionReport", "SageAttentionCompareImages", "SageAttentionCompareLatents",
                 "SageAttentionSparse"):
        assert name in info
        assert info[name]["category"] == "sageattention"
    assert info["ApplySageAttention"]["display_name"] == "Apply SageAttention"
    assert info["SageAttentionSparse"]["display_name"] == "SageAttention Sparse"
    assert "IMPORT FAILED" not in [l for l in comfy_server["log"].read_text().splitlines() if "comfy_sage" in l]


def test_api_prompt_runs_and_history(comfy_server):
    url = comfy_server["url"]
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0x202020}},
        "3": {"class_type": "SageAttentionCompareImages", "inputs": {"image_a": ["1", 0], "image_b": ["2", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
        "5": {"class_type": "SageAttentionStepSchedule", "inputs": {"steps": "", "exact_steps": "0-1, -1"}},
        "6": {"class_type": "SageAttentionBlockSchedule",
              "inputs": {"blocks": "double:0-3", "exact_blocks": "", "attention": "self", "schedule": ["5", 0]}},
    }
    code, res = post(url + "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
    assert code == 200, res
    pid = res["prompt_id"]
    deadline = time.time() + 120
    while time.time() < deadline:
        hist = get(f"{url}/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("completed"):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"prompt did not finish: {hist}")
    outputs = hist[pid]["outputs"]
    text = outputs["3"]["text"][0]
    # 0x20/255 = 0.12549 on every pixel -> max abs 0.1255, PSNR = 20*log10(1/0.12549) = 18.03 dB
    assert "max abs 0.1255" in text and "PSNR 18.03 dB" in text
    assert outputs["4"]["images"] and outputs["4"]["images"][0]["filename"].endswith(".png")


def test_bad_schedule_refused_naming_token(comfy_server):
    """Validation (VALIDATE_INPUTS) rejects the schedule node before anything runs; the error names the token."""
    prompt = {
        "1": {"class_type": "SageAttentionStepSchedule", "inputs": {"steps": "3-", "exact_steps": ""}},
        "2": {"class_type": "SageAttentionBlockSchedule",
              "inputs": {"blocks": "", "exact_blocks": "", "attention": "all", "schedule": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    code, res = post(comfy_server["url"] + "/prompt", {"prompt": prompt})
    assert code == 400, res
    errors = res["node_errors"]["1"]["errors"]
    assert any("'3-'" in e["details"] for e in errors), errors
    assert res["node_errors"]["1"]["class_type"] == "SageAttentionStepSchedule"
