"""Run in ComfyUI's venv (see tests/test_comfyui_real.py): each pack node's patch on ComfyUI's own UNet, sampled by
ComfyUI's own sampling code, against the studio's UNet with the same adapter in its stack, stepped with the same
Euler updates on ComfyUI's sigmas. Prints one JSON object of measurements.

    python comfyui_parity.py COMFYUI_DIR REPO MODELS_DIR
"""

from __future__ import annotations

import json
import sys
import time

T0 = time.time()
COMFY, REPO, MODELS = sys.argv[1:4]
sys.argv = [sys.argv[0], "--cpu"]
sys.path[:0] = [COMFY, REPO]

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and the machine is shared

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402

folder_paths.models_dir = MODELS
for name in ("checkpoints", "clip_vision", "controlnet"):
    folder_paths.folder_names_and_paths[name] = ([f"{MODELS}/{name}"], folder_paths.supported_pt_extensions)

import comfyui_adapter_studio as pack  # noqa: E402
from comfyui_adapter_studio import block_keys  # noqa: E402

from adapter_studio.pipelines import StudioPipeline  # noqa: E402
from adapter_studio.presets import load_pipeline  # noqa: E402

STEPS, CFG, SEED = 3, 4.0, 7
out: dict = {"import_s": round(time.time() - T0, 1)}

# ComfyUI's key map (comfy.utils.unet_to_diffusers) against the pack's, on the layouts it knows
import comfy.utils  # noqa: E402

SD15 = {"in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1, "context_dim": 768,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "num_heads": 8,
        "use_linear_in_transformer": False, "adm_in_channels": None}
SDXL = {"in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
        "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10, "context_dim": 2048,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "num_head_channels": 64,
        "use_linear_in_transformer": True, "adm_in_channels": 2816}
for name, uc in (("sd15", SD15), ("sdxl", SDXL)):
    theirs = comfy.utils.unet_to_diffusers(uc)
    cfg = block_keys.diffusers_config(uc)
    ours = {}
    for d, o in block_keys.unet_key_map(cfg).items():
        for suffix in (".weight", ".bias"):
            ours[d + suffix] = o + suffix
    shared = [k for k in theirs if k in ours]
    out[f"keymap_{name}"] = {"compared": len(shared), "differ": [k for k in shared if theirs[k] != ours[k]][:5]}

# the tiny checkpoint through ComfyUI's own loader (the pack registers the tiny model type)
ckpt = f"{MODELS}/checkpoints/tiny-sd15.safetensors"
model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=True, output_clip=True,
                                                            embedding_directory=None)
out["loaded"] = type(model.model.diffusion_model).__name__
ms = model.model.model_sampling

pipe = load_pipeline("tiny-sd15")
sp = StudioPipeline(pipe)
unet = pipe.unet

g = torch.Generator().manual_seed(SEED)
H = W = 8
noise = torch.randn(1, 4, H, W, generator=g)
cond = torch.randn(1, 77, 32, generator=g)
uncond = torch.randn(1, 77, 32, generator=g)
positive = [[cond, {}]]
negative = [[uncond, {}]]
sigmas = comfy.samplers.calculate_sigmas(ms, "simple", STEPS).float()


def comfy_run(m, cfg: float) -> torch.Tensor:
    lat = torch.zeros(1, 4, H, W)
    s = comfy.sample.sample(m, noise, STEPS, cfg, "euler", "simple", positive, negative, lat, seed=SEED,
                            disable_pbar=True)
    return s * 0.18215  # ComfyUI returns latents in the VAE's space; the UNet's space is scaled


class Timesteps:  # what the studio stack reads of a scheduler: the run's timesteps (windows are fractions of steps)
    def __init__(self, ts):
        self.timesteps = ts


