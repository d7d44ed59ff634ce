"""Open-Sora Save / Load Prompt Embeds: an encoded prompt saved to safetensors and loaded back is the same
CONDITIONING, and a workflow run from the loaded prompt (no text encoder) gives the same video.

- In-process (the pinned host's folder_paths, a temporary output folder): 2.0 and 1.3 conditioning (T5 states,
  CLIP pooled, attention mask, null caption, text, version) round-trips exactly; bad input gets specific errors.
- Real server over HTTP: the shipped 2.0 text-to-video workflow (tiny models) with both prompts saved, then the
  same workflow with Load Prompt Embeds in place of the text encoder: identical mp4 frames.
"""

from __future__ import annotations

import json

import pytest
import torch


def _conditionings() -> dict:
    gen = torch.Generator().manual_seed(5)
    mask = torch.zeros(1, 300, dtype=torch.long)
    mask[:, :7] = 1
    return {
        "2.0": [
            [
                torch.randn(1, 512, 64, generator=gen),
                {
                    "pooled_output": torch.randn(1, 32, generator=gen).to(torch.bfloat16),
                    "opensora_version": "2.0",
                    "opensora_text": "a red fox in snow. 24 FPS. 4 motion score.",
                },
            ]
        ],
        "1.3 positive": [
            [torch.randn(1, 300, 48, generator=gen), {"attention_mask": mask, "opensora_version": "1.3", "fps": 24}]
        ],
        "1.3 null": [[torch.zeros(1, 1, 1), {"opensora_null_caption": True, "opensora_version": "1.3"}]],
        "1.3 loop texts": [  # Encode Prompt's "|k|" segments: loop 0 is the entry's own tensor
            [
                first := torch.randn(1, 300, 48, generator=gen),
                {
                    "attention_mask": mask,
                    "opensora_version": "1.3",
                    "opensora_loop_texts": [
                        {"cond": first, "attention_mask": mask, "opensora_text": "a fox"},
                        {"cond": torch.randn(1, 300, 48, generator=gen), "attention_mask": mask, "opensora_text": "b"},
                    ],
                },
            ]
        ],
        "shared tensors": [  # core's ConditioningSetTimestepRange + Combine keep one tensor in both entries
            [shared := torch.randn(1, 4, 8, generator=gen), {"start_percent": 0.0, "end_percent": 0.5}],
            [shared, {"start_percent": 0.5, "end_percent": 1.0, "cond": shared[:, :2]}],
        ],
        "two entries": [
            [torch.randn(1, 4, 8, generator=gen), {"start_percent": 0.25, "area": (8, 8, 0, 0), "strength": 1.0}],
            [torch.randn(1, 4, 8, generator=gen), {"opensora_text": "", "nested": {"a": [1, 2.5, None]}}],
        ],
    }


