"""The pack's web extension in the real ComfyUI frontend (headless Chromium), and its size-rules route.

The browser test opens the frontend the `comfy_server` fixture serves, loads every UI workflow in
workflows/ (each must queue, through the frontend's graphToPrompt, every node and input its twin in workflows/api/
sets, with the same values and links), and drives an Open-Sora Empty Latent Video node: derived values must follow the widgets,
1.3 with 50 frames must show a warning and a badge, a valid count must clear them, 2.0 DC-AE must take 128
frames and refuse 129, and the page's evaluation of the server's rules must agree with opensora_lib.sizes.
Screenshot: artifacts/browser/.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error

import pytest
from browser_check import CASES, REPO, assess, check_frontend, find_browser, known_frontend_error, ui_workflows
from comfy_host import pack_module

from opensora_lib import sizes
from opensora_lib.size_rules import size_rules

ARTIFACTS = REPO / "artifacts" / "browser"


def test_size_rules_route_serves_sizes_rules_and_registers_once():
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    web_routes = pack_module("nodes.web_routes")
    assert web_routes.REGISTERED is False  # no PromptServer here: importing did nothing
    routes = web.RouteTableDef()
    assert web_routes.register(routes) is True
    assert web_routes.register(routes) is True
    assert [route.path for route in routes] == ["/opensora/size_rules"]

    async def fetch():
        app = web.Application()
        app.add_routes(routes)
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/opensora/size_rules")
            return response.status, await response.json()

    status, body = asyncio.run(fetch())
    assert status == 200
    assert sorted(body) == sorted(sizes.LATENT_CHOICES) == sorted([*sizes.VERSIONS, "2.0 DC-AE"])
    for choice, (version, autoencoder) in sizes.LATENT_CHOICES.items():
        assert body[choice] == json.loads(json.dumps(size_rules(version, autoencoder)))
    # The DC-AE choice has its own frames, grid and latent formulas where the page reads them.
    dcae = body["2.0 DC-AE"]
    assert (dcae["frames"]["min"], dcae["frames"]["max"], dcae["frames"]["step"]) == (
        8,
        128,
        4,
    )  # not 4: one latent frame, decoded as one image
    assert dcae["size_limits"]["multiple_of"] == 32 and dcae["latent"]["channels"] == 128
    assert dcae["sizes"]["768px"]["16:9"] == [576, 1024] and dcae["defaults"]["num_frames"] == 128
    assert body["2.0"] == json.loads(json.dumps(size_rules("2.0")))  # the HunyuanVideo choice is unchanged


@pytest.mark.browser
def test_frontend_shows_live_derived_values_and_warnings(comfy_server):
    find_browser()  # a clear FileNotFoundError naming scripts/install_browser.sh when Chromium is missing
    try:
        rules = comfy_server.get_json("/api/opensora/size_rules")
    except urllib.error.HTTPError as error:
        pytest.fail(f"GET /api/opensora/size_rules answered {error.code}: nodes/__init__.py must import web_routes")
    assert sorted(rules) == sorted(sizes.LATENT_CHOICES)

    report = check_frontend(comfy_server.url, screenshot=ARTIFACTS / "opensora_node.png")
    print(f"screenshot: {report['screenshot']}")
    for workflow in report["workflows"]:
        print(f"screenshot: {workflow['screenshot']} ({workflow['workflow']}, {workflow['nodes']} nodes)")
    ignored = [known_frontend_error(text) for text in report["console_errors"] if known_frontend_error(text)]
    if ignored:
        print(f"ignored known frontend errors (also on a bare ComfyUI): {sorted(set(ignored))}")

    assert assess(report) == []

    # Every UI workflow loaded with all node types registered (checked inside check_frontend).
    expected_workflows = [path.name for path in ui_workflows(REPO / "workflows")]
    assert [w["workflow"] for w in report["workflows"]] == expected_workflows

    # Encode Prompt greys out what its text encoder's version ignores (still saved and queued: the API twins match).
    for workflow in report["workflows"]:
        ignored = (
            ["motion_score_v2", "fps"]
            if "opensora1" in workflow["workflow"]
            else ["aesthetic_score", "motion_score", "camera_motion"]
        )
        assert workflow["greyed"] == [ignored], workflow
    # The Sampler greys out what its latent's version ignores (through Encode Reference too).
    sampler_ignores = {
        "opensora12": {"image_cfg", "oscillation", "image_oscillation", "scale_image_weight", "sdedit", "flaw_fix",
                       "guidance_passes"},
        "opensora13": {"guidance_passes"},
        "opensora20": {"sdedit", "flaw_fix", "loops", "condition_frame_length", "condition_frame_edit"},
    }  # fmt: skip
    for workflow in report["workflows"]:
        (greyed,) = workflow["sampler_greyed"]
        assert set(greyed) == sampler_ignores[workflow["workflow"][:10]], workflow

    # The frontend's missing-models dialog (1.32.9; later frontends list them in a side panel instead) offers each
    # single file a workflow loads, from its node properties.models; the server has none of the official files.
    if tuple(int(p) for p in report["frontend"].split(".")[:2]) < (1, 40):
        for workflow in report["workflows"]:
            data = json.loads((REPO / "workflows" / workflow["workflow"]).read_text())
            wanted = {
                f"{m['directory']} / {m['name']}" for n in data["nodes"] for m in n["properties"].get("models", [])
            }
            shown = " ".join(workflow["dialogs"])
            assert wanted and "Missing Models" in shown and all(entry in shown for entry in wanted), (workflow, wanted)

    # The displayed text follows num_frames, with Python's numbers: 49 -> 97 frames on 1.3 360p 9:16.
    steps = report["steps"]
    height, width = sizes.image_size("1.3", "360p", "9:16")
    for name, frames in (("49 frames (1.3, 360p 9:16)", 49), ("97 frames", 97), ("65 frames", 65)):
        t, h, w = sizes.latent_shape("1.3", frames, height, width)
        per_frame = sizes.tokens_per_frame("1.3", height, width)
        shown = steps[name]
        assert shown["rows"]["pixels"] == [f"pixels {width}×{height} (W×H, 360p 9:16)"]
        assert f"latent {t}×{h}×{w} " in shown["rows"]["latent"][0]
        assert f"{t * per_frame:,} total" in shown["rows"]["tokens"][0]
        assert f"{frames / 24:.2f} s" in shown["rows"]["duration"][0]
    assert steps["49 frames (1.3, 360p 9:16)"]["text"] != steps["97 frames"]["text"]

    # 50 frames: red warning row and badge; 65 clears both.
    bad, good = steps["50 frames"], steps["65 frames"]
    assert bad["invalid"] and bad["badge"] and bad["badgeShown"]
    assert any("50 frames" in row and "16k+1" in row for row in bad["rows"]["warning"])
    assert not good["invalid"] and not good["badge"] and "warning" not in good["rows"]

    # 2.0 DC-AE: 128 frames (official) at 768px 16:9 is a 32 x 18 x 32 latent of 128 channels; 129 is refused.
    dcae_t, dcae_h, dcae_w = sizes.latent_shape("2.0", 128, 576, 1024, autoencoder="dc_ae")
    dcae_good, dcae_bad = steps["2.0 DC-AE, 128 frames"], steps["2.0 DC-AE, 129 frames"]
    assert dcae_good["rows"]["pixels"] == ["pixels 1024×576 (W×H, 768px 16:9)"]
    assert f"latent {dcae_t}×{dcae_h}×{dcae_w} (T×H×W, 128 ch)" in dcae_good["rows"]["latent"][0]
    assert "576 / frame" in dcae_good["rows"]["tokens"][0] and not dcae_good["invalid"]
    assert dcae_bad["invalid"] and dcae_bad["badge"]
    assert any("129 frames" in row and "1 or 4k" in row and "try 128" in row for row in dcae_bad["rows"]["warning"])

    # num_frames linked from a primitive: checked (50 is not 16k+1); from another node: unknown until it runs.
    primitive, other = steps["num_frames linked from PrimitiveInt"], steps["num_frames linked from StringLength"]
    assert primitive["invalid"] and any("50 frames" in row for row in primitive["rows"]["warning"]), primitive
    assert not other["invalid"] and not other["badge"] and "warning" not in other["rows"], other
    assert any("derived values need num_frames" in row for row in other["rows"]["status"]), other

    # Switching the version: only that version's presets are listed, the arrows step on its grids, the picture keeps
    # its orientation (1.x H:W -> 2.0 W:H flips "9:16") and a frame count it cannot take moves to the nearest it can,
    # each change noted on the node (audit 24: the lists held every version's presets and "9:16" silently turned a
    # landscape 1.3 video into a portrait 2.0 one).
    change = report["version_change"]
    start, to20, frames53, to13 = (change[k] for k in ("start", "to20", "frames53", "to13"))
    assert start["resolutions"] == sizes.resolutions("1.3") and start["framesStep"] == 16, start
    assert to20["values"] == {"version": "2.0", "resolution": "360p", "aspect_ratio": "16:9", "num_frames": 49}
    assert to20["resolutions"] == sizes.resolutions("2.0") and to20["aspects"] == sizes.aspect_ratios("2.0")
    assert to20["framesStep"] == 4 and any("aspect_ratio 9:16 → 16:9" in r for r in to20["shown"]["rows"]["note"])
    for step in (start, to20):
        height, width = sizes.image_size(step["values"]["version"], "360p", step["values"]["aspect_ratio"])
        assert width > height and f"pixels {width}×{height}" in step["shown"]["text"], step
    assert "note" not in frames53["shown"]["rows"] or not any("→" in r for r in frames53["shown"]["rows"]["note"])
    assert to13["values"] == {"version": "1.3", "resolution": "360p", "aspect_ratio": "9:16", "num_frames": 49}
    assert any("num_frames 53 → 49" in r for r in to13["shown"]["rows"]["note"]) and not to13["shown"]["invalid"]
    assert change["arrow"]["values"]["num_frames"] == 65, change["arrow"]  # one click: the next 16k+1

    # The page evaluates the rules exactly as Python computes them, errors included.
    assert len(report["cases"]) == len(CASES)
    assert sum(case["python"]["valid"] for case in report["cases"]) >= 10
    assert sum(not case["python"]["valid"] for case in report["cases"]) >= 8
    assert sum(case["values"]["version"] == "2.0 DC-AE" for case in report["cases"]) >= 6
