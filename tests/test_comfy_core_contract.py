"""Our override under current ComfyUI core's attention contract (2026), without ComfyUI.

`make_core` is a stand-in for core's attention module, written here from that contract: q, k, v travel in
single-owner containers; the dispatcher (`wrap_attn`) hands them to an override's `container_function` where it has
one, else takes the tensors out and calls `override(func, ...)`; without an override a layer's preferred attention
(per-layer configs from the checkpoint) runs, else the function itself (its own `container_function` first); named
functions live in a registry. `Patcher` adds what a ModelPatcher does with them (set_model_optimized_attention,
callbacks), `sparse_node` what core's Model Sparse Attention does to a model. The same module with containers=False
is ComfyUI 0.3.6x's plain-tensor dispatch. The 8-bit calls run the real kernel through Triton's interpreter."""
import copy
import subprocess
import sys
import textwrap
import types
import weakref

import pytest
import torch

from comfy_sage.nodes import _runtime
from comfy_sage.nodes.sage_nodes import ApplySageAttention, SageAttentionReport

DEV = "cpu"  # the kernels through TRITON_INTERPRET=1
# The stand-in's expectations are the interpreter's arch entry (pv auto = FP16 P·V, no short-sequence threshold);
# on a GPU, `python -m comfy_sage.bench.memory --comfy` and tests/comfyui/gpu_sampling_check.py check this path.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter contract; GPU: bench.memory --comfy")

HEADS = 2


class Container:
    """One owner of a tensor on its way into attention: peek() reads it, take() hands it over and forgets it."""
    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def peek(self):
        if self.tensor is None:
            raise RuntimeError("container already taken")
        return self.tensor

    def take(self):
        tensor, self.tensor = self.peek(), None
        return tensor


def exact(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kw):
    """Exact attention in ComfyUI's layouts (fp32 math, the inputs' dtype out)."""
    if not skip_reshape:
        b = q.shape[0]
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                           scale=kw.get("scale")).to(q.dtype)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def make_core(containers=True):
    core = types.ModuleType("comfy.ldm.modules.attention")
    core.log, core.registered, core.REGISTERED_ATTENTION_FUNCTIONS = [], [], {}

    def register_attention_function(name, fn):
        core.registered.append(name)
        core.REGISTERED_ATTENTION_FUNCTIONS.setdefault(name, fn)

    def get_attention_function(name, default=...):
        if name not in core.REGISTERED_ATTENTION_FUNCTIONS and default is not ...:
            return default
        return core.REGISTERED_ATTENTION_FUNCTIONS[name]

    def taken(args):
        return tuple(c.take() for c in args[:3]) + args[3:]

    def wrap_attn(func):
        def dispatch(*args, **kwargs):
            preferred = kwargs.pop("preferred_attention", None)
            boxed = containers and isinstance(args[0], Container)
            if "_inside_attn_wrapper" not in kwargs:  # a model's call: overrides and preferences apply
                kwargs["_inside_attn_wrapper"] = True
                override = (kwargs.get("transformer_options") or {}).get("optimized_attention_override")
                if override is not None:
                    if boxed and hasattr(override, "container_function"):
                        return override.container_function(*args, **kwargs)
                    return override(func, *(taken(args) if boxed else args), **kwargs)
                if preferred is not None and preferred.function is not None:
                    return preferred.function(*args, **kwargs)
            if boxed and dispatch.container_function is not None:
                return dispatch.container_function(*args, **kwargs)
            return func(*(taken(args) if boxed else args), **kwargs)

        dispatch.container_function = None
        return dispatch

    def pytorch_raw(*args, **kwargs):
        core.log.append("pytorch")
        return exact(*args, **kwargs)

    def kitchen_raw(*args, **kwargs):
        core.log.append("kitchen")
        return exact(*args, **kwargs)

    def kitchen_containers(*args, **kwargs):
        """comfy-kitchen INT8's container path as far as this test cares: it owns the containers it gets."""
        core.log.append("kitchen:containers" if all(c.tensor is not None for c in args[:3]) else "kitchen:EMPTY")
        return kitchen_raw(*taken(args), **kwargs)

    core.AttentionTensorContainer = Container
    core.register_attention_function, core.get_attention_function = register_attention_function, get_attention_function
    core.wrap_attn = wrap_attn
    core.attention_pytorch = wrap_attn(pytorch_raw)
    core.attention_comfy_kitchen_int8 = wrap_attn(kitchen_raw)
    core.attention_comfy_kitchen_int8.container_function = kitchen_containers
    register_attention_function("pytorch", core.attention_pytorch)
    register_attention_function("comfy_kitchen_int8", core.attention_comfy_kitchen_int8)
    core.optimized_attention = core.attention_pytorch
    return core


