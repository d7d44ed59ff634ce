"""scripts/check_fixtures.py: every golden case passes, the Hunyuan one through core ComfyUI, and a broken case fails."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "opensora"
SCRIPT = REPO / "scripts" / "check_fixtures.py"


def run(folder: Path) -> tuple[int, dict[str, str]]:
    result = subprocess.run([sys.executable, str(SCRIPT), str(folder)], capture_output=True, text=True, timeout=900)
    statuses = {}
    for line in result.stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("PASS", "FAIL", "CANNOT"):
            name = (
                rest.replace("RUN", "", 1).strip().split(":")[0] if status == "CANNOT" else rest.strip().split(":")[0]
            )
            statuses[name] = status
    return result.returncode, statuses


def test_every_committed_case_passes_including_hunyuan_through_core():
    code, statuses = run(FIXTURES)
    expected = {p.name for p in FIXTURES.iterdir() if p.is_dir() or p.suffix == ".json"}
    assert code == 0
    assert set(statuses) == expected
    assert set(statuses.values()) == {"PASS"}
    assert "hunyuan_vae_roundtrip" in statuses


def test_a_tampered_hunyuan_case_and_a_tampered_table_fail(tmp_path):
    case = tmp_path / "hunyuan_vae_roundtrip"
    shutil.copytree(FIXTURES / "hunyuan_vae_roundtrip", case)
    case.chmod(0o755)
    io = load_file(str(case / "io.safetensors"))
    meta = json.loads((case / "case.json").read_text())
    # shift every recorded latent output so the fixed VAE can no longer match it
    outputs = [k for k in io if "latent" in k or "decoded" in k or "moments" in k]
    assert outputs, sorted(io)
    for key in outputs:
        io[key] = io[key] + 0.5
    (case / "io.safetensors").chmod(0o644)
    save_file({k: v.contiguous() for k, v in io.items()}, str(case / "io.safetensors"))
    (case / "case.json").write_text(json.dumps(meta))
    table = json.loads((FIXTURES / "schedules.json").read_text())
    _shift_first_number(table)
    (tmp_path / "schedules.json").write_text(json.dumps(table))

    code, statuses = run(tmp_path)
    assert code == 1
    assert statuses == {"hunyuan_vae_roundtrip": "FAIL", "schedules.json": "FAIL"}


def _shift_first_number(node) -> bool:
    """Add 0.25 to the first float found in a list of numbers (a recorded schedule value)."""
    if isinstance(node, dict):
        return any(_shift_first_number(v) for v in node.values())
    if isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, float):
                node[i] = v + 0.25
                return True
            if _shift_first_number(v):
                return True
    return False


def test_the_library_runner_points_to_this_script_for_the_hunyuan_case():
    from opensora_lib.fixtures.runner import CannotRun, run_path

    torch.set_grad_enabled(False)
    try:
        run_path(FIXTURES / "hunyuan_vae_roundtrip")
    except CannotRun as e:
        assert "scripts/check_fixtures.py" in str(e)
    else:
        raise AssertionError("the library has no Hunyuan VAE, so its runner must refuse the case")
