"""Open-Sora 1.3 Encode Reference on the videos and image batches users connect, in ComfyUI (--cpu).

- v2v_head: the official collect_references_batch (v1.3) trims a reference video to a length the VAE takes whole
  (16k + 1 frames), so a 20-frame video encodes exactly as its first 17 frames (and a 6-frame one as its first frame).
- The image conditions take one image each: of a batch, i2v_head uses the first and i2v_tail the last, and the node
  says so. i2v_loop takes a start and an end image, as the official "a.png;b.png" reference: the second image
  conditions the last latent frame (1.3: the DiT's reference input; 1.2: the mask strategy, aligned to 5 frames).
- Empty Latent Video says when a 1.2 exact size is floored to the 8-pixel grid (official latent = size // 8).
- Empty Latent Video's VALIDATE_INPUTS runs without its inputs (a prompt missing one: core reports it as missing).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import run_probe

VAE = "opensora-tiny-vae-v13/"
VAE12 = "opensora-tiny-vae-v12/"


def probe(out_path: str, models_dir: str) -> None:
    import folder_paths
    from helpers_comfy_probe import pack_warnings
    from opensora_pack.nodes import latent, loaders, sampling_v1
    from opensora_pack.opensora_lib.conditioning_v1 import chunk_conditioning

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    folder_paths.add_model_folder_path("vae", str(Path(models_dir) / "vae"), True)
    (vae,) = loaders.OpenSoraLoadVAE().load(VAE, "fp32")
    (empty,) = latent.OpenSoraEmptyLatentVideo().generate("1.3", "144p", "9:16", 97)
    video = torch.rand(20, 144, 256, 3, generator=torch.Generator().manual_seed(4))

    def encode(images, cond_type="v2v_head"):
        (out,) = latent.OpenSoraEncodeReference().encode(images, empty, cond_type, vae=vae, seed=3)
        return out["opensora_reference"]["latent"]

    with pack_warnings() as messages:
        first = encode(video[:1], "i2v_head")
        batch = encode(video[:3], "i2v_head")
        tail_of_three = encode(video[:3], "i2v_tail")
        loop_of_three = encode(video[:3], "i2v_loop")
    (loop_two,) = latent.OpenSoraEncodeReference().encode(video[:2], empty, "i2v_loop", vae=vae, seed=3)
    (loop_one,) = latent.OpenSoraEncodeReference().encode(video[:1], empty, "i2v_loop", vae=vae, seed=3)
    # end_image: the same as the two-image batch; another size is fitted on its own; only for i2v_loop
    (with_end,) = latent.OpenSoraEncodeReference().encode(
        video[:1], empty, "i2v_loop", vae=vae, seed=3, end_image=video[1:2]
    )
    other_size = torch.rand(1, 200, 300, 3, generator=torch.Generator().manual_seed(6))
    (odd_end,) = latent.OpenSoraEncodeReference().encode(
        video[:1], empty, "i2v_loop", vae=vae, seed=3, end_image=other_size
    )
    try:
        latent.OpenSoraEncodeReference().encode(video[:1], empty, "i2v_head", vae=vae, end_image=video[1:2])
        end_error = None
    except ValueError as e:
        end_error = str(e)
    z = torch.zeros_like(empty["samples"])
    placed_two = sampling_v1.v1_reference(loop_two, z).latent
    placed_one = sampling_v1.v1_reference(loop_one, z).latent
    # 1.2: 51 frames -> 15 latent frames; the loop's end lands on frame 10 (official align 5)
    (vae12,) = loaders.OpenSoraLoadVAE().load(VAE12, "fp32")
    (empty12,) = latent.OpenSoraEmptyLatentVideo().generate("1.2", "144p", "9:16", 51)
    z12 = torch.zeros_like(empty12["samples"])
    loop12 = {
        n: latent.OpenSoraEncodeReference().encode(video[:n], empty12, "i2v_loop", vae=vae12, seed=3)[0] for n in (1, 2)
    }
    infos: list[str] = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = lambda record: infos.append(record.getMessage())
    logging.getLogger("OpenSora").addHandler(handler)
    logging.getLogger("OpenSora").setLevel(logging.INFO)
    written12 = {n: chunk_conditioning(z12, 0, 1, **sampling_v1.v1_chaining("1.2", loop12[n], z12))[0] for n in (1, 2)}
    logging.getLogger("OpenSora").removeHandler(handler)
    with pack_warnings() as size_messages:
        floored = latent.OpenSoraEmptyLatentVideo().generate("1.2", "144p", "9:16", 17, 1, 100, 60)[0]["samples"]
        latent.OpenSoraEmptyLatentVideo().generate("1.2", "144p", "9:16", 17, 1, 96, 56)
        latent.OpenSoraEmptyLatentVideo().generate("1.2", "240p", "9:16", 17)  # preset 426 wide: official, no message
        latent.OpenSoraEmptyLatentVideo().generate("1.3", "144p", "9:16", 17, 1, 100, 60)
    results = {
        "floored_shape": list(floored.shape[-2:]),
        "size_messages": size_messages,
        "twenty_is_seventeen": bool(torch.equal(encode(video), encode(video[:17]))),
        "seventeen_differs_from_sixteen_plus_one": not torch.equal(encode(video[:17]), encode(video[:1])),
        "six_is_one": bool(torch.equal(encode(video[:6]), encode(video[:1]))),
        "batch_uses_first": bool(torch.equal(first, batch)),
        "tail_uses_last": bool(torch.equal(tail_of_three, encode(video[2:3], "i2v_tail"))),
        "loop_uses_first_and_last": bool(torch.equal(loop_of_three, encode(video[0:3:2], "i2v_loop"))),
        # two images: start = the first image's latent, end = the second's (encoded after it, as the official)
        "loop_start_is_head": bool(torch.equal(placed_two[:, :, 0], first[:, :, 0])),
        "loop_end_is_second": bool(
            torch.equal(placed_two[:, :, -1], loop_two["opensora_reference"]["latent"][:, :, 1])
        ),
        "loop_end_differs_from_start": not torch.equal(placed_two[:, :, -1], placed_two[:, :, 0]),
        # one image: at both ends, as before
        "loop_one_both_ends": bool(
            torch.equal(placed_one[:, :, 0], first[:, :, 0]) and torch.equal(placed_one[:, :, -1], first[:, :, 0])
        ),
        "loop_one_middle_empty": not placed_one[:, :, 1:-1].any().item(),
        "end_image_is_the_batch": bool(
            torch.equal(with_end["opensora_reference"]["latent"], loop_two["opensora_reference"]["latent"])
        ),
        "odd_end_start_same": bool(torch.equal(odd_end["opensora_reference"]["latent"][:, :, 0], first[:, :, 0])),
        "odd_end_differs": not torch.equal(
            odd_end["opensora_reference"]["latent"][:, :, 1], loop_two["opensora_reference"]["latent"][:, :, 1]
        ),
        "end_error": end_error,
        "v12_start_same": bool(torch.equal(written12[1][:, :, 0], written12[2][:, :, 0])),
        "v12_end_is_second": bool(
            torch.equal(written12[2][:, :, 10], loop12[2]["opensora_reference"]["latent"][:, :, 1])
        ),
        "v12_align_messages": infos,
        "v12_end_differs_with_two": not torch.equal(written12[1][:, :, 10], written12[2][:, :, 10]),
        "warnings": messages,
        # an API prompt missing a required input: core reports it as missing; VALIDATE_INPUTS must not TypeError
        "validate_without_inputs": latent.OpenSoraEmptyLatentVideo.VALIDATE_INPUTS(),
    }
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from demo_models import make_vae

    models = tmp_path_factory.mktemp("models-v13-reference")
    make_vae("1.3", models / "vae" / VAE.rstrip("/"))
    make_vae("1.2", models / "vae" / VAE12.rstrip("/"))
    return run_probe("test_v13_reference_inputs", models / "results.json", models)


def test_a_reference_video_is_trimmed_as_the_official_1_3(measured):
    assert measured["twenty_is_seventeen"] and measured["six_is_one"], measured
    assert measured["seventeen_differs_from_sixteen_plus_one"], "the kept frames must matter"


def test_an_image_batch_for_an_image_condition_uses_the_first_and_says_so(measured):
    assert measured["batch_uses_first"], measured
    assert any("uses the first of the 3 images" in m for m in measured["warnings"]), measured["warnings"]


def test_an_image_batch_for_i2v_tail_uses_the_last_and_i2v_loop_both_ends(measured):
    assert measured["tail_uses_last"] and measured["loop_uses_first_and_last"], measured
    assert any("i2v_tail uses the last of the 3 images" in m for m in measured["warnings"]), measured["warnings"]
    assert any("i2v_loop uses the first and the last of the 3" in m for m in measured["warnings"]), measured["warnings"]


def test_i2v_loop_takes_an_end_image_as_the_official_two_references(measured):
    assert measured["loop_start_is_head"] and measured["loop_end_is_second"], measured
    assert measured["loop_end_differs_from_start"], "the second image must condition the last latent frame"


def test_i2v_loop_with_one_image_conditions_both_ends_with_it(measured):
    assert measured["loop_one_both_ends"] and measured["loop_one_middle_empty"], measured


def test_v12_i2v_loop_writes_the_end_image_at_the_aligned_last_frame(measured):
    assert measured["v12_start_same"] and measured["v12_end_is_second"], measured
    assert measured["v12_end_differs_with_two"], measured
    assert any("latent frame(s) [0, 10], aligned from [0, 14]" in m for m in measured["v12_align_messages"]), measured


def test_empty_latent_validation_takes_missing_inputs(measured):
    assert measured["validate_without_inputs"] is True


def test_a_1_2_exact_size_off_the_8_pixel_grid_is_floored_and_said(measured):
    assert measured["floored_shape"] == [7, 12], measured["floored_shape"]  # 56 x 96 pixels
    assert len(measured["size_messages"]) == 1, measured["size_messages"]
    assert "1.2 makes 96 x 56 frames for the 100 x 60 asked" in measured["size_messages"][0]


def test_end_image_gives_i2v_loop_its_last_frame_whatever_its_size(measured):
    assert measured["end_image_is_the_batch"], "end_image must equal the two-image batch"
    assert measured["odd_end_start_same"] and measured["odd_end_differs"], measured
    assert "end_image is the last frame of cond_type i2v_loop" in measured["end_error"], measured["end_error"]