def install_core(monkeypatch, core):
    pe = types.ModuleType("comfy.patcher_extension")
    pe.WrappersMP = types.SimpleNamespace(APPLY_MODEL="apply_model", OUTER_SAMPLE="outer_sample")
    pe.CallbacksMP = types.SimpleNamespace(ON_PREPARE_STATE="on_prepare_state")

    def add_wrapper_with_key(kind, key, fn, options, is_model_options=False):
        to = options.setdefault("transformer_options", {}) if is_model_options else options
        to.setdefault("wrappers", {}).setdefault(kind, {}).setdefault(key, []).append(fn)

    pe.add_wrapper_with_key = add_wrapper_with_key
    names = ("comfy", "comfy.ldm", "comfy.ldm.modules")
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, core.__name__, core)
    monkeypatch.setitem(sys.modules, pe.__name__, pe)
    sys.modules["comfy.ldm.modules"].attention = core
    sys.modules["comfy"].patcher_extension = pe
    monkeypatch.setattr(_runtime, "check_hook", lambda: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return core


@pytest.fixture
def core(monkeypatch):
    return install_core(monkeypatch, make_core())


class ComfyAttention(torch.nn.Module):
    """A layer's attention config as core loads it from a checkpoint (`preferred_attention`)."""

    def __init__(self, config=None, function=None):
        super().__init__()
        self.config, self.function = config, function


class TinyDiT(torch.nn.Module):
    def __init__(self, preferred=()):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
        for block, p in zip(self.blocks, preferred):
            block.comfy_attention = p


class Patcher:
    """The parts of a ModelPatcher this test needs: clone() copies options and callbacks."""

    def __init__(self, dm=None):
        self.dm, self.model_options, self.callbacks = dm or TinyDiT(), {"transformer_options": {}}, {}

    def get_model_object(self, name):
        return self.dm

    def clone(self):
        c = copy.copy(self)
        c.model_options = copy.deepcopy(self.model_options)
        c.callbacks = {kind: {key: list(fns) for key, fns in d.items()} for kind, d in self.callbacks.items()}
        return c

    def add_callback_with_key(self, kind, key, fn):
        self.callbacks.setdefault(kind, {}).setdefault(key, []).append(fn)

    def remove_callbacks_with_key(self, kind, key):
        self.callbacks.get(kind, {}).pop(key, None)

    def set_model_optimized_attention(self, optimized_attention):
        """The setter's contract (the Model Attention Backend node uses it): an override that ignores `func` and
        runs the chosen function, carrying its container_function."""
        def optimized_attention_override(func, *args, **kwargs):
            return optimized_attention(*args, **kwargs)

        if getattr(optimized_attention, "container_function", None) is not None:
            optimized_attention_override.container_function = optimized_attention.container_function
        self.model_options["transformer_options"]["optimized_attention_override"] = optimized_attention_override

    def prepare(self):
        """What the sampler does before each step: ON_PREPARE_STATE callbacks."""
        for fns in list(self.callbacks.get("on_prepare_state", {}).values()):
            for fn in fns:
                fn(self, None, self.model_options)


def sparse_node(model, core, h3=False):
    """Core's Model Sparse Attention seen from outside: a clone whose override sits on top of the hook (handing the
    calls it keeps dense to the one below) and is put back on top before every step; on MiniMax-H3 (h3) also block
    patches that compute attention themselves."""
    installed, patch = [], types.SimpleNamespace(tau=1.3, topk_ratio=0.0, vsa=False)  # sol-attn's options

    def reinstall(to):
        below = to.get("optimized_attention_override")
        if below in installed:
            return

        def override(func, *args, **kwargs):
            core.log.append("core-vsa" if patch.vsa else "core-sparse")
            return below(func, *args, **kwargs) if below is not None else func(*args, **kwargs)

        override.__module__ = "comfy_extras.nodes_sparse_attention"
        installed.append(override)
        to["optimized_attention_override"] = override

    def block_patch(args, extra):  # MiniMax-H3: the block's attention computed outside the attention hook
        core.log.append("core-sparse-block")
        return extra["original_block"](args)

    block_patch.__module__ = "comfy_extras.nodes_sparse_attention"
    m = model.clone()
    reinstall(m.model_options["transformer_options"])
    m.add_callback_with_key("on_prepare_state", "block_sparse_attention",
                            lambda patcher, t, options: reinstall(options["transformer_options"]))
    if h3:
        dit = m.model_options["transformer_options"].setdefault("patches_replace", {}).setdefault("dit", {})
        dit.update({("double_block", i): block_patch for i in range(2)})
    return m


def apply(model, **kw):
    return ApplySageAttention().apply(model, **{"enabled": True, "pv": "fp16", **kw})[0]


def hook(model):
    return model.model_options["transformer_options"].get("optimized_attention_override")


def qkv(layout, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    if layout == "bld":  # ComfyUI's [B, N, H*D], cross-attention lengths
        shapes = [(1, 32, HEADS * 32), (1, 48, HEADS * 32), (1, 48, HEADS * 32)]
    else:                # skip_reshape: [B, H, N, D]
        shapes = [(1, HEADS, 32, 32)] * 3
    return [torch.randn(*s, generator=g).to(DEV, dtype) for s in shapes]


LAYOUT_KW = {"bld": {}, "bhld": {"skip_reshape": True, "skip_output_reshape": True}}


def site_call(core, model, layout, *, watch=None, preferred=None, dtype=torch.float16, **kw):
    """One attention call as a current model makes it: q, k, v go in containers and the site keeps no tensor.
    Returns (output, weakrefs to q, k, v, the containers)."""
    tensors = qkv(layout, dtype=dtype)
    refs = [weakref.ref(t) for t in tensors]
    if watch is not None:
        watch[:] = refs
    boxes = [Container(t) for t in tensors]
    del tensors
    out = core.optimized_attention(*boxes, HEADS, preferred_attention=preferred,
                                   transformer_options=model.model_options["transformer_options"],
                                   **LAYOUT_KW[layout], **kw)
    return out, refs, boxes


def plain_call(model, layout, **kw):
    """The same call under ComfyUI 0.3.6x: plain tensors, `override(func, ...)`."""
    old = make_core(containers=False)
    return old.optimized_attention(*qkv(layout), HEADS, transformer_options=model.model_options["transformer_options"],
                                   **LAYOUT_KW[layout], **kw)


@pytest.fixture
def freed_at_output(monkeypatch):
    """Whether each watched tensor was already freed when the override reshaped the kernel's output."""
    watch, seen = [], []
    reshape = _runtime._from_hnd

    def spy(out, skip_output_reshape):
        seen.append([r() is None for r in watch])
        return reshape(out, skip_output_reshape)

    monkeypatch.setattr(_runtime, "_from_hnd", spy)
    return watch, seen


# ---- the 8-bit path ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["bld", "bhld"])
def test_containers_run_8bit_like_plain_tensors_and_free_them_before_the_output_copy(core, layout, freed_at_output):
    watch, seen = freed_at_output
    m = apply(Patcher())
    st = _runtime.state_of(m)
    out, refs, boxes = site_call(core, m, layout, watch=watch)
    assert seen == [[True, True, True]]  # the 16-bit q, k, v were gone when the output was reshaped
    assert all(b.tensor is None for b in boxes) and core.log == []
    assert torch.equal(out, plain_call(m, layout)) and out.dtype == torch.float16
    assert (out.float() - exact(*qkv(layout), HEADS, **LAYOUT_KW[layout]).float()).abs().max() < 0.05
    assert dict(st.run["paths"]) == {"int8-fp16pv": 2}


def test_a_scale_from_core_reaches_the_kernel(core):
    """Current core's attention functions take `scale`; so does ours."""
    out = site_call(core, apply(Patcher()), "bld", scale=0.5)[0].float()
    ref = exact(*qkv("bld"), HEADS, scale=0.5).float()
    assert (out - ref).abs().sum() / ref.abs().sum() < 0.02 and (out - ref).abs().max() < 0.08
    assert (out - exact(*qkv("bld"), HEADS).float()).abs().max() > 0.1


# ---- exact calls: the containers go on untouched ----------------------------------------------------------------
@pytest.mark.parametrize("why", ["mask", "fp32", "schedule", "calibration"])
def test_exact_calls_hand_the_containers_to_cores_selected_attention(core, why):
    core.optimized_attention = core.attention_comfy_kitchen_int8  # --use-ck-attention
    m, kw, dtype = apply(Patcher()), {}, torch.float16
    st = _runtime.state_of(m)
    if why == "mask":
        kw["mask"] = torch.zeros(32, 48)
    elif why == "fp32":
        dtype = torch.float32
    elif why == "schedule":
        st.schedule = _runtime.Schedule.from_strings(blocks="5")
    else:
        seen = []
        st.calibrator = types.SimpleNamespace(observe=lambda site, q, k, v, **_: seen.append((site, q.shape)))
        token = _runtime._forward.set(_runtime._Forward(0, 1, calibrating=True))
    try:
        out, refs, boxes = site_call(core, m, "bld", dtype=dtype, **kw)
    finally:
        if why == "calibration":
            _runtime._forward.reset(token)
    assert core.log == ["kitchen:containers", "kitchen"]  # its own container path got them full
    assert all(r() is None for r in refs) and all(b.tensor is None for b in boxes)
    assert torch.equal(out, exact(*qkv("bld", dtype=dtype), HEADS, **kw))
    assert dict(st.run["paths"]) == {f"exact:{why}": 1}
    if why == "calibration":
        assert seen == [("0:cross", (1, HEADS, 32, 32))]  # measured on the tensors in place


def test_exact_calls_go_to_the_override_below_ours(core):
    """A backend set on the model (its override carries a container_function) gets the containers; an override of
    the plain-tensor kind gets tensors, with core's selected attention as its func."""
    backend = Patcher()
    backend.set_model_optimized_attention(core.get_attention_function("comfy_kitchen_int8"))
    m = apply(backend)
    site_call(core, m, "bld", mask=torch.zeros(32, 48))
    assert core.log == ["kitchen:containers", "kitchen"]

    got = []

    def older_pack(func, q, k, v, *args, **kwargs):
        got.append((type(q), func))
        return func(q, k, v, *args, **kwargs)

    plain = Patcher()
    plain.model_options["transformer_options"]["optimized_attention_override"] = older_pack
    core.log.clear()
    out, refs, boxes = site_call(core, apply(plain), "bld", mask=torch.zeros(32, 48))
    assert got == [(torch.Tensor, core.optimized_attention)] and core.log == ["pytorch"]
    assert all(b.tensor is None for b in boxes) and all(r() is None for r in refs)


# ---- coexisting with core's choices ---------------------------------------------------------------------------------
def test_ours_decides_where_applied_and_core_keeps_its_choices_elsewhere(core):
    kitchen = core.attention_comfy_kitchen_int8
    layers = (ComfyAttention({"attention": "comfy_kitchen_int8"}, kitchen), ComfyAttention({"attention": "x"}))
    base = Patcher(TinyDiT(layers))
    backend = base.clone()
    backend.set_model_optimized_attention(kitchen)
    sparse = sparse_node(backend, core)
    default, registry = core.optimized_attention, dict(core.REGISTERED_ATTENTION_FUNCTIONS)

    m = apply(sparse)
    st = _runtime.state_of(m)
    m.prepare()
    assert hook(m) is st and "block_sparse_attention" not in m.callbacks["on_prepare_state"]
    site_call(core, m, "bld", preferred=layers[0])  # ours wins over the layer's preferred attention
    assert core.log == [] and dict(st.run["paths"]) == {"int8-fp16pv": 1}
    site_call(core, m, "bld", mask=torch.zeros(32, 48))  # exact: to the sparse override, then to the backend
    assert core.log == ["core-sparse", "kitchen"]

    core.log.clear()  # without our node: theirs, as before
    sparse.prepare()
    site_call(core, sparse, "bld")
    site_call(core, base, "bld", preferred=layers[0])
    site_call(core, base, "bld")
    assert core.log == ["core-sparse", "kitchen", "kitchen:containers", "kitchen", "pytorch"]
    assert core.optimized_attention is default and "block_sparse_attention" in sparse.callbacks["on_prepare_state"]
    assert {k: v for k, v in core.REGISTERED_ATTENTION_FUNCTIONS.items() if k != "comfy_sage"} == registry


def test_report_says_what_core_had_selected(core):
    core.optimized_attention = core.attention_comfy_kitchen_int8  # --use-ck-attention
    layers = (ComfyAttention({"attention": "comfy_kitchen_int8"}, core.attention_comfy_kitchen_int8),
              ComfyAttention({"attention": "comfy_kitchen_int8"}))  # not usable on this device
    backend = Patcher(TinyDiT(layers))
    backend.set_model_optimized_attention(core.attention_comfy_kitchen_int8)
    text = SageAttentionReport().report(apply(sparse_node(backend, core)), {"samples": None})["result"][0]
    assert "default attention comfy_kitchen_int8 (--use-ck-attention)" in text
    assert "override before ours: core's Model Sparse Attention (sol-attn, tau 1.3) (our exact calls go to it)" in text
    assert "checkpoint's per-layer attention: comfy_kitchen_int8 on 2 layers (1 usable on this device)" in text
    assert "re-installs itself each step: dropped on this model, ours stays on top" in text
    assert "note:" not in text

    text = SageAttentionReport().report(apply(backend), {"samples": None})["result"][0]
    assert "override before ours: the model's attention backend comfy_kitchen_int8 (our exact calls go to it)" in text
    text = SageAttentionReport().report(apply(backend, enabled=False), {"samples": None})["result"][0]
    assert "the model's attention backend comfy_kitchen_int8 (it runs every call: this node is off)" in text

    h3 = sparse_node(Patcher(), core, h3=True)
    m = apply(h3)
    text = SageAttentionReport().report(m, {"samples": None})["result"][0]
    assert "Model Sparse Attention's block patches (MiniMax-H3: attention outside the hook): dropped" in text
    block = m.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]
    theirs = h3.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]
    assert block({}, {"original_block": lambda args: "original"}) == "original" and core.log == []
    assert theirs({}, {"original_block": lambda args: "original"}) == "original"
    assert core.log == ["core-sparse-block"]  # without our node theirs still runs

    after = sparse_node(apply(Patcher()), core)  # a node after ours takes the hook
    text = SageAttentionReport().report(after, {"samples": None})["result"][0]
    assert "default attention comfy_kitchen_int8" in text and "override before ours" not in text
    assert "note: a node after this one put core's Model Sparse Attention (sol-attn, tau 1.3) on this model's " \
           "attention hook: it decides first" in text


