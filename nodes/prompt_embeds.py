"""Save encoded prompts (CONDITIONING) to a safetensors file and load them back, so later runs need no text
encoder: the 2.0 T5-XXL alone is 9.5 GB in bf16, loaded from disk and kept in RAM next to the 23.8 GB DiT.

Files go to output/opensora_prompts/ and are listed from there and from models/opensora_prompts/. Every tensor of
the conditioning (the T5 states, CLIP pooled vector, attention mask, ...) is stored as is; the other entries
(version, prompt text, flags, numbers) go into the safetensors metadata as JSON. Nothing is unpickled; entries
that are neither (e.g. a ControlNet object attached by a later node) are refused by name.
"""

from __future__ import annotations

import itertools
import json
import math
import os

import folder_paths
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..opensora_lib.checkpoint import read_header
from ..opensora_lib.gguf_file import is_gguf
from .common import CATEGORY

FOLDER = "opensora_prompts"
FORMAT, FORMAT_VERSION = "opensora_prompt_embeds", "1"


# models/opensora_prompts as a model folder, so extra_model_paths.yaml can add more ("opensora_prompts: path").
folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
folder_paths.folder_names_and_paths[FOLDER][1].add(".safetensors")


def embed_dirs() -> list[str]:
    """Where saved prompts are looked for: the output folder (where Save writes) first, then the model folders
    (a file of the same name in both is taken from the output folder)."""
    return [os.path.join(folder_paths.get_output_directory(), FOLDER), *folder_paths.get_folder_paths(FOLDER)]


def embed_files() -> list[str]:
    names = set()
    for root in embed_dirs():
        for folder, _dirs, files in os.walk(root):
            for file in files:
                if file.endswith(".safetensors"):
                    names.add(os.path.relpath(os.path.join(folder, file), root).replace(os.sep, "/"))
    return sorted(names)


def embed_path(name: str) -> str:
    for root in embed_dirs():
        path = os.path.abspath(os.path.join(root, name))
        if os.path.commonpath((os.path.abspath(root), path)) == os.path.abspath(root) and os.path.isfile(path):
            return path
    raise FileNotFoundError(f"saved prompt {name!r} not found in {' or '.join(embed_dirs())}")


TENSOR_REF = "__tensor__"  # a tensor inside a list / dict value (Encode Prompt's loop texts): {TENSOR_REF: name}


def _plain(value, key: str, store):
    """A JSON-safe copy of a non-tensor conditioning value (tuples become lists; a tensor inside it goes to
    `store(tensor) -> name` and is written as {TENSOR_REF: name}), or a ValueError naming it."""
    if torch.is_tensor(value):
        return {TENSOR_REF: store(value)}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item, key, store) for item in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value) and TENSOR_REF not in value:
        return {k: _plain(v, key, store) for k, v in value.items()}
    raise ValueError(
        f"The conditioning entry {key!r} ({type(value).__name__}) cannot be saved: only tensors, numbers, text, "
        "booleans and lists / dicts of them can. Save the prompt right after its encoder, before nodes that attach "
        "objects such as ControlNets or hooks."
    )


def _restored(value, read):
    """_plain's value with each {TENSOR_REF: name} read back by `read(name)`."""
    if isinstance(value, list):
        return [_restored(item, read) for item in value]
    if isinstance(value, dict):
        if set(value) == {TENSOR_REF}:
            return read(value[TENSOR_REF])
        return {k: _restored(v, read) for k, v in value.items()}
    return value


def save_conditioning(conditioning: list, path: str) -> None:
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError("Nothing to save: the conditioning is empty.")
    tensors, entries, stored = {}, [], set()

    def own(tensor: torch.Tensor) -> torch.Tensor:
        # entries often share a tensor (core's ConditioningSetTimestepRange / Combine); safetensors refuses shared
        # memory, so a second sight of the same storage is saved as a copy
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in stored:
            return tensor.clone()
        stored.add(pointer)
        return tensor

    for index, (cond, extras) in enumerate(conditioning):
        tensors[f"{index}.cond"] = own(cond)
        entry = {"tensors": [], "values": {}}

        numbers = itertools.count()

        def store(tensor: torch.Tensor, index: int = index, numbers=numbers) -> str:
            name = f"{index}.nested.{next(numbers)}"
            tensors[name] = own(tensor)
            return name

        for key, value in extras.items():
            if torch.is_tensor(value):
                tensors[f"{index}.extra.{key}"] = own(value)
                entry["tensors"].append(key)
            else:
                entry["values"][key] = _plain(value, key, store)
        entries.append(entry)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "entries": json.dumps(entries)}
    save_file(tensors, path, metadata=metadata)