def studio_run(cfg: float) -> torch.Tensor:
    """Euler on ComfyUI's sigmas with the studio's UNet and stack (eps prediction, CFG as ComfyUI does it)."""
    ts = torch.stack([ms.timestep(s[None])[0] for s in sigmas[:-1]]).float()
    x = noise * torch.sqrt(1.0 + sigmas[0] ** 2)
    use_cfg = cfg != 1.0
    with torch.no_grad(), sp.stack.sampling(scheduler=Timesteps(ts), cfg=use_cfg):
        for i in range(STEPS):
            s, s_next = sigmas[i], sigmas[i + 1]
            x_in = x / torch.sqrt(s ** 2 + 1.0)
            if use_cfg:
                eps_u, eps_c = unet(torch.cat([x_in, x_in]), ts[i].expand(2),
                                    encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
                eps = eps_u + cfg * (eps_c - eps_u)
            else:
                eps = unet(x_in, ts[i].expand(1), encoder_hidden_states=cond).sample
            x = x + eps * (s_next - s)
    return x


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"max_abs": float((a - b).abs().max()), "scale": float(b.abs().max())}


t = time.time()
plain_c = comfy_run(model, CFG)
plain_s = studio_run(CFG)
out["plain"] = compare(plain_c, plain_s)
nodes = pack.NODE_CLASS_MAPPINGS

# IP-Adapter: CLIP vision encodes the image in ComfyUI; the studio gets the same embeddings
cv = nodes["AdapterStudioCLIPVisionLoader"]().load(clip_name="tiny-sd15-image-encoder.safetensors")[0]
image = torch.rand(1, 48, 40, 3, generator=g)
mask = torch.zeros(1, 64, 64)
mask[:, :, :32] = 1.0
ip_w = nodes["AdapterStudioIPAdapterLoader"]().load(weights="tiny-ip.safetensors")[0]
for label, extra in (("ip", {}), ("ip_mask_window", {"mask": mask, "start_at": 0.34, "end_at": 1.0}),
                     ("ip_style_only", {"blocks": "style only"})):
    args = {"combine": "concat", "blocks": "all blocks", "custom_scale": "", "weight": 0.8, "start_at": 0.0,
            "end_at": 1.0, **extra}
    m_ip = nodes["AdapterStudioApplyIPAdapter"]().apply(model=model, ip=ip_w, clip_vision=cv, image=image, **args)[0]
    got = comfy_run(m_ip, CFG)
    from comfyui_adapter_studio.glue import load_adapter
    from adapter_studio.block_scale import block_preset_scale

    adapter = load_adapter(ip_w, model)
    embeds = cv.encode_image(image)["image_embeds"].float()
    scale = 0.8 if args["blocks"] == "all blocks" else block_preset_scale(args["blocks"], 0.8, unet.config)
    inputs = {"image_embeds": embeds[None]}
    if "mask" in extra:
        inputs["mask"] = mask
    sp.add(adapter, name="ip", scale=scale, start=args["start_at"], end=args["end_at"], **inputs)
    want = studio_run(CFG)
    sp.remove("ip")
    out[label] = {**compare(got, want), "effect": float((want - plain_s).abs().max())}

# AGD: w on the conditional pass, cfg 1
agd_w = nodes["AdapterStudioAGDLoader"]().load(weights="tiny-agd/diffusion_pytorch_model.safetensors")[0]
m_agd = nodes["AdapterStudioApplyAGD"]().apply(model=model, agd=agd_w, guidance_scale=5.0, weight=1.0, start_at=0.0,
                                               end_at=1.0)[0]
got = comfy_run(m_agd, 1.0)
from comfyui_adapter_studio.glue import load_adapter  # noqa: E402

sp.add(load_adapter(agd_w, model), name="agd", guidance_scale=5.0)
want = studio_run(1.0)
sp.remove("agd")
plain1 = studio_run(1.0)
out["agd"] = {**compare(got, want), "effect": float((want - plain1).abs().max())}


def defaults(cls, **given):
    """Every declared input of a node: `given`, else its widget default (or first choice)."""
    args = {}
    for key, entry in cls.INPUT_TYPES()["required"].items():
        if key in given:
            args[key] = given[key]
        elif isinstance(entry[0], list):
            args[key] = entry[1].get("default", entry[0][0]) if len(entry) > 1 else entry[0][0]
        elif len(entry) > 1 and "default" in entry[1]:
            args[key] = entry[1]["default"]
    return {**args, **{k: v for k, v in given.items() if k not in args}}


# Ctrl: a ControlNet (tiny-sd15's own backbone, no adapter) as a ComfyUI ControlNet object on the MODEL
from comfyui_adapter_studio.glue import pil_images  # noqa: E402

