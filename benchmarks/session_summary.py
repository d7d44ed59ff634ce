"""Summary of a benchmarks/gpu_session.sh output folder: the step log, ours vs the official side by side, targets.

python -m benchmarks.session_summary DIR [--steps STEP_LOG] [--mode full|dry-run]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import cell, measured_name, official_time, text_table, write_json

# JSON files of benchmarks/gpu_session.sh, by role.
SESSION_FILES = {
    "ours_cudnn": "mmdit_cudnn.json",
    "ours_fa3": "mmdit_fa3.json",
    "ours_compiled": "mmdit_compiled.json",
    "ours_torch_forms": "mmdit_cudnn_torch_forms.json",
    "official": "official_mmdit.json",
}
OURS = ("ours_cudnn", "ours_fa3", "ours_compiled", "ours_torch_forms")
# How each of our runs is judged against issue #5's targets: its verdict's key (the eager cudnn run's is
# `meets_target`) and its label in the summary.
VERDICTS = {
    "ours_cudnn": ("meets_target", "eager cuDNN"),
    "ours_fa3": ("meets_target_fa3", "eager FA3"),
    "ours_compiled": ("meets_target_compiled", "compiled"),
}


def _read_steps(path: Path | None) -> list[dict[str, Any]]:
    """gpu_session.sh's step log: name, status, exit code, seconds, detail (tab-separated)."""
    if path is None or not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        name, status, code, seconds, detail = (line.split("\t") + [""] * 5)[:5]
        steps.append(
            {"step": name, "status": status, "exit_code": code, "seconds": float(seconds or 0), "detail": detail}
        )
    return steps


