"""Open-Sora 1.x long videos (official --loop) through the Sampler node's `loops`, in ComfyUI (--cpu).

Each later chunk starts from the previous chunk's last condition_frame_length latent frames; the chunks are joined
without the repeats. Checked on the DiT calls themselves (a forward pre-hook):
- 1.3 text-to-video chains by mask strategy: chunk 1's DiT input holds chunk 0's last 5 latent frames at frames 0-4,
  kept (x_mask False); chunk 0 is the plain run exactly; chunk 1 reads Encode Prompt's loop-1 text.
- 1.3 i2v_loop chains by the DiT's reference input: chunk 0 conditions frame 0 only, the last chunk its first 5
  frames on chunk 0's last 5 and its last frame on the end image (official prep_ref_and_update_mask_in_loop).
- 1.2 i2v_head: the reference frame kept in chunk 0, the chained frames kept in chunk 1.
- The joined LATENT decodes to the length its info names; the progress bar counts steps x loops; a
  condition_frame_length the latent cannot hold is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import run_probe

DIT13, VAE13, DIT12, VAE12 = (
    "opensora-tiny-v13/",
    "opensora-tiny-vae-v13/",
    "opensora-tiny-v12/",
    "opensora-tiny-vae-v12/",
)
STEPS = 2


def probe(out_path: str, models_dir: str) -> None:
    import comfy.hooks
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths
    from helpers_comfy_probe import error_of, pack_warnings
    from helpers_conditioning import random_conditioning
    from opensora_pack.nodes import latent, loaders, sampling

    import nodes as core_nodes

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    for kind in ("diffusion_models", "vae"):
        folder_paths.add_model_folder_path(kind, str(Path(models_dir) / kind), True)
    progress: list = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *_args, **_kw: progress.append((value, total)))

    def recorded(model) -> list:
        calls: list = []

        def hook(_module, args, kwargs):
            calls.append(
                {"x": args[0].clone(), **{k: kwargs.get(k) for k in ("x_mask", "mask_index", "cond", "context")}}
            )

        model.model.diffusion_model.register_forward_pre_hook(hook, with_kwargs=True)
        return calls

    def run(model, positive, negative, lat, **loop):
        (out,) = sampling.OpenSoraSampler().sample(model, positive, negative, lat, 5, STEPS, 7.0, **loop)
        mm.unload_all_models()
        return out

    def same_text(context, text) -> bool:  # the cond pass's caption (passes are batched after it)
        return bool(torch.equal(context[0].reshape(text[0].shape), text[0]))

    def false_frames(mask) -> list:
        return [] if mask is None else (~mask[0]).nonzero().flatten().tolist()

    results = {}
    # ---- 1.3 text-to-video, per-loop text
    (model,) = loaders.OpenSoraLoadDiT().load(DIT13, "fp32")
    (vae,) = loaders.OpenSoraLoadVAE().load(VAE13, "fp32")
    config = model.model.diffusion_model.config
    positive, negative = random_conditioning("1.3", config)
    loop_text = torch.randn(positive[0][0].shape, generator=torch.Generator().manual_seed(11))
    mask = positive[0][1]["attention_mask"]  # Encode Prompt's layout: loop 0 is the entry's own tensor
    positive[0][1]["opensora_loop_texts"] = [
        {"cond": positive[0][0], "attention_mask": mask},
        {"cond": loop_text, "attention_mask": mask},
    ]
    (empty,) = latent.OpenSoraEmptyLatentVideo().generate("1.3", "144p", "9:16", 33)
    calls = recorded(model)
    single = run(model, positive, negative, empty)["samples"]
    calls.clear()
    progress.clear()
    looped = run(model, positive, negative, empty, loops=2)
    first, second = calls[: len(calls) // 2], calls[len(calls) // 2 :]
    (frames,) = latent.OpenSoraDecode().decode(vae, looped)
    edited = run(model, positive, negative, empty, loops=2, condition_frame_edit=0.9)["samples"]
    try:
        run(model, positive, negative, empty, loops=2, condition_frame_length=10)
        too_long = None
    except ValueError as e:
        too_long = str(e)
    hooked = [[positive[0][0], {**positive[0][1], "hooks": comfy.hooks.HookGroup()}]]
    hooks_refused = error_of(lambda: run(model, hooked, negative, empty, loops=2))
    results["lengths"] = {
        "too_many": error_of(lambda: sampling.looped_num_frames({"version": "1.3"}, 35, 40, 5)),
        "off_window": error_of(lambda: run(model, positive, negative, empty, loops=2, condition_frame_length=3)),
        "image": error_of(lambda: sampling.looped_num_frames({"version": "1.3"}, 1, 2, 5)),
        "v12_off_window": error_of(lambda: sampling.looped_num_frames({"version": "1.2"}, 9, 2, 5)),  # 33 frames
        "v12_frames": sampling.looped_num_frames({"version": "1.2"}, 15, 3, 5),  # 51 frames, 3 loops
    }
    # a core node changed the conditioning after Encode Prompt: its loop texts no longer apply
    (zeroed,) = core_nodes.ConditioningZeroOut().zero_out(positive)
    calls.clear()
    with pack_warnings() as stale_warnings:
        run(model, zeroed, negative, empty, loops=2)
    results["stale"] = {
        "chunk1_zero": float(calls[len(calls) // 2]["context"][0].abs().max()),
        "warnings": stale_warnings,
    }
    results["t2v"] = {
        "latent_frames": [single.shape[2], looped["samples"].shape[2]],
        "chunk0_is_single": bool(torch.equal(looped["samples"][:, :, :10], single)),
        "calls": [len(first), len(second)],
        "chunk0_x_mask": [c["x_mask"] is None for c in first],
        "chunk1_kept": [false_frames(c["x_mask"]) for c in second],
        "chunk1_starts_from_chunk0": bool(torch.equal(second[0]["x"][:1, :, :5], single[:, :, 5:10])),
        "chunk0_context_is_loop0": same_text(first[0]["context"], positive[0][0]),
        "chunk1_context_is_loop1": same_text(second[0]["context"], loop_text),
        "num_frames": looped["opensora"]["num_frames"],
        "decoded_frames": frames.shape[0],
        "progress_totals": sorted({total for _value, total in progress}),
        "progress_last": progress[-1][0] if progress else None,
        "edit_changes_chunk1": float((edited[:, :, 10:] - looped["samples"][:, :, 10:]).abs().max()),
        "edit_keeps_chunk0": bool(torch.equal(edited[:, :, :10], single)),
        "too_long": too_long,
        "hooks_refused": hooks_refused,
    }
    # ---- 1.3 i2v_loop: the DiT's reference input
    images = torch.rand(2, 144, 256, 3, generator=torch.Generator().manual_seed(2))
    (lat,) = latent.OpenSoraEncodeReference().encode(images, empty, "i2v_loop", vae=vae, seed=3)
    reference = lat["opensora_reference"]["latent"]
    calls.clear()
    out = run(model, positive, negative, lat, loops=2)["samples"]
    first, second = calls[: len(calls) // 2], calls[len(calls) // 2 :]
    results["i2v_loop"] = {
        "mask_index": [first[0]["mask_index"], second[0]["mask_index"]],
        "chained_cond": bool(torch.equal(second[0]["cond"][:1, :, :5], out[:, :, 5:10])),
        "end_cond": bool(torch.equal(second[0]["cond"][:1, :, 9], reference[:, :, 1])),
        "start_cond": bool(torch.equal(first[0]["cond"][:1, :, 0], reference[:, :, 0])),
        "latent_frames": out.shape[2],
    }
    del model, vae
    # ---- 1.2 i2v_head: mask strategy, aligned to 5
    (model,) = loaders.OpenSoraLoadDiT().load(DIT12, "fp32")
    (vae,) = loaders.OpenSoraLoadVAE().load(VAE12, "fp32")
    positive, negative = random_conditioning("1.2", model.model.diffusion_model.config)
    (empty,) = latent.OpenSoraEmptyLatentVideo().generate("1.2", "144p", "9:16", 51)
    (lat,) = latent.OpenSoraEncodeReference().encode(images[:1], empty, "i2v_head", vae=vae, seed=3)
    calls = recorded(model)
    out = run(model, positive, negative, lat, loops=2)
    first, second = calls[: len(calls) // 2], calls[len(calls) // 2 :]
    (frames,) = latent.OpenSoraDecode().decode(vae, out)
    (tail,) = latent.OpenSoraEncodeReference().encode(images[:1], empty, "i2v_tail", vae=vae, seed=3)
    calls.clear()
    run(model, positive, negative, tail, loops=2)
    tail_chunks = calls[: len(calls) // 2], calls[len(calls) // 2 :]
    results["v12"] = {
        "tail_kept": [false_frames(chunk[0]["x_mask"]) for chunk in tail_chunks],
        "latent_frames": out["samples"].shape[2],
        "kept": [false_frames(first[0]["x_mask"]), false_frames(second[0]["x_mask"])],
        "reference_kept": bool(torch.equal(out["samples"][:, :, 0], lat["opensora_reference"]["latent"][:, :, 0])),
        "chunk1_starts_from_chunk0": bool(torch.equal(second[0]["x"][:1, :, :5], out["samples"][:, :, 10:15])),
        "num_frames": out["opensora"]["num_frames"],
        "decoded_frames": frames.shape[0],
    }
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from demo_models import make_dit, make_vae

    models = tmp_path_factory.mktemp("models-long-video")
    for version, dit, vae in (("1.3", DIT13, VAE13), ("1.2", DIT12, VAE12)):
        make_dit(version, models / "diffusion_models" / dit.rstrip("/"))
        make_vae(version, models / "vae" / vae.rstrip("/"))
    return run_probe("test_long_video", models / "results.json", models)


def test_1_3_text_to_video_chains_chunks_by_mask_strategy(measured):
    t2v = measured["t2v"]
    assert t2v["latent_frames"] == [10, 15], t2v  # 10 + (10 - 5)
    assert t2v["chunk0_is_single"], "chunk 0 is the plain run: the same seed draws the same first noise"
    assert t2v["calls"][0] == t2v["calls"][1] > 0 and all(t2v["chunk0_x_mask"]), t2v
    assert t2v["chunk1_kept"] == [[0, 1, 2, 3, 4]] * t2v["calls"][1], t2v
    assert t2v["chunk1_starts_from_chunk0"], "chunk 1's first frames are chunk 0's last 5"


def test_each_loop_reads_its_prompt_segment(measured):
    assert measured["t2v"]["chunk0_context_is_loop0"] and measured["t2v"]["chunk1_context_is_loop1"]


def test_condition_frame_edit_lets_later_loops_change_the_chained_frames(measured):
    t2v = measured["t2v"]
    assert t2v["edit_keeps_chunk0"] and t2v["edit_changes_chunk1"] > 1e-3, t2v


def test_the_joined_latent_decodes_to_the_length_its_info_names(measured):
    for case in ("t2v", "v12"):
        values = measured[case]
        assert values["decoded_frames"] == values["num_frames"], values
    assert measured["t2v"]["num_frames"] == 49, measured["t2v"]  # 15 latent frames: 3 x 16 + 1
    assert measured["v12"]["num_frames"] == 85, measured["v12"]  # 25 latent frames: 5 x 17


def test_progress_counts_every_loops_steps(measured):
    t2v = measured["t2v"]
    assert t2v["progress_totals"] == [2 * STEPS] and t2v["progress_last"] == 2 * STEPS, t2v


def test_a_chained_length_the_latent_cannot_hold_is_refused(measured):
    assert "condition_frame_length must be between 1 and 9" in measured["t2v"]["too_long"], measured["t2v"]


def test_loops_with_conditioning_hooks_are_refused_by_name(measured):
    assert "loops run in the Open-Sora Sampler's own loop" in measured["t2v"]["hooks_refused"], measured["t2v"]


def test_1_3_i2v_loop_moves_the_end_frame_to_the_last_chunk(measured):
    values = measured["i2v_loop"]
    assert values["mask_index"] == [[0], [0, 1, 2, 3, 4, 9]], values
    assert values["start_cond"] and values["chained_cond"] and values["end_cond"], values
    assert values["latent_frames"] == 15, values


def test_1_2_loops_keep_the_reference_and_the_chained_frames(measured):
    values = measured["v12"]
    assert values["latent_frames"] == 25 and values["kept"] == [[0], [0, 1, 2, 3, 4]], values
    assert values["reference_kept"] and values["chunk1_starts_from_chunk0"], values


def test_lengths_that_would_not_decode_right_or_no_video_has_are_refused(measured):
    lengths = measured["lengths"]
    assert "make 1205 latent frames, longer than any Open-Sora 1.3 video (at most 801 frames)" in lengths["too_many"]
    assert "condition_frame_length must be a multiple of 5 (official 5), got 3" in lengths["off_window"], lengths
    assert "got 9 latent frames (1.2: num_frames a multiple of 17" in lengths["v12_off_window"], lengths
    assert "this latent is one latent frame (an image)" in lengths["image"], lengths
    assert lengths["v12_frames"] == 119, lengths  # 15 + 10 + 10 latent frames: 7 windows of 17 frames


def test_loop_texts_a_core_node_made_stale_are_not_used(measured):
    stale = measured["stale"]
    assert stale["chunk1_zero"] == 0.0, stale  # chunk 1 reads the zeroed conditioning, not its old loop text
    assert any("changed after Encode Prompt" in m for m in stale["warnings"]), stale


def test_1_2_end_frames_go_to_the_last_chunk(measured):
    assert measured["v12"]["tail_kept"] == [[], [0, 1, 2, 3, 4, 10]], measured["v12"]  # official align 5: 14 -> 10
