"""Open-Sora 1.3 Encode Reference on the videos and image batches users connect, in ComfyUI (--cpu).

- v2v_head: the official collect_references_batch (v1.3) trims a reference video to a length the VAE takes whole
  (16k + 1 frames), so a 20-frame video encodes exactly as its first 17 frames (and a 6-frame one as its first frame).
- The image conditions (i2v_*) take one image: given a batch, the first is used and the node says so.
- Empty Latent Video's VALIDATE_INPUTS runs without its inputs (a prompt missing one: core reports it as missing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import run_probe

REPO = Path(__file__).resolve().parent.parent
VAE = "opensora-tiny-vae-v13/"


def probe(out_path: str, models_dir: str) -> None:
    import folder_paths
    from helpers_comfy_probe import pack_warnings
    from opensora_pack.nodes import latent, loaders

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
    results = {
        "twenty_is_seventeen": bool(torch.equal(encode(video), encode(video[:17]))),
        "seventeen_differs_from_sixteen_plus_one": not torch.equal(encode(video[:17]), encode(video[:1])),
        "six_is_one": bool(torch.equal(encode(video[:6]), encode(video[:1]))),
        "batch_uses_first": bool(torch.equal(first, batch)),
        "warnings": messages,
        # an API prompt missing a required input: core reports it as missing; VALIDATE_INPUTS must not TypeError
        "validate_without_inputs": latent.OpenSoraEmptyLatentVideo.VALIDATE_INPUTS(),
    }
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    sys.path.insert(0, str(REPO / "scripts"))
    from demo_models import make_vae

    models = tmp_path_factory.mktemp("models-v13-reference")
    make_vae("1.3", models / "vae" / VAE.rstrip("/"))
    return run_probe("test_v13_reference_inputs", models / "results.json", models)


def test_a_reference_video_is_trimmed_as_the_official_1_3(measured):
    assert measured["twenty_is_seventeen"] and measured["six_is_one"], measured
    assert measured["seventeen_differs_from_sixteen_plus_one"], "the kept frames must matter"


def test_an_image_batch_for_an_image_condition_uses_the_first_and_says_so(measured):
    assert measured["batch_uses_first"], measured
    assert any("uses the first of the 3 images" in m for m in measured["warnings"]), measured["warnings"]


def test_empty_latent_validation_takes_missing_inputs(measured):
    assert measured["validate_without_inputs"] is True
