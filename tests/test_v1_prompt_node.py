"""Open-Sora Encode Prompt (1.3) on official-style prompts, inside ComfyUI (--cpu).

- A trailing JSON object (the official script's reference_path / mask_strategy) is not used: the node says so by
  name. "|k|" loop segments: the CONDITIONING is loop 0's text (one video, the official loop 0) and carries the later
  loops' texts for the Sampler's loops, each encoded as that text alone.
- A prompt the caption cleaner turns into a bare "." (a URL to a file) is refused as empty.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import run_probe

T5 = "opensora-tiny-t5/"


def probe(out_path: str, models_dir: str) -> None:
    import folder_paths
    from helpers_comfy_probe import pack_warnings
    from opensora_pack.nodes import loaders, text

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    folder_paths.add_model_folder_path("text_encoders", str(Path(models_dir) / "text_encoders"), True)
    (encoder,) = loaders.OpenSoraLoadTextEncoder().load(T5, "default", "1.3")

    def encode(prompt, negative="", entry=False):
        with pack_warnings() as messages:
            positive, _negative = text.OpenSoraEncodePrompt().encode(encoder, prompt, negative)
        return (positive[0] if entry else positive[0][0]), messages

    plain, plain_warnings = encode("a fox in snow")
    with_json, json_warnings = encode('a fox in snow{"reference_path": "fox.png", "mask_strategy": "0"}')
    (looped, loop_meta), loop_warnings = encode("|0| a fox in snow |1| a cat on a roof |3| a fox in snow", entry=True)
    cat, _ = encode("a cat on a roof")
    loop_texts = loop_meta["opensora_loop_texts"]
    cjk, cjk_warnings = encode("雪 a fox in snow", negative="模糊 blurry")
    try:
        encode("https://example.com/fox.mp4")
        url_error = None
    except ValueError as e:
        url_error = str(e)
    results = {
        "shared": shared_encoders(loaders, encoder, Path(models_dir) / "text_encoders" / T5),
        "plain_warnings": plain_warnings,
        "json_same": bool(torch.equal(plain, with_json)),
        "json_warnings": json_warnings,
        "loop_same": bool(torch.equal(plain, looped)),
        "loop_warnings": loop_warnings,
        "loop_texts": [entry["opensora_text"] for entry in loop_texts],
        "loop_0_is_the_entry": loop_texts[0]["cond"] is looped,
        "loop_1_alone": bool(torch.equal(loop_texts[1]["cond"], cat)),
        "loop_3_is_loop_0": bool(torch.equal(loop_texts[3]["cond"], plain)),
        "cjk_same": bool(torch.equal(plain, cjk)),
        "cjk_warnings": cjk_warnings,
        "url_error": url_error,
    }
    Path(out_path).write_text(json.dumps(results))


def shared_encoders(loaders, encoder, folder: Path) -> dict:
    """1.2 and 1.3 loaders of one file share the weights (ComfyUI caches them apart: version is an input); other
    settings, a changed file, or no TextEncoder left alive load anew."""
    import gc
    import os

    import comfy.model_patcher

    load = loaders.OpenSoraLoadTextEncoder().load
    (v12,) = load(T5, "default", "1.2")
    (bf16,) = load(T5, "bf16", "1.3")
    result = {
        "versions": [encoder.version, v12.version],
        "same_weights": v12.encoders is encoder.encoders,
        "bf16_apart": bf16.encoders is not encoder.encoders,
        "patcher_is_t5s": isinstance(encoder.patcher, comfy.model_patcher.ModelPatcher)
        and encoder.patcher is encoder.encoders.t5_patcher,
        "models": len(encoder.get_models()),
    }
    weights = next(folder.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed on disk
    (changed,) = load(T5, "default", "1.3")
    result["changed_file_reloads"] = changed.encoders is not encoder.encoders
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    alive = len(loaders.SHARED_ENCODERS)
    del v12, bf16, changed
    gc.collect()
    result["released"] = alive - len(loaders.SHARED_ENCODERS)  # bf16's, and the changed file's
    return result


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from demo_models import make_t5

    models = tmp_path_factory.mktemp("models-v1-prompt")
    make_t5(models / "text_encoders" / T5.rstrip("/"))
    return run_probe("test_v1_prompt_node", models / "results.json", models)


def test_a_plain_prompt_logs_nothing(measured):
    assert measured["plain_warnings"] == []


def test_the_prompt_json_is_named_as_unused_and_the_text_encodes_as_without_it(measured):
    assert measured["json_same"], "the text before the JSON object is the official prompt"
    assert any("JSON object (reference_path, mask_strategy)" in m for m in measured["json_warnings"]), measured


def test_loop_segments_are_encoded_for_the_samplers_loops(measured):
    assert measured["loop_same"], "one video is the official loop 0: its segment's text"
    score = " the aesthetic score is excellent."  # the node's default score words, on every loop's text
    loops = ("a fox in snow", "a cat on a roof", "a cat on a roof", "a fox in snow")
    assert measured["loop_texts"] == [t + score for t in loops]
    assert measured["loop_0_is_the_entry"] and measured["loop_1_alone"] and measured["loop_3_is_loop_0"], measured
    assert measured["loop_warnings"] == [], measured  # every segment is used by some loop


def test_cjk_characters_the_cleaner_drops_are_named_in_the_prompt_and_the_negative(measured):
    assert measured["cjk_same"], "the 1.x cleaner removes CJK ideographs, as the official one"
    prompt, negative = measured["cjk_warnings"]
    assert "does not use its CJK characters (雪)" in prompt, measured
    assert "negative prompt loses its CJK characters (模糊)" in negative, measured


def test_a_url_to_a_file_is_an_empty_prompt(measured):
    assert measured["url_error"] and "empty after caption cleaning" in measured["url_error"], measured


def test_1_2_and_1_3_loaders_share_one_t5(measured):
    shared = measured["shared"]
    assert shared["versions"] == ["1.3", "1.2"] and shared["same_weights"], shared
    assert shared["bf16_apart"] and shared["changed_file_reloads"], shared
    assert shared["patcher_is_t5s"] and shared["models"] == 1, shared  # 0.33's RAM cache sees a model
    assert shared["released"] == 2, shared  # weak: what no TextEncoder holds is freed