# ---- core's registry of named attention functions -------------------------------------------------------------------
def test_registered_once_and_usable_by_name(core, freed_at_output):
    assert _runtime.register_attention() and _runtime.register_attention()
    apply(Patcher())
    apply(Patcher())
    assert core.registered == ["pytorch", "comfy_kitchen_int8", "comfy_sage"]

    by_name = Patcher()  # as the Model Attention Backend node would select it
    by_name.set_model_optimized_attention(core.get_attention_function("comfy_sage"))
    watch, seen = freed_at_output
    before = sum(_runtime._NAMED.run["paths"].values())
    out, refs, boxes = site_call(core, by_name, "bld", watch=watch)
    assert seen == [[True, True, True]] and torch.equal(out, plain_call(by_name, "bld"))
    assert torch.equal(out, plain_call(apply(Patcher(), pv="auto"), "bld"))  # what our node computes
    site_call(core, by_name, "bld", mask=torch.zeros(32, 48))  # exact: core's selected attention
    assert core.log == ["pytorch"] and sum(_runtime._NAMED.run["paths"].values()) == before + 3


def test_registration_leaves_a_taken_name_and_an_older_core_alone(monkeypatch):
    core = install_core(monkeypatch, make_core())
    theirs = core.attention_pytorch
    core.register_attention_function("comfy_sage", theirs)
    assert not _runtime.register_attention() and core.get_attention_function("comfy_sage") is theirs
    old = make_core()
    for name in ("register_attention_function", "get_attention_function", "wrap_attn"):
        delattr(old, name)
    install_core(monkeypatch, old)
    assert not _runtime.register_attention()
    apply(Patcher())  # and the node still applies


