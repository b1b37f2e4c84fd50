"""A real ComfyUI server (main.py --cpu on loopback): the pack loads, its nodes are listed, each example workflow is
listed once in the template browser, an API-format prompt with the pack's nodes runs and its result is read from
/history, and a bad schedule token is reported once, naming the input that holds it."""
import json
import time
import urllib.error
import urllib.request
import uuid

import pytest

import conftest as C


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


def test_each_workflow_listed_once_as_a_template(comfy_server):
    templates = get(comfy_server["url"] + "/workflow_templates")["comfy_sage"]
    wanted = sorted(p.stem for p in (C.REPO / "workflows").glob("*.json"))
    assert sorted(templates) == wanted, templates
    name = wanted[0]
    served = get(f"{comfy_server['url']}/api/workflow_templates/comfy_sage/{name}.json")
    assert served == json.loads((C.REPO / "workflows" / f"{name}.json").read_text())


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


def wait_for(url, pid, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = get(f"{url}/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
            return hist[pid]
        time.sleep(0.5)
    pytest.fail(f"prompt did not finish: {hist}")


def test_bad_schedule_token_reported_once_under_its_input(comfy_server):
    """A node with one schedule string (Sparse's dense_steps) is refused before anything runs, with one error filed
    under that input. The step and block schedules have two strings, and ComfyUI would file a VALIDATE_INPUTS error
    under both: theirs is the node's one error as it runs, naming the input and the token."""
    url = comfy_server["url"]
    prompt = {
        "1": {"class_type": "SageAttentionSparse",
              "inputs": {"mode": "manual", "level": 0.5, "dense_steps": "3-", "budget": 0.05}},  # model: missing
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    code, res = post(url + "/prompt", {"prompt": prompt})
    assert code == 400, res
    custom = [e for e in res["node_errors"]["1"]["errors"] if e["type"] == "custom_validation_failed"]
    assert len(custom) == 1 and custom[0]["extra_info"]["input_name"] == "dense_steps", custom
    assert "'3-'" in custom[0]["details"]

    prompt = {
        "1": {"class_type": "SageAttentionStepSchedule", "inputs": {"steps": "", "exact_steps": "0, a-b"}},
        "2": {"class_type": "SageAttentionBlockSchedule",
              "inputs": {"blocks": "", "exact_blocks": "", "attention": "all", "schedule": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    code, res = post(url + "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
    assert code == 200, res
    status = wait_for(url, res["prompt_id"])["status"]
    errors = [m[1] for m in status["messages"] if m[0] == "execution_error"]
    assert status["status_str"] == "error" and len(errors) == 1, status
    assert errors[0]["node_id"] == "1" and errors[0]["node_type"] == "SageAttentionStepSchedule"
    assert errors[0]["exception_message"].startswith("exact_steps: bad token 'a-b'"), errors[0]