def _same(a, b) -> bool:
    """Equal conditioning (or value): tensors with their dtype, tuples as the lists they come back as."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and sorted(a) == sorted(b) and all(_same(a[k], b[k]) for k in a)
    return a == b and type(a) is type(b)


def probe(out_path: str, work_dir: str) -> None:  # noqa: C901 (one subprocess, many checks)
    """Runs inside ComfyUI (--cpu) with its output / models folders in work_dir. Writes {check: value}."""
    from pathlib import Path

    import folder_paths
    from helpers_comfy_probe import error_of
    from opensora_pack.nodes import prompt_embeds as embeds
    from safetensors.torch import save_file

    work = Path(work_dir)
    folder_paths.set_output_directory(str(work / "output"))
    folder_paths.add_model_folder_path(embeds.FOLDER, str(work / "models" / embeds.FOLDER), is_default=True)
    save, load = embeds.OpenSoraSavePromptEmbeds(), embeds.OpenSoraLoadPromptEmbeds()
    results: dict = {"round_trip": {}}

    for name, conditioning in _conditionings().items():
        out = save.save(conditioning, f"tests/{name.replace(' ', '_')}")
        saved = out["ui"]["text"][0].removeprefix("saved opensora_prompts/")
        loaded, text = load.load(saved)
        results["round_trip"][name] = {
            "passes_through": out["result"][0] is conditioning,
            "listed": saved in load.INPUT_TYPES()["required"]["prompt_file"][0],
            "same": _same(conditioning, loaded),
            "text": text == conditioning[0][1].get("opensora_text", ""),
        }
    results["first_file"] = (work / "output" / "opensora_prompts" / "tests" / "2.0_00001_.safetensors").is_file()
    results["second_save"] = save.save(_conditionings()["2.0"], "tests/2.0")["ui"]["text"][0]

    folder = work / "models" / "opensora_prompts"
    folder.mkdir(parents=True)
    embeds.save_conditioning(_conditionings()["1.3 positive"], str(folder / "shared.safetensors"))
    results["models_listed"] = "shared.safetensors" in load.INPUT_TYPES()["required"]["prompt_file"][0]
    before = load.IS_CHANGED("shared.safetensors")
    embeds.save_conditioning(_conditionings()["2.0"], str(folder / "shared.safetensors"))
    results["is_changed_follows"] = load.IS_CHANGED("shared.safetensors") != before
    results["reloaded_new"] = _same(load.load("shared.safetensors")[0], _conditionings()["2.0"])

    save_file({"img_in.weight": torch.zeros(2, 2)}, str(folder / "a_dit.safetensors"))
    good = folder / "good.safetensors"
    embeds.save_conditioning(_conditionings()["2.0"], str(good))
    (folder / "cut.safetensors").write_bytes(good.read_bytes()[:-100])
    (folder / "pickle.safetensors").write_bytes(b"\x80\x02}q\x00." + bytes(64))
    from helpers_gguf import write_gguf

    write_gguf(folder / "weights.safetensors", {"w": torch.ones(2, 32)})  # a GGUF with a safetensors name
    embeds.save_conditioning(_conditionings()["2.0"], str(work / "models" / "outside.safetensors"))  # a real file
    no_entries = {"format": embeds.FORMAT, "format_version": "1"}
    save_file({"0.cond": torch.zeros(1)}, str(folder / "no_entries.safetensors"), metadata=no_entries)
    metadata = {"format": embeds.FORMAT, "format_version": "1", "entries": "[]"}
    save_file({"0.cond": torch.zeros(1)}, str(folder / "empty_entries.safetensors"), metadata=metadata)
    damaged_entries = {
        "key": [{"x": 1}],
        "int": [1],
        "values": [{"tensors": [], "values": [1]}],
        "nested": [{"tensors": [], "values": {"loops": [{"__tensor__": "0.nested.0"}]}}],
    }
    for name, entries in damaged_entries.items():
        metadata = {"format": embeds.FORMAT, "format_version": "1", "entries": json.dumps(entries)}
        save_file({"0.cond": torch.zeros(1)}, str(folder / f"entries_{name}.safetensors"), metadata=metadata)
    results["errors"] = {
        "object": error_of(lambda: save.save([[torch.zeros(1, 2, 3), {"control": object()}]], "bad")),
        "empty": error_of(lambda: save.save([], "bad")),
        "foreign": error_of(lambda: load.load("a_dit.safetensors")),
        "truncated": error_of(lambda: load.load("cut.safetensors")),
        "pickle": error_of(lambda: load.load("pickle.safetensors")),
        "gguf": error_of(lambda: load.load("weights.safetensors")),
        "outside": error_of(lambda: load.load("../outside.safetensors")),
        "no_entries": error_of(lambda: load.load("no_entries.safetensors")),
        "empty_entries": error_of(lambda: load.load("empty_entries.safetensors")),
        "missing": error_of(lambda: load.load("missing.safetensors")),
        **{f"entries_{n}": error_of(lambda n=n: load.load(f"entries_{n}.safetensors")) for n in damaged_entries},
    }
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from helpers_comfy_probe import run_probe

    work = tmp_path_factory.mktemp("prompt-embeds")
    return run_probe("test_prompt_embeds", work / "results.json", work)


def test_round_trip_through_the_nodes_is_exact(measured):
    for name, checks in measured["round_trip"].items():
        assert checks == {"passes_through": True, "listed": True, "same": True, "text": True}, name
    assert measured["first_file"]
    assert measured["second_save"].endswith("tests/2.0_00002_.safetensors")  # a counter, never an overwrite


def test_files_in_models_folder_are_listed_and_reloaded_when_changed(measured):
    assert measured["models_listed"] and measured["is_changed_follows"] and measured["reloaded_new"]


def test_bad_input_gets_specific_errors(measured):
    errors = measured["errors"]
    assert errors["object"].startswith("ValueError") and "'control' (object) cannot be saved" in errors["object"]
    assert "ControlNets" in errors["object"]
    assert errors["empty"].startswith("ValueError") and "empty" in errors["empty"]
    assert "is not a saved Open-Sora prompt" in errors["foreign"]
    assert "truncated" in errors["truncated"]
    assert "pickle" in errors["pickle"]
    assert errors["gguf"].startswith("ValueError") and "is a GGUF weight file, not a saved" in errors["gguf"]
    # a valid prompt file exists at models/outside.safetensors: the name must not reach out of the prompt folders
    assert errors["outside"].startswith("FileNotFoundError") and "not found" in errors["outside"]
    assert "damaged" in errors["no_entries"] and "unreadable" in errors["no_entries"]
    assert "damaged" in errors["empty_entries"] and "no conditioning entries" in errors["empty_entries"]
    assert errors["missing"].startswith("FileNotFoundError") and "not found" in errors["missing"]
    for name in ("key", "int", "values"):  # before: a bare KeyError / TypeError (audit 23)
        error = errors[f"entries_{name}"]
        assert error.startswith("ValueError") and "is damaged: conditioning entry 0" in error, error
    assert "is damaged: tensor '0.nested.0' listed in its metadata is missing" in errors["entries_nested"]


def test_workflow_from_saved_prompts_gives_the_same_video(comfy_server):
    from comfy_host import output_files
    from helpers_server import node_of, run_ok, tiny_workflow, video_properties

    prompt = tiny_workflow(comfy_server, "opensora20_t2v", steps=3)
    encode = node_of(prompt, "OpenSoraEncodePrompt")
    sampler = node_of(prompt, "OpenSoraSampler")
    saving = json.loads(json.dumps(prompt))
    for index, which in enumerate(("positive", "negative")):
        saving[f"save_{which}"] = {
            "class_type": "OpenSoraSavePromptEmbeds",
            "inputs": {"conditioning": [encode, index], "filename_prefix": f"api_test/{which}"},
        }
        saving[sampler]["inputs"][which] = [f"save_{which}", 0]
    result = comfy_server.client().run(saving, timeout=900)
    assert result.ok, result.error
    (video,) = output_files(result, comfy_server.base)
    saved = {
        which: result.outputs[f"save_{which}"]["text"][0].removeprefix("saved opensora_prompts/")
        for which in ("positive", "negative")
    }
    assert (comfy_server.base / "output" / "opensora_prompts" / saved["positive"]).is_file()

    loading = json.loads(json.dumps(prompt))
    for which in ("positive", "negative"):
        loading[f"load_{which}"] = {"class_type": "OpenSoraLoadPromptEmbeds", "inputs": {"prompt_file": saved[which]}}
        loading[sampler]["inputs"][which] = [f"load_{which}", 0]
    text_nodes = {encode, node_of(prompt, "OpenSoraLoadTextEncoder")}
    for node in text_nodes:  # no text encoder in the second graph
        del loading[node]
    (again,) = run_ok(comfy_server, loading)
    first, second = video_properties(video), video_properties(again)
    assert first["frames"] == second["frames"] > 1
    assert (first["pixels"] == second["pixels"]).all()
