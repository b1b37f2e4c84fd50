"""Writes the example workflows (ComfyUI UI format) in this folder: `python workflows/build_workflows.py`.

Each workflow samples twice with the same seed: default attention (Apply SageAttention with enabled off, which only
times the run) and Apply SageAttention, then feeds both to the compare and report nodes. Model file names are the
standard ones of each model's ComfyUI example page.
"""
import json
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []
        self._id = 0
        self._link = 0

    def node(self, type_, pos, widgets=(), inputs=(), outputs=(), title=None, size=(320, 120)):
        """inputs: [(name, type)], outputs: [(name, type)]; returns the node dict."""
        self._id += 1
        n = {"id": self._id, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": self._id - 1,
             "mode": 0, "inputs": [{"name": nm, "type": t, "link": None} for nm, t in inputs],
             "outputs": [{"name": nm, "type": t, "links": [], "slot_index": i} for i, (nm, t) in enumerate(outputs)],
             "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            n["title"] = title
        self.nodes.append(n)
        return n

    def link(self, src, out_slot, dst, in_name):
        self._link += 1
        slot = next(i for i, x in enumerate(dst["inputs"]) if x["name"] == in_name)
        t = src["outputs"][out_slot]["type"]
        assert dst["inputs"][slot]["type"] == t, (src["type"], dst["type"], in_name, t)
        src["outputs"][out_slot]["links"].append(self._link)
        dst["inputs"][slot]["link"] = self._link
        self.links.append([self._link, src["id"], out_slot, dst["id"], slot, t])

    def dump(self, path, title):
        wf = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfy_sage/workflows/{path.stem}")), "revision": 0, "last_node_id": self._id, "last_link_id": self._link,
              "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
              "extra": {"ds": {"scale": 0.6, "offset": [0, 0]}, "comfy_sage": {"title": title}}, "version": 0.4}
        path.write_text(json.dumps(wf, indent=1) + "\n")


MODEL, CLIP, VAE, COND, LATENT, IMAGE, STRING = "MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "STRING"
SCHED = "SAGE_SCHEDULE"


def apply_node(g, pos, enabled, schedule=False):
    ins = [("model", MODEL)] + ([("schedule", SCHED)] if schedule else [])
    return g.node("ApplySageAttention", pos, [enabled, "auto", enabled], ins, [("MODEL", MODEL)],
                  title="Apply SageAttention" if enabled else "Default attention (timed baseline)")


def side_by_side(g, model, pos_cond, neg_cond, latent, vae, sampler_widgets, x0, schedule=None, video=False,
                 post=None):
    """Two samplers (baseline, sage) with the same seed -> decode -> save; compare + report. post(g): makes a
    MODEL -> MODEL node (input "model") that goes between Apply SageAttention and the sage sampler."""
    base = apply_node(g, (x0, 0), False)
    sage = apply_node(g, (x0, 250), True, schedule=schedule is not None)
    g.link(model[0], model[1], base, "model")
    g.link(model[0], model[1], sage, "model")
    if schedule is not None:
        g.link(schedule, 0, sage, "schedule")
    if post is not None:
        p = post(g)
        g.link(sage, 0, p, "model")
        sage = p
    outs = []
    for row, ap in enumerate((base, sage)):
        ks = g.node("KSampler", (x0 + 380, row * 420), sampler_widgets,
                    [("model", MODEL), ("positive", COND), ("negative", COND), ("latent_image", LATENT)],
                    [("LATENT", LATENT)], size=(320, 262))
        g.link(ap, 0, ks, "model")
        g.link(pos_cond[0], pos_cond[1], ks, "positive")
        g.link(neg_cond[0], neg_cond[1], ks, "negative")
        g.link(latent[0], latent[1], ks, "latent_image")
        dec = g.node("VAEDecode", (x0 + 740, row * 420), [], [("samples", LATENT), ("vae", VAE)], [("IMAGE", IMAGE)])
        g.link(ks, 0, dec, "samples")
        g.link(vae[0], vae[1], dec, "vae")
        prefix = ["default", "sage"][row]
        if video:
            save = g.node("SaveAnimatedWEBP", (x0 + 1100, row * 420), [f"comfy_sage/{prefix}", 16.0, False, 90,
                                                                     "default"], [("images", IMAGE)], [])
        else:
            save = g.node("SaveImage", (x0 + 1100, row * 420), [f"comfy_sage/{prefix}"], [("images", IMAGE)], [])
        g.link(dec, 0, save, "images")
        outs.append((ap, ks, dec))
    (bap, bks, bdec), (sap, sks, sdec) = outs
    cmp_ = g.node("SageAttentionCompareImages", (x0 + 1500, 0), [],
                  [("image_a", IMAGE), ("image_b", IMAGE), ("model_a", MODEL), ("model_b", MODEL)],
                  [("heatmap", IMAGE), ("metrics", STRING)])
    g.link(bdec, 0, cmp_, "image_a")
    g.link(sdec, 0, cmp_, "image_b")
    g.link(bap, 0, cmp_, "model_a")
    g.link(sap, 0, cmp_, "model_b")
    heat = g.node("PreviewImage", (x0 + 1850, 0), [], [("images", IMAGE)], [], title="Difference heat-map")
    g.link(cmp_, 0, heat, "images")
    show = g.node("PreviewAny", (x0 + 1850, 300), [], [("source", "*")], [], title="Metrics")
    _link_any(g, cmp_, 1, show)
    rep = g.node("SageAttentionReport", (x0 + 1500, 500), [],
                 [("model", MODEL), ("latent", LATENT), ("baseline_model", MODEL), ("baseline_latent", LATENT)],
                 [("report", STRING)])
    g.link(sap, 0, rep, "model")
    g.link(sks, 0, rep, "latent")
    g.link(bap, 0, rep, "baseline_model")
    g.link(bks, 0, rep, "baseline_latent")
    show2 = g.node("PreviewAny", (x0 + 1850, 550), [], [("source", "*")], [], title="Report")
    _link_any(g, rep, 0, show2)


