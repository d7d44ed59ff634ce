"""Pictures of the shipped workflows, from the browser check's screenshots (artifacts/browser/, written by
tests/test_browser.py; take them on the pinned host): docs/images/*.png for the README, and workflows/<name>.jpg, the
thumbnail ComfyUI's template browser shows for workflows/<name>.json.

Usage: scripts/test.sh tests/test_browser.py && .venv/bin/python scripts/workflow_pictures.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "artifacts" / "browser"
THUMBNAIL_WIDTH = 640


def main() -> int:
    shots = sorted(SHOTS.glob("*.png"))
    if not shots:
        print(f"no screenshots in {SHOTS}: run tests/test_browser.py first", file=sys.stderr)
        return 1
    for shot in shots:
        shutil.copy2(shot, REPO / "docs" / "images" / shot.name)
        name = shot.stem.removeprefix("workflow_")
        if name != shot.stem and (REPO / "workflows" / f"{name}.json").is_file():
            with Image.open(shot) as image:
                image = image.convert("RGB")
                image.thumbnail((THUMBNAIL_WIDTH, THUMBNAIL_WIDTH))
                image.save(REPO / "workflows" / f"{name}.jpg", quality=80)
        print(f"{shot.name} -> docs/images/" + (f", workflows/{name}.jpg" if name != shot.stem else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