def _timed_rows(payload: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    rows = (payload or {}).get("results", [])
    return {r["name"]: r for r in rows if r.get("kind") in ("forward", "sampler") and r.get("seconds")}


def session_comparison(payloads: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours (cudnn, FlashAttention-3, cudnn with compiled blocks, cudnn with the torch forms instead of fused_ops')
    vs the official run of the same name measured in the session, else the quoted figure; with issue #5's target
    where one is set, each eager / compiled run judged on its own (VERDICTS)."""
    from benchmarks.bench_mmdit import OFFICIAL_SECONDS, TARGETS

    official = _timed_rows(payloads.get("official"))
    ours = {key: _timed_rows(payloads.get(key)) for key in OURS}
    names = list(dict.fromkeys([*(name for key in OURS for name in ours[key]), *official]))
    rows = []
    for name in names:
        entry: dict[str, Any] = {"name": name}
        found = official_time(name, {n: r["seconds"] for n, r in official.items()}, OFFICIAL_SECONDS)
        if found is not None:
            source = found[1] if found[1].startswith("measured") else "quoted"
            entry.update(official_seconds=found[0], official_source=source)
            official_name = measured_name(name, official)
            if official_name is not None:
                entry["official_passes"] = official[official_name].get("forward_passes")
        for key, found in ours.items():
            row = found.get(name)
            if row is None:
                continue
            entry[f"{key}_seconds"] = row["seconds"]
            entry[f"{key}_peak_gib"] = row.get("peak_memory_gib")
            entry[f"{key}_passes"] = row.get("forward_passes")
            if entry.get("official_seconds"):
                entry[f"{key}_ratio"] = row["seconds"] / entry["official_seconds"]
        for key, (verdict, _) in VERDICTS.items():
            if name in TARGETS and f"{key}_ratio" in entry:
                entry.update({"target_ratio": TARGETS[name], verdict: entry[f"{key}_ratio"] < TARGETS[name]})
        rows.append(entry)
    return rows


def _compact(payload: dict[str, Any], width: int = 160) -> list[str]:
    """One line per top-level field: scalars as they are, a dict as its scalar entries, a list as its length."""
    lines = []
    for key, value in payload.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}={cell(v)}" for k, v in value.items() if not isinstance(v, (dict, list)))
            text = inner or f"{{{len(value)} fields}}"
        elif isinstance(value, list):
            text = f"[{len(value)} items]"
        else:
            text = cell(value)
        line = f"  {key}: {text}"
        lines.append(line if len(line) <= width else line[: width - 3] + "...")
    return lines


def _other_rows(payload: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in payload.get("results", []) if isinstance(payload.get("results"), list) else []:
        if isinstance(r, dict):
            rows.append([str(r.get("name", "?")), cell(r.get("seconds")), cell(r.get("peak_memory_gib"))])
    return rows


def attention_rows(payloads: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The attention-kernel rows (bench_mmdit --attention-kernels) of every run that has them."""
    return [r for p in payloads.values() for r in p.get("results", []) if r.get("kind") == "attention"]


def target_text(entry: dict[str, Any]) -> str:
    if "target_ratio" not in entry:
        return "-"
    verdicts = []
    for key, label in VERDICTS.values():
        if key in entry:
            verdicts.append(f"{label} {'met' if entry[key] else 'NOT met'}")
    return f"< {entry['target_ratio']:g}: {', '.join(verdicts)}"


def fused_ops_refused(env: dict[str, Any]) -> list[str]:
    """Each fused form refused in this run (by its self-check, or failing later): form, device and dtype, and why.
    Refusals stick, so the state after the timed rows holds those of the check too."""
    state = env.get("fused_ops") or env.get("buffered_forms_check", {}).get("fused_ops", {})
    forms = state.get("forms", {})
    return [f"{name} on {key}: {why}" for name, form in forms.items() for key, why in form.get("refused", {}).items()]


def environment_line(key: str, env: dict[str, Any]) -> str:
    """One step's device, torch, attention backend and the eager forms' checks."""
    extra = env.get("cudnn_attention_probe") or env.get("official_shims") or ""
    if env.get("official_attention"):
        extra = f"official attention {env['official_attention']} {extra}"
    check = env.get("buffered_forms_check")
    if check:
        same = "bit-identical" if check["bit_identical"] else f"DIFFER (max {check['max_abs_difference']:.3g})"
        if not check.get("buffered_forms_ran", True):
            same = "NOT CHECKED (the buffered forms did not run)"
        extra = f"{extra} buffered eager forms vs plain: {same}"
        if "fused_ops_uses" in check:
            checks = {name: form["checked"] or "not self-checked" for name, form in check["fused_ops"]["forms"].items()}
            extra = f"{extra}; fused ops used {check['fused_ops_uses']} times (self-checks {checks})"
            if refused := fused_ops_refused(env):
                extra = f"{extra}; REFUSED: {'; '.join(refused)}"
    backend = env.get("attention_backend")
    if env.get("attention_module"):
        backend = f"{backend} ({env['attention_module']})"
    if env.get("attention_requested") not in (None, env.get("attention_backend")):
        backend = f"{env['attention_requested']} (ran {backend}: not available here)"
    return f"{key}: {env.get('device_name')} torch {env.get('torch')} attention {backend} {extra}"


def session_summary(directory: Path, steps_file: Path | None = None, mode: str = "full") -> dict[str, Any]:
    """Print the session's summary tables and write directory/summary.json."""
    steps = _read_steps(steps_file)
    payloads = {}
    for key, name in SESSION_FILES.items():
        if (directory / name).is_file():
            payloads[key] = json.loads((directory / name).read_text())
    comparison = session_comparison(payloads)
    agreement = [r for r in payloads.get("official", {}).get("results", []) if r.get("kind") == "agreement"]
    others = {}
    for path in sorted(directory.glob("*.json")):
        if path.name not in SESSION_FILES.values() and path.name != "summary.json":
            try:
                others[path.name] = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                others[path.name] = {"error": f"unreadable JSON: {e}"}

    print(f"\n==== GPU session summary ({mode}) ====")
    envs = {key: p.get("environment", {}) for key, p in payloads.items()}
    for key, env in envs.items():
        print(environment_line(key, env))
    print(
        text_table(
            ["step", "status", "exit", "seconds", "detail"],
            [[s["step"], s["status"], s["exit_code"], f"{s['seconds']:.0f}", s["detail"]] for s in steps],
        )
    )
    print("\nours / official (official measured in this session where it says so, else quoted):")

    def ratio(entry, key):
        if f"{key}_seconds" not in entry:
            return "-"
        text = f"{entry[f'{key}_seconds']:.3g} s"
        if entry.get(f"{key}_passes") is not None:
            text += f" {entry[f'{key}_passes']}p"
        return text + (f" = {entry[f'{key}_ratio']:.3f}x" if f"{key}_ratio" in entry else "")

    print(
        text_table(
            ["run", "ours cudnn", "ours FA3", "ours compiled", "cudnn, torch forms", "official", "target"],
            [
                [
                    e["name"],
                    ratio(e, "ours_cudnn"),
                    ratio(e, "ours_fa3"),
                    ratio(e, "ours_compiled"),
                    ratio(e, "ours_torch_forms"),
                    f"{e['official_seconds']:.3g} s ({e['official_source']})" if "official_seconds" in e else "-",
                    target_text(e),
                ]
                for e in comparison
            ],
        )
    )
    kernels = attention_rows(payloads)
    if kernels:
        print("\none joint attention call per backend (error: against float32 attention of the same inputs):")
        print(
            text_table(
                ["call", "seconds", "TFLOP/s", "rel err", "max abs"],
                [
                    [
                        r["name"],
                        cell(r.get("seconds")) if "error" not in r else f"FAILED: {r['error']}",
                        cell(r.get("tflops")),
                        cell(r.get("relative_error")),
                        cell(r.get("max_abs_error")),
                    ]
                    for r in kernels
                ],
            )
        )
    if agreement:
        print("\nours vs official, same weights and inputs:")
        print(
            text_table(
                ["check", "rel err", "max abs", "passed"],
                [
                    [a["name"], cell(a["relative_error"]), cell(a["max_abs_error"]), str(a.get("passed", "-"))]
                    for a in agreement
                ],
            )
        )
    for name, payload in others.items():
        rows = _other_rows(payload) if isinstance(payload, dict) else []
        print(f"\n{name}:")
        if rows:
            print(text_table(["name", "seconds", "peak GiB"], rows))
        else:
            print("\n".join(_compact(payload)) if isinstance(payload, dict) else str(payload)[:2000])
    summary = {
        "mode": mode,
        "steps": steps,
        "environments": envs,
        "comparison": comparison,
        "attention_kernels": kernels,
        "agreement": agreement,
        "agreement_failed": [a["name"] for a in agreement if a.get("passed") is False],
        "buffered_forms_differ": [
            k
            for k, env in envs.items()
            if False
            in (env.get("buffered_forms_check", {}).get(key) for key in ("bit_identical", "buffered_forms_ran"))
        ],
        "fused_ops_refused": {k: refused for k, env in envs.items() if (refused := fused_ops_refused(env))},
        "other_files": sorted(others),
    }
    write_json(summary, directory / "summary.json")
    print(f"wrote {directory / 'summary.json'}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Summarise a benchmarks/gpu_session.sh output folder.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--steps", type=Path, default=None, help="the session's step log (tab-separated)")
    parser.add_argument("--mode", default="full")
    args = parser.parse_args(argv)
    session_summary(args.directory, args.steps, args.mode)


if __name__ == "__main__":
    main()