def test_registered_when_the_pack_loads_inside_comfyui():
    """ComfyUI has core's attention module loaded before custom nodes: loading the pack's nodes registers ours,
    without importing anything of ComfyUI itself."""
    code = textwrap.dedent("""
        import sys, types
        core = types.ModuleType("comfy.ldm.modules.attention")
        reg = {}
        core.register_attention_function = lambda name, fn: reg.setdefault(name, fn)
        core.get_attention_function = lambda name, default=None: reg.get(name, default)
        core.wrap_attn = lambda fn: (lambda *a, **k: fn(*a, **k))
        sys.modules[core.__name__] = core
        import comfy_sage
        comfy_sage.NODE_CLASS_MAPPINGS  # what ComfyUI reads right after loading the pack
        print(sorted(reg), getattr(reg.get("comfy_sage"), "container_function", None) is not None,
              sorted(m for m in sys.modules if m.split(".")[0] == "comfy"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[-2] == "['comfy_sage'] True ['comfy.ldm.modules.attention']"


# ---- releasing the 16-bit q, k, v once quantized (issue 16) -------------------------------------------------------
from comfy_sage.kernels import _api, _attention, _fallback, _quant  # noqa: E402
from comfy_sage.kernels import _sparse as sparse_kernels  # noqa: E402
from comfy_sage.kernels._sdpa import sdpa_taking  # noqa: E402


@pytest.fixture
def fresh():
    """No config has run yet in this process (and none failed), before and after the test."""
    _fallback.forget()
    yield
    _fallback.forget()


@pytest.fixture
def at_attention(monkeypatch):
    """(watch, seen, fail): at each launch of the attention kernel, whether each watched tensor was already freed;
    `fail` (a list, empty: run) holds an exception the launch raises instead."""
    watch, seen, fail = [], [], []
    launch = _attention.attention

    def spy(*args, **kwargs):
        seen.append([r() is None for r in watch])
        if fail:  # a new exception each time: one kept in `fail` would keep its traceback's frames
            raise type(fail[0])(*fail[0].args)
        return launch(*args, **kwargs)

    monkeypatch.setattr(_attention, "attention", spy)
    return watch, seen, fail


@pytest.mark.parametrize("layout", ["bld", "bhld"])
@pytest.mark.parametrize("pv", ["fp16", "fp8", "int8"])
def test_a_known_good_config_frees_q_and_k_before_the_attention_launch(core, fresh, at_attention, layout, pv):
    """The first call of a config keeps q, k, v until the kernel returns; from the next one on, q and k are gone when
    attention starts, and v too where P·V is 8-bit (fp16 P·V reads it). Same output either way, and as with plain
    tensors (ComfyUI 0.3.6x), which the override never releases."""
    watch, seen, _ = at_attention
    m = apply(Patcher(), pv=pv)
    first = site_call(core, m, layout, watch=watch)[0]
    second, refs, boxes = site_call(core, m, layout, watch=watch)
    assert seen == [[False, False, False], [True, True, pv != "fp16"]]
    assert all(r() is None for r in refs) and all(b.tensor is None for b in boxes)
    assert torch.equal(first, second) and torch.equal(second, plain_call(m, layout))
    assert dict(_runtime.state_of(m).run["paths"]) == {f"int8-{pv}pv": 3}


def test_plain_tensor_calls_never_release_what_the_caller_holds(core, fresh, at_attention):
    """ComfyUI 0.3.6x: core's wrapper holds q, k, v; on a known-good config they stay alive and untouched."""
    watch, seen, _ = at_attention
    m = apply(Patcher(), pv="fp8")
    site_call(core, m, "bld")  # the config has run
    old = make_core(containers=False)
    tensors = qkv("bld")
    copies = [t.clone() for t in tensors]
    watch[:] = [weakref.ref(t) for t in tensors]
    out = old.optimized_attention(*tensors, HEADS, transformer_options=m.model_options["transformer_options"])
    assert seen[-1] == [False, False, False]
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies))
    assert torch.equal(out, site_call(core, m, "bld")[0])