def _link_any(g, src, slot, dst):
    """Link a typed output into a '*' input (PreviewAny)."""
    g._link += 1
    src["outputs"][slot]["links"].append(g._link)
    dst["inputs"][0]["link"] = g._link
    g.links.append([g._link, src["id"], slot, dst["id"], 0, src["outputs"][slot]["type"]])


def text_encoders(g, clip, positive, negative, x=400):
    p = g.node("CLIPTextEncode", (x, -400), [positive], [("clip", CLIP)], [("CONDITIONING", COND)], title="Positive")
    n = g.node("CLIPTextEncode", (x, -200), [negative], [("clip", CLIP)], [("CONDITIONING", COND)], title="Negative")
    g.link(clip[0], clip[1], p, "clip")
    g.link(clip[0], clip[1], n, "clip")
    return p, n


def sdxl():
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", (0, 0), ["sd_xl_base_1.0.safetensors"], [],
                [("MODEL", MODEL), ("CLIP", CLIP), ("VAE", VAE)])
    p, n = text_encoders(g, (ck, 1), "a photograph of a red fox in a snowy forest, golden hour, detailed fur",
                         "blurry, low quality")
    lat = g.node("EmptyLatentImage", (0, 300), [1024, 1024, 1], [], [("LATENT", LATENT)])
    side_by_side(g, (ck, 0), (p, 0), (n, 0), (lat, 0), (ck, 2), [42, "fixed", 25, 7.0, "euler", "normal", 1.0], 800)
    return g


def flux():
    g = Graph()
    un = g.node("UNETLoader", (0, 0), ["flux1-dev.safetensors", "default"], [], [("MODEL", MODEL)])
    cl = g.node("DualCLIPLoader", (0, 150), ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"], [],
                [("CLIP", CLIP)])
    va = g.node("VAELoader", (0, 350), ["ae.safetensors"], [], [("VAE", VAE)])
    p, n = text_encoders(g, (cl, 0), "a cozy cabin by a mountain lake at dawn, mist over the water", "")
    fg = g.node("FluxGuidance", (400, 0), [3.5], [("conditioning", COND)], [("CONDITIONING", COND)])
    g.link(p, 0, fg, "conditioning")
    lat = g.node("EmptySD3LatentImage", (0, 500), [1024, 1024, 1], [], [("LATENT", LATENT)])
    side_by_side(g, (un, 0), (fg, 0), (n, 0), (lat, 0), (va, 0), [42, "fixed", 20, 1.0, "euler", "simple", 1.0], 800)
    return g