loader = nodes["AdapterStudioCtrlAdapterLoader"]
ctrl_w = loader().load(**defaults(loader, controlnet="tiny-cn/diffusion_pytorch_model.safetensors"))[0]
hint = torch.rand(1, 64, 64, 3, generator=g)
apply = nodes["AdapterStudioApplyCtrlAdapter"]
m_ctrl = apply().apply(**defaults(apply, model=model, ctrl=ctrl_w, image=hint, conditioning_scale=0.9, weight=0.8))[0]
got = comfy_run(m_ctrl, CFG)
sp.add(load_adapter(ctrl_w.weights, model), name="ctrl", scale=0.8, image=pil_images(hint)[0], conditioning_scale=0.9)
want = studio_run(CFG)
sp.remove("ctrl")
out["ctrl"] = {**compare(got, want), "effect": float((want - plain_s).abs().max())}

# I2V: attn1 over the latent batch as one clip, frame 0 pinned. The studio runs it on tiny-video (tiny-sd15 + motion
# modules) with the motion modules made identities (their output projections zeroed), i.e. the same image UNet per
# frame, which is what ComfyUI's UNet is without AnimateDiff.
from comfyui_adapter_studio.families import first_frame_latent  # noqa: E402

F = 4
loader, apply = nodes["AdapterStudioI2VAdapterLoader"], nodes["AdapterStudioApplyI2VAdapter"]
i2v_w = loader().load(weights="tiny-i2v/diffusion_pytorch_model.safetensors")[0]
first_image = torch.rand(1, 64, 64, 3, generator=g)
m_i2v, latent = apply().apply(**defaults(apply, model=model, i2v=i2v_w, vae=vae, image=first_image, weight=1.0,
                                         width=64, height=64, num_frames=F))
noise_v = torch.randn(F, 4, H, W, generator=g)
got_v = comfy.sample.sample(m_i2v, noise_v, STEPS, CFG, "euler", "simple", positive, negative, latent["samples"],
                            noise_mask=latent["noise_mask"], seed=SEED, disable_pbar=True) * 0.18215
video = load_pipeline("tiny-video")
vunet = video.unet
with torch.no_grad():
    for name, mod in vunet.named_modules():
        if "motion_modules" in name and name.endswith("proj_out"):
            mod.weight.zero_()
            mod.bias.zero_()
vsp = StudioPipeline(video)
vsp.add(load_adapter(i2v_w, model).to(torch.float32), name="i2v",
        image_latents=first_frame_latent(vae, first_image, 64, 64) * 0.18215)
ts = torch.stack([ms.timestep(s[None])[0] for s in sigmas[:-1]]).float()
x = (noise_v * torch.sqrt(1.0 + sigmas[0] ** 2) + latent["samples"] * 0.18215).permute(1, 0, 2, 3)[None]
with torch.no_grad(), vsp.stack.sampling(scheduler=Timesteps(ts), cfg=True):
    for i in range(STEPS):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_in = x / torch.sqrt(s ** 2 + 1.0)
        eps_u, eps_c = vunet(torch.cat([x_in, x_in]), ts[i].expand(2),  # AnimateDiff: prompt tokens per frame
                             encoder_hidden_states=torch.cat([uncond, cond]).repeat_interleave(F, 0)).sample.chunk(2)
        x = x + (eps_u + CFG * (eps_c - eps_u)) * (s_next - s)
want_v = x[0].permute(1, 0, 2, 3)
vsp.remove("i2v")
out["i2v"] = {**compare(got_v[1:], want_v[1:]), "effect": 0.0,
              "frame0": float((got_v[0] - first_frame_latent(vae, first_image, 64, 64)[0] * 0.18215).abs().max())}
m_plain_v = model.clone()
got_plain = comfy.sample.sample(m_plain_v, noise_v, STEPS, CFG, "euler", "simple", positive, negative,
                                latent["samples"], noise_mask=latent["noise_mask"], seed=SEED,
                                disable_pbar=True) * 0.18215
out["i2v"]["effect"] = float((got_v[1:] - got_plain[1:]).abs().max())
out["sampling_s"] = round(time.time() - t, 1)
out["total_s"] = round(time.time() - T0, 1)
print(json.dumps(out))
