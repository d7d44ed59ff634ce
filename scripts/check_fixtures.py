"""Check every golden case of the official Open-Sora code, including the one the library cannot run alone.

    .venv/bin/python scripts/check_fixtures.py [FIXTURE_DIR]     (default: tests/fixtures/opensora)

Every case folder and JSON table goes through `opensora_lib.fixtures` (the library). The HunyuanVideo VAE case
is the exception: Open-Sora 2.0 uses core ComfyUI's VAE for it and the library has none by design, so it is run
through core's VAELoader path plus the pack's frame-causal fix (scripts/verify_hunyuan_vae.py, which boots the
pinned ComfyUI host). That case passes when every comparison of the fixed VAE ("masked.*" = core with the official
mask, "node.*" = the pack's Open-Sora HunyuanVideo VAE node) is within the fixture's tolerance and every weight
loads. Exit 0 only if every case passes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from opensora_lib.fixtures.runner import CannotRun, run_path  # noqa: E402

HUNYUAN_CLASS = "AutoencoderKLCausal3D"  # case.json model_class of the Hunyuan VAE round trip
HUNYUAN_CHECKS = ("masked.", "node.")  # the comparisons that must pass (core as shipped is expected to differ)


def is_hunyuan_case(path: Path) -> bool:
    case_file = path / "case.json"
    if not case_file.is_file():
        return False
    return str(json.loads(case_file.read_text()).get("model_class", "")).startswith(HUNYUAN_CLASS)


def check_hunyuan(path: Path) -> tuple[str, str]:
    """(status, detail) of the Hunyuan case through core ComfyUI's VAE and the pack's causal fix."""
    with tempfile.TemporaryDirectory() as tmp:
        report_file = Path(tmp) / "report.json"
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "verify_hunyuan_vae.py"), str(path), "--json", str(report_file)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if result.returncode != 0 or not report_file.is_file():
            return "FAIL", f"verify_hunyuan_vae.py exited {result.returncode}: {result.stderr.strip()[-400:]}"
        report = json.loads(report_file.read_text())
    # node.chunked.*: the node with whole_video off, a newer core's memory-saving chunks, not the official path
    checked = {
        name: r
        for name, r in report["compare"].items()
        if name.startswith(HUNYUAN_CHECKS) and not name.startswith("node.chunked.")
    }
    failed = [name for name, r in checked.items() if not r["passed"]]
    load = report["load"]
    if load["missing_keys"] or load["unexpected_keys"]:
        failed.append(f"weights: missing {load['missing_keys'][:3]}, unexpected {load['unexpected_keys'][:3]}")
    worst = max((r.get("max_abs", 0.0) for r in checked.values()), default=float("nan"))
    detail = f"{len(checked) - len(failed)}/{len(checked)} within tolerance through core's VAE + the causal fix"
    if not checked:
        return "FAIL", "the verify report has no masked.* / node.* comparisons"
    return ("FAIL", f"{detail}; failed: {failed}") if failed else ("PASS", f"{detail}, max_abs={worst:.3g}")


def check_library(path: Path) -> tuple[str, str]:
    try:
        comparisons = run_path(path)
    except CannotRun as e:
        return "CANNOT RUN", str(e)
    if not comparisons:
        return "CANNOT RUN", "the runner produced no comparisons"
    failed = [c.name for c in comparisons if not c.passed]
    detail = f"{len(comparisons) - len(failed)}/{len(comparisons)} within tolerance"
    return ("FAIL", f"{detail}; failed: {failed[:5]}") if failed else ("PASS", detail)


def cases(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() or p.suffix == ".json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=REPO / "tests" / "fixtures" / "opensora")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"no fixture folder at {args.folder}")
        return 2
    torch.set_grad_enabled(False)
    results = []
    for path in cases(args.folder):
        status, detail = check_hunyuan(path) if is_hunyuan_case(path) else check_library(path)
        results.append(status)
        print(f"{status:10} {path.name}: {detail}", flush=True)
    passed = results.count("PASS")
    print(f"{passed}/{len(results)} cases pass")
    return 0 if results and passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