def test_a_first_call_keeps_the_tensors_so_a_kernel_failure_falls_back_exactly(core, fresh, at_attention,
                                                                               monkeypatch):
    monkeypatch.setenv("COMFY_SAGE_STRICT", "0")
    watch, seen, fail = at_attention
    fail.append(RuntimeError("broken launch"))
    m = apply(Patcher(), pv="fp8")
    out, refs, boxes = site_call(core, m, "bld", watch=watch)
    assert seen == [[False, False, False]] and all(r() is None for r in refs)
    assert (out.float() - exact(*qkv("bld"), HEADS).float()).abs().max() < 2e-3  # SDPA in fp16
    assert dict(_runtime.state_of(m).run["paths"]) == {"sdpa:kernel_error": 1}
    assert _fallback.failures()  # remembered: later calls of the config run exact attention from the start


@pytest.mark.parametrize("pv", ["fp16", "fp8", "int8"])
def test_a_failure_after_the_release_runs_exact_attention_on_the_8bit_copies(core, fresh, at_attention, monkeypatch,
                                                                             pv):
    """A config that ran before and fails now (a new compilation of its kernel, say): q and k are gone, so exact
    attention runs on their 8-bit copies (and v's), as accurate as the kernel, instead of failing the workflow."""
    monkeypatch.setenv("COMFY_SAGE_STRICT", "0")
    watch, seen, fail = at_attention
    m = apply(Patcher(), pv=pv)
    good = site_call(core, m, "bld", watch=watch)[0]
    fail.append(RuntimeError("broken launch"))
    out = site_call(core, m, "bld", watch=watch)[0]
    assert seen[1] == [True, True, pv != "fp16"]
    assert (out.float() - good.float()).abs().max() < 0.02
    assert (out.float() - exact(*qkv("bld"), HEADS).float()).abs().max() < 0.05
    assert dict(_runtime.state_of(m).run["paths"]) == {f"int8-{pv}pv": 1, _fallback.KERNEL_ERROR_8BIT: 1}
    site_call(core, m, "bld")  # remembered: the config now runs exact attention from the start
    assert _runtime.state_of(m).run["paths"][_fallback.KERNEL_ERROR] == 1


