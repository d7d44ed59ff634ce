"""The README's first command, scripts/demo.sh (scripts/demo.py): a real headless ComfyUI queues a shipped workflow on
the tiny models and writes an mp4. Run as a user runs it (a subprocess), for the default 1.3 text-to-video and for
a 2.0 image-to-video (tiny 2.0 models made on demand, a stand-in reference image); a name that is not a shipped
workflow is refused with the list of names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.server


def demo(*args: str, output: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "scripts" / "demo.py"), "--output", str(output), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=1200)


@pytest.mark.parametrize(("args", "frames"), [((), 33), (("--workflow", "opensora20_i2v"), 9)])
def test_demo_writes_a_video(tmp_path, args, frames):
    result = demo(*args, output=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    videos = sorted(tmp_path.glob("*.mp4"))
    assert len(videos) == 1, result.stdout[-2000:]
    with av.open(str(videos[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == frames


def test_demo_names_the_shipped_workflows_for_an_unknown_one(tmp_path):
    result = demo("--workflow", "opensora99_t2v", output=tmp_path)
    assert result.returncode != 0 and "no workflow 'opensora99_t2v'" in result.stderr + result.stdout
    assert "opensora20_i2v" in result.stderr + result.stdout and not list(tmp_path.glob("*.mp4"))