def check_entry(path: str, index: int, entry) -> None:
    """One conditioning entry of the metadata, as save_conditioning writes it."""
    well_formed = (
        isinstance(entry, dict)
        and isinstance(entry.get("tensors"), list)
        and all(isinstance(name, str) for name in entry["tensors"])
        and isinstance(entry.get("values"), dict)
    )
    if not well_formed:
        raise ValueError(
            f"{path} is damaged: conditioning entry {index} of its metadata is {str(entry)[:80]}, not "
            '{"tensors": [names], "values": {...}} as Open-Sora Save Prompt Embeds writes it'
        )


def load_conditioning(path: str) -> list:
    read_header(path)  # refuses pickles, truncated and corrupt files with a specific message
    if is_gguf(path):  # read_header reads GGUF weights too; a prompt is always safetensors
        raise ValueError(
            f"{path} is a GGUF weight file, not a saved Open-Sora prompt: pick a file written by Open-Sora Save Prompt Embeds"
        )
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a saved Open-Sora prompt (no '{FORMAT}' metadata): pick a file written by "
                "Open-Sora Save Prompt Embeds"
            )
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} was saved in prompt format version {metadata.get('format_version')!r}; this pack reads "
                f"version {FORMAT_VERSION}: update the pack or save the prompt again"
            )
        try:
            entries = json.loads(metadata["entries"])
        except (KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is damaged: its prompt metadata is unreadable ({error})") from None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{path} is damaged: it lists no conditioning entries")
        available = set(f.keys())
        conditioning = []
        for index, entry in enumerate(entries):
            check_entry(path, index, entry)
            names = [f"{index}.cond"] + [f"{index}.extra.{key}" for key in entry["tensors"]]
            missing = [name for name in names if name not in available]
            if missing:
                raise ValueError(f"{path} is damaged: tensor(s) {missing} listed in its metadata are missing")

            def read(name: str, index: int = index) -> torch.Tensor:
                if not isinstance(name, str) or not name.startswith(f"{index}.nested.") or name not in available:
                    raise ValueError(f"{path} is damaged: tensor {name!r} listed in its metadata is missing")
                return f.get_tensor(name)

            extras = _restored(dict(entry["values"]), read)
            extras.update({key: f.get_tensor(f"{index}.extra.{key}") for key in entry["tensors"]})
            conditioning.append([f.get_tensor(f"{index}.cond"), extras])
    return conditioning


class OpenSoraSavePromptEmbeds:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING", {"tooltip": "From Open-Sora Encode Prompt (or any text encoder)."}),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "opensora_prompt",
                        "tooltip": f"File name in output/{FOLDER}/; a counter is added. Subfolders with '/'.",
                    },
                ),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = f"{CATEGORY}/conditioning"
    DESCRIPTION = (
        "Save an encoded prompt (every tensor exact) so that later runs load it with Open-Sora Load Prompt Embeds "
        "and need no text encoder. Passes the conditioning through."
    )

    def save(self, conditioning, filename_prefix):
        root = os.path.join(folder_paths.get_output_directory(), FOLDER)
        folder, name, counter, subfolder, _prefix = folder_paths.get_save_image_path(filename_prefix, root)
        os.makedirs(folder, exist_ok=True)
        file = f"{name}_{counter:05}_.safetensors"
        save_conditioning(conditioning, os.path.join(folder, file))
        saved = os.path.join(subfolder, file).replace(os.sep, "/")
        return {"ui": {"text": [f"saved {FOLDER}/{saved}"]}, "result": (conditioning,)}


class OpenSoraLoadPromptEmbeds:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompt_file": (
                    embed_files(),
                    {
                        "tooltip": f"A prompt saved by Open-Sora Save Prompt Embeds (output/{FOLDER} or models/{FOLDER})."
                    },
                )
            }
        }

    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "prompt")
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/conditioning"
    DESCRIPTION = "Load a saved encoded prompt: the same CONDITIONING as when it was encoded, no text encoder needed."

    @classmethod
    def IS_CHANGED(cls, prompt_file):
        try:
            stat = os.stat(embed_path(prompt_file))
        except FileNotFoundError:
            return ""
        return f"{stat.st_mtime_ns}-{stat.st_size}"

    def load(self, prompt_file):
        conditioning = load_conditioning(embed_path(prompt_file))
        return (conditioning, str(conditioning[0][1].get("opensora_text", "")))


NODE_CLASS_MAPPINGS = {
    "OpenSoraSavePromptEmbeds": OpenSoraSavePromptEmbeds,
    "OpenSoraLoadPromptEmbeds": OpenSoraLoadPromptEmbeds,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "OpenSoraSavePromptEmbeds": "Open-Sora Save Prompt Embeds",
    "OpenSoraLoadPromptEmbeds": "Open-Sora Load Prompt Embeds",
}