@pytest.mark.parametrize("pv", ["fp16", "fine", "fp8", "int8"])
def test_salvage_matches_the_kernel_with_lse_gqa_and_causal(fresh, monkeypatch, pv):
    """The exact attention on 8-bit copies (`_api._salvage`) against the kernel itself: outputs and LSE, with grouped
    heads, causal masking and several key blocks (per-block and per-token K scales, FP8 and INT8 v)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 80, 32, generator=g).to(DEV, torch.bfloat16) for h in (4, 2, 2))
    ref, ref_lse = _fallback.exact_with_lse(q, k, v, None, True, None)
    good, good_lse = _api.forward_taking([q.clone(), k.clone(), v.clone()], True, None, pv, return_lse=True)
    monkeypatch.setenv("COMFY_SAGE_STRICT", "0")
    monkeypatch.setattr(_attention, "attention", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("broken")))
    out, lse = _api.forward_taking([q, k, v], True, None, pv, return_lse=True)
    err, good_err = ((x.float() - ref.float()).abs().max() for x in (out, good))
    lse_err, good_lse_err = ((x - ref_lse).abs().max() for x in (lse, good_lse))
    assert err <= good_err + 0.004 and (out.float() - good.float()).abs().max() < 0.03  # as accurate as the kernel
    assert lse_err <= good_lse_err + 1e-3 and (lse - good_lse).abs().max() < 0.03


def test_out_of_memory(core, fresh, at_attention, monkeypatch):
    """On a first call, exact attention runs once the 8-bit buffers are freed (the exception's traceback held them
    in the except clause). After a release the error propagates, as SDPA's would: it needed more than we held."""
    monkeypatch.setenv("COMFY_SAGE_STRICT", "0")
    watch, seen, fail = at_attention
    buffers, freed = [], []
    quantize, fallback = _quant.quantize, _fallback.exact_attention

    def quantized(*args, **kwargs):
        qz = quantize(*args, **kwargs)
        buffers[:] = [weakref.ref(qz.q8), weakref.ref(qz.k8)]
        return qz

    def exact_attention(*args, **kwargs):
        freed.append([r() is None for r in buffers])
        return fallback(*args, **kwargs)

    monkeypatch.setattr(_quant, "quantize", quantized)
    monkeypatch.setattr(_fallback, "exact_attention", exact_attention)
    fail.append(torch.cuda.OutOfMemoryError("no room"))
    m = apply(Patcher(), pv="fp8")
    out = site_call(core, m, "bld")[0]
    assert freed == [[True, True]] and (out.float() - exact(*qkv("bld"), HEADS).float()).abs().max() < 2e-3
    assert not _fallback.failures()  # not remembered: the next call tries the kernel again
    fail.clear()
    site_call(core, m, "bld")  # the config runs
    fail.append(torch.cuda.OutOfMemoryError("no room"))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        site_call(core, m, "bld")
    assert dict(_runtime.state_of(m).run["paths"]) == {"sdpa:out_of_memory": 1, "int8-fp8pv": 1}


