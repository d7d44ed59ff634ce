"""The shipped workflows, defined once in API format, and the UI-format (canvas) files made from them.

`python scripts/shipped_workflows.py` boots the real host, reads /object_info (widget order, output types) and
writes workflows/<name>.json (UI format, drag onto the canvas; also listed in the template browser) and
workflows/api/<name>.json (API format, for POST /prompt). `use_models()` points a workflow's loaders at
other files, which is how the demo and the tests run them on the tiny models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"

PROMPT = "a red fox running through fresh snow in a pine forest at sunrise, cinematic"
OFFICIAL = {
    "1.3": {"dit": "OpenSora-STDiT-v4/", "vae": "OpenSora-VAE-v1.3/", "t5": "t5xxl_fp16.safetensors"},
    "1.2": {"dit": "OpenSora-STDiT-v3/", "vae": "OpenSora-VAE-v1.2/", "t5": "t5xxl_fp16.safetensors"},
}
MODEL_FIELDS = {
    "OpenSoraLoadDiT": ("dit_name", "dit"),
    "OpenSoraLoadVAE": ("vae_name", "vae"),
    "OpenSoraLoadTextEncoder": ("t5_name", "t5"),
}


def t2v(version: str, resolution: str, aspect: str, frames: int, cfg: float, aes: float) -> dict:
    names = OFFICIAL[version]
    return {
        "1": {
            "class_type": "OpenSoraLoadDiT",
            "inputs": {"dit_name": names["dit"], "weight_dtype": "default", "attention": "sdpa"},
        },
        "2": {
            "class_type": "OpenSoraLoadTextEncoder",
            "inputs": {"t5_name": names["t5"], "precision": "default", "version": version},
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
        "6": {"class_type": "OpenSoraLoadVAE", "inputs": {"vae_name": names["vae"], "dtype": "default"}},
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


def definitions() -> dict[str, dict]:
    out = {
        "opensora13_t2v": t2v("1.3", "360p", "9:16", 49, 7.5, 6.5),
        "opensora13_i2v": i2v13(),
        "opensora12_t2v": t2v("1.2", "360p", "9:16", 51, 7.0, 6.5),
    }
    from workflows_v2 import definitions_v2

    return {**out, **definitions_v2()}


def use_models(prompt: dict, names: dict[str, str]) -> dict:
    """A copy of an API workflow whose loaders read other files: names has keys dit / vae / t5."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        field = MODEL_FIELDS.get(node["class_type"])
        if field and field[1] in names:
            node["inputs"][field[0]] = names[field[1]]
    return out


# -- UI format ----------------------------------------------------------------------------------------
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
                "pos": [40 + 330 * (position % columns), 60 + 400 * (position // columns)],
                "size": [300, 200],
                "flags": {},
                "order": position,
                "mode": 0,
                "inputs": inputs,
                "outputs": outputs,
                "properties": {"Node name for S&R": node["class_type"]},
                "widgets_values": widget_values,
            }
        )
    by_id = {n["id"]: n for n in nodes}
    for link in links:
        by_id[link[1]]["outputs"][link[2]]["links"].append(link[0])
    return {
        "last_node_id": max(by_id),
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
