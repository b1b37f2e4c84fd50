"""Tests against a real ComfyUI checkout: set COMFYUI_PATH=/path/to/ComfyUI (skipped without it).

Tiny models are built from ComfyUI's own model classes (supported_models configs -> model_base -> ldm modules) with
seeded random weights; nothing is downloaded.
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

# The 8-bit path on CPU runs the real Triton kernels through the interpreter; triton reads this when it is first
# imported, so it is set before anything imports it (GPU runs: set TRITON_INTERPRET=0 explicitly).
os.environ.setdefault("TRITON_INTERPRET", "1")
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
REPO = Path(__file__).resolve().parents[2]
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # test modules `import conftest as C` for the builders (pytest runs --import-mode=importlib)

if not COMFYUI_PATH or not (Path(COMFYUI_PATH) / "comfy").is_dir():
    NO_COMFYUI = (f"COMFYUI_PATH={COMFYUI_PATH!r} is no ComfyUI checkout" if COMFYUI_PATH else "COMFYUI_PATH is not set"
                  ) + ": these tests need ComfyUI (README: Testing against ComfyUI)"

    class _SkippedModule(pytest.Module):
        def collect(self):
            pytest.skip(f"{self.path.name}: {NO_COMFYUI}")  # one skip per module, nothing imported

    def pytest_pycollect_makemodule(module_path, parent):
        return _SkippedModule.from_parent(parent, path=module_path)


def comfy_import(cpu=True):
    """Put ComfyUI on sys.path, CPU mode (cpu=False: ComfyUI's own device pick, as `main.py` without --cpu), and
    import what the tests use."""
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = cpu
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.samplers  # noqa: F401
    import comfy.supported_models  # noqa: F401
    return sys.modules["comfy"]


def load_pack(name="comfy_sage_pack"):
    """Load the repository as ComfyUI loads a custom node folder: a module from <dir>/__init__.py by file location,
    under a name that is not `comfy_sage` (ComfyUI uses the folder path)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _init_weights(model, seed=0, std=0.05):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("weight") and "norm" in name.lower():
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def _patcher(config_cls, unet_config, dtype):
    import torch

    import comfy.model_patcher

    cfg = config_cls(unet_config)
    # fp32 weights; 16-bit compute through ComfyUI's manual-cast ops (as it runs fp16 models on devices that
    # cannot store them), so attention sees fp16 activations while fp32-only layers (Wan's patch embedding) work.
    cfg.set_inference_dtype(torch.float32, None if dtype == torch.float32 else dtype)
    cfg.unet_config["dtype"] = torch.float32
    model = cfg.get_model({})
    _init_weights(model.diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def tiny_flux(dtype):
    import comfy.supported_models as sm

    uc = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
          "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2,
          "depth_single_blocks": 3, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True}
    return _patcher(sm.Flux, uc, dtype)


def tiny_wan(dtype):
    import comfy.supported_models as sm

    uc = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 16, "in_dim": 16,
          "dim": 64, "ffn_dim": 128, "freq_dim": 32, "text_dim": 32, "out_dim": 16, "num_heads": 2, "num_layers": 3,
          "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
    return _patcher(sm.WAN21_T2V, uc, dtype)


def tiny_unet(dtype):
    """ComfyUI's SD15 config sets 8 heads whatever num_heads says: 128 channels give head dims 16 and 32, inside
    what the 8-bit kernel takes (sage_sdpa keeps SDPA below 16)."""
    import comfy.supported_models as sm

    uc = {"context_dim": 32, "model_channels": 128, "use_linear_in_transformer": False, "adm_in_channels": None,
          "use_temporal_attention": False, "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1],
          "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
          "transformer_depth_middle": 1, "num_heads": 2, "num_head_channels": -1,
          "image_size": 32, "use_spatial_transformer": True, "legacy": False,
          "use_temporal_resblock": False, "use_checkpoint": False}
    return _patcher(sm.SD15, uc, dtype)


def conds(kind, dtype, batch=1, seed=1):
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind == "flux":
        c = torch.randn(batch, 8, 32, generator=g).to(dtype)
        return [[c, {"pooled_output": torch.randn(batch, 32, generator=g).to(dtype), "guidance": 3.5}]]
    if kind == "wan":
        return [[torch.randn(batch, 16, 32, generator=g).to(dtype), {}]]
    return [[torch.randn(batch, 8, 32, generator=g).to(dtype), {}]]


def latent_for(kind, batch=1):
    import torch

    if kind == "wan":
        return torch.zeros(batch, 16, 2, 8, 8)
    if kind == "flux":
        return torch.zeros(batch, 16, 8, 8)
    return torch.zeros(batch, 4, 8, 8)


BUILDERS = {"flux": tiny_flux, "wan": tiny_wan, "unet": tiny_unet}


def sample(model, kind, dtype, steps=4, cfg=1.0, seed=0, sampler="euler", scheduler="normal"):
    import torch

    import comfy.sample

    lat = latent_for(kind)
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(seed))
    pos = conds(kind, dtype, seed=1)
    neg = conds(kind, dtype, seed=2)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, lat, seed=seed,
                               disable_pbar=True)


@pytest.fixture(scope="session")
def comfy():
    return comfy_import()


@pytest.fixture(scope="session")
def pack(comfy):
    return load_pack()


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """`main.py --cpu` on 127.0.0.1:<free port>, base directory in a temp folder whose custom_nodes/ links to this
    repository (the pack is loaded exactly as ComfyUI loads any custom node). Yields the base URL."""
    import subprocess
    import time
    import urllib.request

    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfy_sage").symlink_to(REPO, target_is_directory=True)
    port = free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base), "--disable-auto-launch",
                             "--database-url", "sqlite:///:memory:"],
                            cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/system_stats", timeout=2).read()
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ComfyUI did not start:\n" + (base / "server.log").read_text()[-4000:])
                time.sleep(1)
        yield {"url": url, "base": base, "log": base / "server.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