def test_a_sparse_call_selects_from_16bit_q_and_k_before_they_go(fresh, at_attention, monkeypatch):
    watch, seen, _ = at_attention
    at_select, select = [], sparse_kernels.select

    def spy(q, k, **kwargs):
        at_select.append([r() is None for r in watch])
        return select(q, k, **kwargs)

    monkeypatch.setattr(sparse_kernels, "select", spy)
    outs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(5)
        tensors = [torch.randn(1, 2, 128, 32, generator=g).to(DEV, torch.float16) for _ in range(3)]
        watch[:] = [weakref.ref(t) for t in tensors]
        outs.append(sdpa_taking(tensors, pv="sparse:ratio=0.5"))
        assert tensors == []
    assert at_select == [[False, False, False]] * 2
    assert seen == [[False, False, False], [True, True, False]]  # sparse calls take the arch's 16-bit P·V path here
    assert torch.equal(*outs) and sparse_kernels.last_density() == 0.5


@pytest.mark.parametrize("pv", ["fp16", "fp8", "int8"])
def test_quantize_taking_matches_quantize_and_empties_the_list(pv):
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, h, 80, 32, generator=g).to(DEV, torch.bfloat16) for h in (4, 2, 2))
    dims = (1, 4, 2, 80, 80, 32, 32)
    kw = dict(dims=dims, scale=0.2, block_m=32, block_n=32, fp8_v=pv == "fp8", int8_v=pv == "int8",
              k_token=pv == "int8", rot=_quant.rotation_for(pv, 32))
    lse_a, lse_b = torch.zeros(1, 4, 80), torch.zeros(1, 4, 80)
    a = _quant.quantize(q, k, v, lse=lse_a, **kw)
    src = [q.clone(), k.clone(), v.clone()]
    b = _quant.quantize_taking(src, lse=lse_b, **kw)
    assert src[:2] == [None, None] and (src[2] is None) == (pv != "fp16")
    for name in ("q8", "qs", "k8", "ks", "kmean", "v8", "vs", "vc"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                                                        y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y)
    assert torch.equal(lse_a, lse_b)


def test_memory_bench_comfy_mode_runs_on_cpu(fresh, monkeypatch):
    """`python -m comfy_sage.bench.memory --comfy` on a tiny shape through the interpreter (no byte counts on CPU):
    every path runs, the containers' first and warm calls give the plain-tensor output, all 8-bit."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from comfy_sage.bench.memory import comfy_peaks

    res = comfy_peaks(tokens=64, heads=2, dim_head=32, device="cpu", pvs=("fp16",))
    assert res["ok"] and res["paths"] == {"fp16": {"int8-fp16pv": 5}}
    assert [r["path"] for r in res["rows"]] == ["sdpa", "ours_plain", "ours_containers_first_call", "ours_containers"]
