"""The shipped workflows, defined once in API format, and the UI-format (canvas) files made from them.

`python scripts/shipped_workflows.py` boots the real host, reads /object_info (widget order, output types) and
writes workflows/<name>.json (UI format, drag onto the canvas; also listed in the template browser) and
workflows/api/<name>.json (API format, for POST /prompt). The 1.x workflows are defined here, the 2.0 ones in
workflows_v2.py. `use_models()` points any workflow's loaders at other files by role (OFFICIAL) and
`tiny_settings()` shrinks sizes and steps, which is how the demo and the tests run them on the tiny models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"

PROMPT = "a red fox running through fresh snow in a pine forest at sunrise, cinematic"
# Role -> the official file a shipped workflow loads; use_models() swaps files by role (the tiny models' roles).
OFFICIAL = {
    "dit_1.3": "OpenSora-STDiT-v4/",
    "vae_1.3": "OpenSora-VAE-v1.3/",
    "dit_1.2": "OpenSora-STDiT-v3/",
    "vae_1.2": "OpenSora-VAE-v1.2/",
    "t5": "t5xxl_fp16.safetensors",  # every version's T5, and FLUX's in the 2.0 t2i2v first frame
    "dit_2.0": "Open_Sora_v2.safetensors",
    "vae_2.0": "hunyuan_vae.safetensors",
    "clip_l_2.0": "clip_l.safetensors",
    "flux": "flux1-dev.safetensors",
    "flux_ae": "ae.safetensors",  # BFL's name; Open-Sora's HF repo ships the same weights as flux1-dev-ae.safetensors
    "dit_dcae": "Open_Sora_v2_Video_DC_AE.safetensors",  # hpcai-tech/Open-Sora-v2-Video-DC-AE
    "vae_dcae": "F32T4C128_AE.safetensors",
}
# Where each official file comes from: (Hugging Face repo, models/ subfolder). A name ending in "/" is the repo's whole
# folder (the 1.x models); a file is also given to the frontend as node properties.models (name, url, directory), so
# its missing-models dialog offers the download when the workflow is opened without it.
SOURCES = {
    "OpenSora-STDiT-v4/": ("hpcai-tech/OpenSora-STDiT-v4", "diffusion_models"),
    "OpenSora-VAE-v1.3/": ("hpcai-tech/OpenSora-VAE-v1.3", "vae"),
    "OpenSora-STDiT-v3/": ("hpcai-tech/OpenSora-STDiT-v3", "diffusion_models"),
    "OpenSora-VAE-v1.2/": ("hpcai-tech/OpenSora-VAE-v1.2", "vae"),
    "t5xxl_fp16.safetensors": ("comfyanonymous/flux_text_encoders", "text_encoders"),
    "clip_l.safetensors": ("comfyanonymous/flux_text_encoders", "text_encoders"),
    "Open_Sora_v2.safetensors": ("hpcai-tech/Open-Sora-v2", "diffusion_models"),
    "hunyuan_vae.safetensors": ("hpcai-tech/Open-Sora-v2", "vae"),
    "Open_Sora_v2_Video_DC_AE.safetensors": ("hpcai-tech/Open-Sora-v2-Video-DC-AE", "diffusion_models"),
    "F32T4C128_AE.safetensors": ("hpcai-tech/Open-Sora-v2-Video-DC-AE", "vae"),
    "flux1-dev.safetensors": ("hpcai-tech/Open-Sora-v2", "diffusion_models"),  # the official t2i2v's copy (BFL layout)
    "ae.safetensors": ("black-forest-labs/FLUX.1-schnell", "vae"),  # the same FLUX autoencoder, not gated
}
FILE_FIELDS = ("dit_name", "vae_name", "t5_name", "clip_name", "unet_name", "clip_name1", "clip_name2")
# A CPU-sized latent per Empty Latent Video version, for tiny_settings(): the 1.x presets, 2.0 at exact pixels.
TINY_SIZE = 64
TINY_LATENTS = {
    "1.3": {"resolution": "144p", "aspect_ratio": "9:16", "num_frames": 17},
    "1.2": {"resolution": "144p", "aspect_ratio": "9:16", "num_frames": 17},
    "2.0": {"width": TINY_SIZE, "height": TINY_SIZE, "num_frames": 9},  # 4k + 1 (causal VAE)
    "2.0 DC-AE": {"width": TINY_SIZE, "height": TINY_SIZE, "num_frames": 8},  # 4k
}
TINY_LOOPED_FRAMES = 33  # 1.3: 10 latent frames, 1.2: 9


def t2v(version: str, resolution: str, aspect: str, frames: int, cfg: float, aes: float) -> dict:
    return {
        "1": {
            "class_type": "OpenSoraLoadDiT",
            "inputs": {"dit_name": OFFICIAL[f"dit_{version}"], "weight_dtype": "default", "attention": "sdpa"},
        },
        "2": {
            "class_type": "OpenSoraLoadTextEncoder",
            "inputs": {"t5_name": OFFICIAL["t5"], "precision": "default", "version": version},
        },
        "3": {
            "class_type": "OpenSoraEncodePrompt",
            "inputs": {"text_encoder": ["2", 0], "prompt": PROMPT, "negative_prompt": "", "aesthetic_score": aes},
        },
        "4": {
            "class_type": "OpenSoraEmptyLatentVideo",
            "inputs": {
                "version": version,
                "resolution": resolution,
                "aspect_ratio": aspect,
                "num_frames": frames,
                "batch_size": 1,
            },
        },
        "5": {
            "class_type": "OpenSoraSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["3", 0],
                "negative": ["3", 1],
                "latent": ["4", 0],
                "seed": 1024,
                "steps": 30,
                "cfg": cfg,
            },
        },
        "6": {"class_type": "OpenSoraLoadVAE", "inputs": {"vae_name": OFFICIAL[f"vae_{version}"], "dtype": "default"}},
        "7": {"class_type": "OpenSoraDecode", "inputs": {"vae": ["6", 0], "latent": ["5", 0]}},
        "8": {"class_type": "CreateVideo", "inputs": {"images": ["7", 0], "fps": 24.0}},
        "9": {
            "class_type": "SaveVideo",
            "inputs": {
                "video": ["8", 0],
                "filename_prefix": f"opensora/v{version.replace('.', '')}",
                "format": "auto",
                "codec": "auto",
            },
        },
    }


def i2v13() -> dict:
    prompt = t2v("1.3", "360p", "9:16", 49, 7.5, 7.0)
    prompt["10"] = {"class_type": "LoadImage", "inputs": {"image": "opensora_reference.png"}}
    prompt["11"] = {
        "class_type": "OpenSoraEncodeReference",
        "inputs": {"vae": ["6", 0], "image": ["10", 0], "latent": ["4", 0], "cond_type": "i2v_head"},
    }
    prompt["5"]["inputs"].update(latent=["11", 0], image_cfg=5.0)
    prompt["9"]["inputs"]["filename_prefix"] = "opensora/v13_i2v"
    return prompt


def long13() -> dict:
    """1.3 long video (official --loop): three 49-frame chunks, each continuing the last 5 latent frames of the one
    before, one prompt segment per loop: 15 + 10 + 10 latent frames, 113 frames."""
    prompt = t2v("1.3", "360p", "9:16", 49, 7.5, -1.0)
    prompt["3"]["inputs"]["prompt"] = LOOP_PROMPT
    prompt["5"]["inputs"].update(loops=3, condition_frame_length=5, condition_frame_edit=0.0)
    prompt["9"]["inputs"]["filename_prefix"] = "opensora/v13_long"
    return prompt


LOOP_PROMPT = (
    "|0| a red fox walking through fresh snow in a pine forest at sunrise, cinematic "
    "|1| the red fox stops and looks around in the snowy pine forest, cinematic "
    "|2| the red fox runs away between the snowy pine trees, cinematic"
)


def definitions() -> dict[str, dict]:
    out = {
        "opensora13_t2v": t2v("1.3", "360p", "9:16", 49, 7.5, -1.0),
        "opensora13_i2v": i2v13(),
        "opensora13_long": long13(),
        "opensora12_t2v": t2v("1.2", "360p", "9:16", 51, 7.0, 6.5),
    }
    from workflows_v2 import definitions_v2

    return {**out, **definitions_v2()}


def use_models(prompt: dict, names: dict[str, str]) -> dict:
    """A copy of an API workflow (any version) whose loaders read other files.

    names: roles as in OFFICIAL (install_tiny_models / install_tiny_models_v2 return them); a role not in names
    keeps its file. Core DualCLIPLoader only loads a full-size T5-XXL, so unless names also has "flux_t5" and
    "flux_clip_l" (files core can load), the DualCLIPLoader + CLIPTextEncode pair is removed and FluxGuidance takes
    Open-Sora Encode Prompt's positive output instead: same [T5 states, pooled_output] layout, but the 2.0 text
    (with its fps / motion suffix).
    """
    out = json.loads(json.dumps(prompt))
    file_roles = {name: role for role, name in OFFICIAL.items()}
    core_text = "flux_t5" in names and "flux_clip_l" in names
    for node in out.values():
        inputs = node["inputs"]
        if node["class_type"] == "DualCLIPLoader" and core_text:
            inputs.update(clip_name1=names["flux_t5"], clip_name2=names["flux_clip_l"])
            continue
        for field in FILE_FIELDS:
            role = file_roles.get(inputs.get(field))
            if role in names:
                inputs[field] = names[role]
    if not core_text:
        clip_nodes = {k for k, n in out.items() if n["class_type"] in ("DualCLIPLoader", "CLIPTextEncode")}
        encoder = next((k for k, n in out.items() if n["class_type"] == "OpenSoraEncodePrompt"), None)
        if clip_nodes and encoder is not None:
            for key in clip_nodes:
                del out[key]
            for node in out.values():
                for field, value in node["inputs"].items():
                    if isinstance(value, list) and len(value) == 2 and value[0] in clip_nodes:
                        node["inputs"][field] = [encoder, 0]
    return out


def tiny_settings(prompt: dict, steps: int = 4, image_steps: int = 2, **latent) -> dict:
    """A copy at a CPU-friendly size: TINY_LATENTS for the video (`latent` overrides it; a looping Sampler's latent
    gets TINY_LOOPED_FRAMES), steps for the Sampler, and a TINY_SIZE FLUX first frame with image_steps."""
    out = json.loads(json.dumps(prompt))
    samplers = [node["inputs"] for node in out.values() if node["class_type"] == "OpenSoraSampler"]
    if any(inputs.get("loops", 1) > 1 for inputs in samplers):  # chunks need more than the 5 frames they continue
        latent = {"num_frames": TINY_LOOPED_FRAMES, **latent}
    for node in out.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "OpenSoraEmptyLatentVideo":
            inputs.update({**TINY_LATENTS[inputs["version"]], **latent})
        elif kind == "OpenSoraSampler":
            inputs["steps"] = steps
        elif kind in ("EmptySD3LatentImage", "ModelSamplingFlux"):
            inputs.update(width=TINY_SIZE, height=TINY_SIZE)
        elif kind == "KSampler":
            inputs["steps"] = image_steps
    return out


# -- UI format ----------------------------------------------------------------------------------------
def model_files(prompt: dict) -> list[str]:
    """The official files and folders an API workflow's loaders read, in node order, each once."""
    found = [n["inputs"].get(f) for _, n in sorted(prompt.items(), key=lambda item: int(item[0])) for f in FILE_FIELDS]
    return list(dict.fromkeys(name for name in found if name in SOURCES))