def wan_inputs(g):
    """Wan 2.1 T2V 1.3B loaders, prompts and an empty 33-frame latent: (model, positive, negative, latent, vae)."""
    un = g.node("UNETLoader", (0, 0), ["wan2.1_t2v_1.3B_fp16.safetensors", "default"], [], [("MODEL", MODEL)])
    ms = g.node("ModelSamplingSD3", (0, 150), [8.0], [("model", MODEL)], [("MODEL", MODEL)])
    g.link(un, 0, ms, "model")
    cl = g.node("CLIPLoader", (0, 300), ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"], [],
                [("CLIP", CLIP)])
    va = g.node("VAELoader", (0, 450), ["wan_2.1_vae.safetensors"], [], [("VAE", VAE)])
    p, n = text_encoders(g, (cl, 0), "a cat walks on the grass, realistic style, soft daylight",
                         "static, blurry, low quality, worst quality, deformed")
    lat = g.node("EmptyHunyuanLatentVideo", (0, 600), [832, 480, 33, 1], [], [("LATENT", LATENT)])
    return (ms, 0), (p, 0), (n, 0), (lat, 0), (va, 0)


WAN_SAMPLER = [42, "fixed", 30, 6.0, "uni_pc", "simple", 1.0]


def wan_t2v():
    g = Graph()
    inputs = wan_inputs(g)
    st = g.node("SageAttentionStepSchedule", (400, 600), ["", "0-1, -1"], [("schedule", SCHED)], [("schedule", SCHED)],
                title="Exact on the first 2 and the last step")
    side_by_side(g, *inputs, WAN_SAMPLER, 800, schedule=st, video=True)
    return g


def wan_t2v_sparse():
    g = Graph()

    def sparse(g):
        return g.node("SageAttentionSparse", (800, 420), ["calibrated", 0.9, "0-1", 0.05], [("model", MODEL)],
                      [("MODEL", MODEL)], title="Sparse self-attention (calibrated; dense on the first 2 steps)",
                      size=(320, 160))

    side_by_side(g, *wan_inputs(g), WAN_SAMPLER, 800, video=True, post=sparse)
    return g


def ltxv():
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", (0, 0), ["ltx-video-2b-v0.9.5.safetensors"], [],
                [("MODEL", MODEL), ("CLIP", CLIP), ("VAE", VAE)])
    cl = g.node("CLIPLoader", (0, 200), ["t5xxl_fp16.safetensors", "ltxv", "default"], [], [("CLIP", CLIP)])
    p, n = text_encoders(g, (cl, 0), "waves rolling onto a rocky beach at sunset, cinematic, smooth camera pan",
                         "worst quality, inconsistent motion, blurry, jittery, distorted")
    cond = g.node("LTXVConditioning", (400, 0), [25.0], [("positive", COND), ("negative", COND)],
                  [("positive", COND), ("negative", COND)])
    g.link(p, 0, cond, "positive")
    g.link(n, 0, cond, "negative")
    lat = g.node("EmptyLTXVLatentVideo", (0, 400), [768, 512, 97, 1], [], [("LATENT", LATENT)])
    bl = g.node("SageAttentionBlockSchedule", (400, 400), ["", "0, 27", "all"], [("schedule", SCHED)],
                [("schedule", SCHED)], title="Exact on the first and last block")
    side_by_side(g, (ck, 0), (cond, 0), (cond, 1), (lat, 0), (ck, 2), [42, "fixed", 30, 3.0, "euler", "simple", 1.0],
                 800, schedule=bl, video=True)
    return g


WORKFLOWS = {
    "sdxl_image_sage_compare": (sdxl, "SDXL image: default vs SageAttention"),
    "flux_image_sage_compare": (flux, "Flux image: default vs SageAttention"),
    "wan21_t2v_step_schedule": (wan_t2v, "Wan 2.1 text-to-video with a step schedule"),
    "ltxv_t2v_block_schedule": (ltxv, "LTXV text-to-video with a block schedule"),
    "wan21_t2v_sparse": (wan_t2v_sparse, "Wan 2.1 text-to-video with sparse self-attention"),
}


def main():
    for name, (build, title) in WORKFLOWS.items():
        build().dump(HERE / f"{name}.json", title)
        print("wrote", HERE / f"{name}.json")


if __name__ == "__main__":
    main()