def model_properties(node: dict) -> dict:
    """The frontend's properties.models for a loader node: the single official files it loads."""
    models = [
        {
            "name": name,
            "url": f"https://huggingface.co/{SOURCES[name][0]}/resolve/main/{name}",
            "directory": SOURCES[name][1],
        }
        for name in (node["inputs"].get(field) for field in FILE_FIELDS)
        if name in SOURCES and not name.endswith("/")
    ]
    return {"models": models} if models else {}


def models_note(prompt: dict) -> str:
    """The text of the Note each UI workflow opens with: which files it loads, from where, into which folder."""
    lines = ["Models this workflow loads (download each, put it in ComfyUI/models/<folder>, then press R):"]
    for name in model_files(prompt):
        repo, directory = SOURCES[name]
        if name.endswith("/"):
            lines.append(f"- {name} = the whole folder of https://huggingface.co/{repo} -> models/{directory}/{name}")
        else:
            lines.append(f"- {name} from https://huggingface.co/{repo} -> models/{directory}/")
    images = [n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"]
    if images:
        lines.append(f"Load Image: pick your own picture in place of {' and '.join(images)}.")
    lines.append("Smaller files (fp8, GGUF) and the other checkpoints: the Model files table of the pack's README.")
    return "\n".join(lines)


def _widget_names(spec: dict) -> list[str]:
    names = []
    for section in ("required", "optional"):
        for name, entry in spec["input"].get(section, {}).items():
            kind = entry[0]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
    return names


def to_ui(prompt: dict, object_info: dict) -> dict:
    nodes, links = [], []
    order = sorted(prompt, key=int)
    columns = 6 if len(order) > 10 else 5  # wide rather than tall: fits a screen at a readable zoom
    for position, node_id in enumerate(order):
        node = prompt[node_id]
        spec = object_info[node["class_type"]]
        widget_values, inputs = [], []
        for name in _widget_names(spec):
            value = node["inputs"].get(name)
            if value is None:
                entry = spec["input"].get("required", {}).get(name) or spec["input"]["optional"][name]
                options = entry[1] if len(entry) > 1 else {}
                value = options.get("default", entry[0][0] if isinstance(entry[0], list) else None)
            widget_values.append(value)
            if name == "seed":
                widget_values.append("fixed")
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                source = prompt[value[0]]
                out_type = object_info[source["class_type"]]["output"][value[1]]
                link_id = len(links) + 1
                links.append([link_id, int(value[0]), value[1], int(node_id), len(inputs), out_type])
                inputs.append({"name": name, "type": out_type, "link": link_id})
        outputs = [
            {"name": name, "type": kind, "links": [], "slot_index": i}
            for i, (name, kind) in enumerate(zip(spec["output_name"], spec["output"]))
        ]
        nodes.append(
            {
                "id": int(node_id),
                "type": node["class_type"],
                "pos": [40 + 330 * (position % columns), 60 + 520 * (position // columns)],
                "size": [300, 200],
                "flags": {},
                "order": position,
                "mode": 0,
                "inputs": inputs,
                "outputs": outputs,
                "properties": {"Node name for S&R": node["class_type"], **model_properties(node)},
                "widgets_values": widget_values,
            }
        )
    by_id = {n["id"]: n for n in nodes}
    for link in links:
        by_id[link[1]]["outputs"][link[2]]["links"].append(link[0])
    note_id = max(by_id) + 1  # a frontend-only Note (never queued), above the graph
    nodes.append(
        {
            "id": note_id,
            "type": "Note",
            "pos": [40, -300],
            "size": [900, 260],
            "flags": {},
            "order": len(nodes),
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {},
            "widgets_values": [models_note(prompt)],
            "color": "#432",
            "bgcolor": "#653",
        }
    )
    return {
        "last_node_id": note_id,
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
        "version": 0.4,
    }


def main() -> int:
    sys.path.insert(0, str(REPO / "scripts"))
    from comfy_host import ComfyServer

    (WORKFLOWS / "api").mkdir(parents=True, exist_ok=True)
    with ComfyServer() as server:
        object_info = server.get_json("/object_info")
    for name, prompt in definitions().items():
        (WORKFLOWS / "api" / f"{name}.json").write_text(json.dumps(prompt, indent=1) + "\n")
        (WORKFLOWS / f"{name}.json").write_text(json.dumps(to_ui(prompt, object_info), indent=1) + "\n")
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
