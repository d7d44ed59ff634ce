"""API soak test against a real headless ComfyUI with the tiny default models.

Queues N prompts one after another through the HTTP + websocket API. Every fifth prompt is bad, cycling
through a frame count the version cannot take, a model file that is not in the list, a truncated
checkpoint and an empty text prompt; one long prompt in the middle is interrupted. Requirements checked:
every good prompt yields its mp4 (17 frames, 256x144, 24 fps), every bad one its specific error message,
the prompt after the interrupt runs, the server answers at the end, and the server's RSS at the end is
within 5% of its value after the first good prompt.

Usage: python scripts/soak.py [--prompts 100] [--json out.json]   (exit status 1 if a requirement fails)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from comfy_host import ComfyServer, PromptResult, output_files  # noqa: E402
from demo_models import install_tiny_models  # noqa: E402
from shipped_workflows import use_models  # noqa: E402

WORKFLOW = REPO / "workflows" / "api" / "opensora13_t2v.json"
BAD_KINDS = ("frame_count", "unknown_file", "corrupt_checkpoint", "empty_prompt")
BAD_EVERY = 5
STEPS = 2
INTERRUPT_STEPS = 200  # long enough that the interrupt lands while sampling
LATENT = {"resolution": "144p", "aspect_ratio": "9:16", "num_frames": 17}
EXPECTED_VIDEO = {"frames": 17, "width": 256, "height": 144, "fps": 24.0}
RSS_TOLERANCE = 0.05
# glibc's dynamic thresholds keep up to ~2x the last freed big buffer at the top of the heap, so one RSS
# sample swings by ~50 MiB (4-6%) between prompts with no growth at all. A fixed trim threshold makes
# freed memory go back to the OS: RSS then shows live memory only, and a leak (live objects) still counts.
FIXED_TRIM_ENV = {"MALLOC_TRIM_THRESHOLD_": str(4 * 2**20)}
# Exceptions that mean a code path failed without saying what was wrong with the input.
GENERIC_EXCEPTIONS = ("AssertionError", "KeyError", "IndexError", "AttributeError", "TypeError", "NameError")


@dataclass
class PromptRecord:
    index: int
    kind: str  # "good", "interrupt" or one of BAD_KINDS
    status: str  # the client's: success / error / interrupted / rejected
    seconds: float
    rss_bytes: int
    detail: str = ""  # the mp4 path, the error message or the steps reached
    problem: str = ""  # empty when the prompt behaved as required


@dataclass
class SoakReport:
    prompts: int
    records: list[PromptRecord] = field(default_factory=list)
    rss_after_first_good: int = 0
    rss_end: int = 0
    rss_peak: int = 0
    server_answered_at_end: bool = False
    server_env: dict = field(default_factory=dict)
    rss_tolerance: float | None = RSS_TOLERANCE  # None: RSS reported, not checked
    duration_seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def count(self, kind: str | None = None, status: str | None = None) -> int:
        return sum(1 for r in self.records if kind in (None, r.kind) and status in (None, r.status))

    @property
    def bad(self) -> int:
        return sum(1 for r in self.records if r.kind in BAD_KINDS)

    @property
    def rss_delta(self) -> float:
        return (
            (self.rss_end - self.rss_after_first_good) / self.rss_after_first_good if self.rss_after_first_good else 0
        )

    @property
    def mp4s_verified(self) -> int:
        return sum(1 for r in self.records if r.kind == "good" and not r.problem)

    def summary(self) -> str:
        mib = 2**20
        bound = "(not checked)" if self.rss_tolerance is None else f"(bound {100 * self.rss_tolerance:.0f}%)"
        rows = [
            ("prompts", self.prompts),
            ("good", self.count("good")),
            ("bad", self.bad),
            *((f"  errors seen: {kind}", self.count(kind, None) - self.failed(kind)) for kind in BAD_KINDS),
            ("interrupted", self.count("interrupt", "interrupted")),
            ("mp4s verified", f"{self.mp4s_verified} of {self.count('good')}"),
            ("RSS after first good prompt", f"{self.rss_after_first_good / mib:.1f} MiB"),
            ("RSS at end", f"{self.rss_end / mib:.1f} MiB"),
            ("RSS delta", f"{100 * self.rss_delta:+.2f}% " + bound),
            ("RSS peak", f"{self.rss_peak / mib:.1f} MiB"),
            ("server answered at end", self.server_answered_at_end),
            ("server env", " ".join(f"{k}={v}" for k, v in self.server_env.items()) or "(glibc defaults)"),
            ("duration", f"{self.duration_seconds:.1f} s"),
            ("result", "PASS" if not self.failures else f"FAIL ({len(self.failures)})"),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines += [f"  - {failure}" for failure in self.failures]
        return "\n".join(lines)

    def failed(self, kind: str) -> int:
        return sum(1 for r in self.records if r.kind == kind and r.problem)

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(
            good=self.count("good"),
            bad=self.bad,
            interrupted=self.count("interrupt", "interrupted"),
            mp4s_verified=self.mp4s_verified,
            rss_delta=self.rss_delta,
            errors_seen={kind: self.count(kind) - self.failed(kind) for kind in BAD_KINDS},
        )
        return out


# -- the plan ----------------------------------------------------------------------------------------------
def plan(prompts: int) -> list[str]:
    """The kind of each prompt: every fifth bad (kinds in turn), one interrupt near the middle, the rest good."""
    if prompts < BAD_EVERY * len(BAD_KINDS):
        raise ValueError(
            f"the soak needs at least {BAD_EVERY * len(BAD_KINDS)} prompts (one of each bad kind); got {prompts}"
        )
    kinds = []
    for index in range(prompts):
        if (index + 1) % BAD_EVERY == 0:
            kinds.append(BAD_KINDS[((index + 1) // BAD_EVERY - 1) % len(BAD_KINDS)])
        else:
            kinds.append("good")
    # The interrupt takes a good slot whose next prompt is good too, so "the next prompt runs" is tested.
    middle = next(i for i in range(prompts // 2, prompts - 1) if kinds[i] == kinds[i + 1] == "good")
    kinds[middle] = "interrupt"
    return kinds


# -- prompts ------------------------------------------------------------------------------------------------
def node_of(prompt: dict, class_type: str) -> dict:
    return next(node for node in prompt.values() if node["class_type"] == class_type)


def good_prompt(server: ComfyServer, seed: int, steps: int = STEPS) -> dict:
    """The shipped 1.3 text-to-video workflow on the tiny models at 144p / 17 frames."""
    prompt = use_models(json.loads(WORKFLOW.read_text()), server.tiny_models)
    node_of(prompt, "OpenSoraEmptyLatentVideo")["inputs"].update(LATENT)
    # A new seed each time so ComfyUI's cache cannot skip the sampler, decoder and writer.
    node_of(prompt, "OpenSoraSampler")["inputs"].update(seed=seed, steps=steps)
    node_of(prompt, "SaveVideo")["inputs"]["filename_prefix"] = "soak/v13"
    return prompt


def bad_prompt(server: ComfyServer, kind: str, index: int) -> tuple[dict, str]:
    """A prompt with one thing wrong, and the thing the error must name."""
    prompt = good_prompt(server, seed=index)
    if kind == "frame_count":
        node_of(prompt, "OpenSoraEmptyLatentVideo")["inputs"]["num_frames"] = 50
        return prompt, "50"
    if kind == "unknown_file":
        name = f"no_such_model_{index}.safetensors"
        node_of(prompt, "OpenSoraLoadDiT")["inputs"]["dit_name"] = name
        return prompt, name
    if kind == "corrupt_checkpoint":
        # A truncated copy of the tiny DiT, cut at a different place each time (a new file for the list too).
        source = server.models / "diffusion_models" / server.tiny_models["dit_1.3"].rstrip("/") / "model.safetensors"
        data = source.read_bytes()
        name = f"soak_truncated_{index}.safetensors"
        (server.models / "diffusion_models" / name).write_bytes(data[: len(data) * (30 + index % 50) // 100])
        node_of(prompt, "OpenSoraLoadDiT")["inputs"]["dit_name"] = name
        return prompt, name
    if kind == "empty_prompt":
        node_of(prompt, "OpenSoraEncodePrompt")["inputs"]["prompt"] = "" if index % 2 else "  \n\t "
        return prompt, "empty"
    raise ValueError(f"unknown bad-prompt kind {kind!r}; known: {', '.join(BAD_KINDS)}")


# -- checks -------------------------------------------------------------------------------------------------
def video_properties(path: Path) -> dict:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return {
            "frames": frames,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(stream.average_rate),
        }


def check_video(result: PromptResult, base: Path) -> tuple[str, str]:
    """(detail, problem) for a prompt that should have written one mp4."""
    if not result.ok:
        return "", f"status {result.status}: {json.dumps(result.error)[:600]}"
    files = output_files(result, base)
    if len(files) != 1:
        return "", f"expected one mp4, the outputs name {len(files)}: {result.outputs}"
    path = files[0]
    if not path.is_file() or path.stat().st_size == 0:
        return str(path), f"{path} is missing or empty"
    found = video_properties(path)
    if found != EXPECTED_VIDEO:
        return str(path), f"{path.name}: {found}, expected {EXPECTED_VIDEO}"
    return str(path), ""


def error_messages(result: PromptResult) -> tuple[str, list[str]]:
    """(node class, messages) from a rejected prompt's node_errors or an execution_error."""
    if result.status == "rejected":
        node_errors = (result.error or {}).get("node_errors", {})
        for node in node_errors.values():
            return node.get("class_type", ""), [e.get("details") or e.get("message", "") for e in node["errors"]]
        return "", [json.dumps(result.error)]
    if result.status == "error":
        error = result.error or {}
        exception_type = str(error.get("exception_type", "")).rsplit(".", 1)[-1]
        message = str(error.get("exception_message", "")).strip()
        if exception_type in GENERIC_EXCEPTIONS:
            message = f"[generic {exception_type}] {message}"
        return error.get("node_type", ""), [message]
    return "", []


# What each bad kind must give: the client status, the node that reports it, words the message must hold.
EXPECTED_ERRORS = {
    "frame_count": ("rejected", "OpenSoraEmptyLatentVideo", ("Open-Sora 1.3", "17, 33", "got {needle}")),
    "unknown_file": ("rejected", "OpenSoraLoadDiT", ("'{needle}' not in",)),
    "corrupt_checkpoint": ("error", "OpenSoraLoadDiT", ("{needle}", "truncated", "bytes")),
    "empty_prompt": ("error", "OpenSoraEncodePrompt", ("prompt is {needle}",)),
}


def check_error(kind: str, result: PromptResult, needle: str) -> tuple[str, str]:
    """(message, problem) for a bad prompt: the right status, node and a specific, non-traceback message."""
    status, node_class, words = EXPECTED_ERRORS[kind]
    found_class, messages = error_messages(result)
    message = messages[0] if messages else ""
    if result.status != status:
        return message, f"status {result.status}, expected {status}: {json.dumps(result.error)[:600]}"
    if found_class != node_class:
        return message, f"the error came from {found_class!r}, expected {node_class}"
    wanted = [word.format(needle=needle) for word in words]
    specific = [
        m for m in messages if all(w in m for w in wanted) and "Traceback" not in m and not m.startswith("[generic")
    ]
    if not specific:
        return message, f"no message holds {wanted}: {messages[:2]}"
    return specific[0], ""


# -- running ------------------------------------------------------------------------------------------------
def check_server_process(server: ComfyServer) -> None:
    """RSS must be read from the python main.py process itself, not from a shell around it."""
    pid = server.proc.pid
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    executable = os.readlink(f"/proc/{pid}/exe")
    if "python" not in Path(executable).name or b"main.py" not in argv[:3]:
        raise RuntimeError(f"pid {pid} is {executable} {argv[:3]}, not the python main.py server process")


def boot_server(base: Path | None = None, server_env: dict[str, str] | None = None) -> ComfyServer:
    """A fresh server (so RSS starts from a new process) with the tiny models installed.

    server_env: extra environment for the server process only (default FIXED_TRIM_ENV; {} = glibc defaults).
    """
    server_env = FIXED_TRIM_ENV if server_env is None else server_env
    server = ComfyServer(base_dir=base)
    server.prepare()
    server.tiny_models = install_tiny_models(server.models, versions=("1.3",))
    server.soak_env = dict(server_env)
    saved = {name: os.environ.get(name) for name in server_env}
    os.environ.update(server_env)  # ComfyServer.start passes os.environ on; put it back right after
    try:
        server.start()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    check_server_process(server)
    return server


def run_interrupted(server: ComfyServer, seed: int) -> tuple[PromptResult, list[int]]:
    """A long prompt, interrupted through /interrupt once sampling has made progress."""
    prompt = good_prompt(server, seed, steps=INTERRUPT_STEPS)
    sampler = next(key for key, node in prompt.items() if node["class_type"] == "OpenSoraSampler")
    steps_seen: list[int] = []
    started = threading.Event()

    def on_message(message: dict) -> None:
        if message["type"] == "progress" and message["data"].get("node") == sampler:
            steps_seen.append(message["data"]["value"])
            started.set()

    def interrupt_when_sampling() -> None:
        started.wait(timeout=300)
        server.post_json("/interrupt", {})

    thread = threading.Thread(target=interrupt_when_sampling, daemon=True)
    thread.start()
    result = server.client().run(prompt, timeout=600, on_message=on_message)
    started.set()
    thread.join(timeout=60)
    return result, steps_seen


def run_soak(
    server: ComfyServer, prompts: int = 100, rss_tolerance: float | None = RSS_TOLERANCE, log=None
) -> SoakReport:
    kinds = plan(prompts)
    log = log or (lambda line: print(line, flush=True))
    report = SoakReport(prompts=prompts, server_env=getattr(server, "soak_env", {}), rss_tolerance=rss_tolerance)
    client = server.client()
    start = time.monotonic()
    for index, kind in enumerate(kinds):
        began = time.monotonic()
        if kind == "good":
            result = client.run(good_prompt(server, seed=1000 + index), timeout=600)
            detail, problem = check_video(result, server.base)
        elif kind == "interrupt":
            result, steps_seen = run_interrupted(server, seed=900_000 + index)
            detail = f"interrupted at step {max(steps_seen, default=0)} of {INTERRUPT_STEPS}"
            problem = ""
            if result.status != "interrupted":
                problem = f"status {result.status}, expected interrupted"
            elif not steps_seen or max(steps_seen) >= INTERRUPT_STEPS:
                problem = f"the interrupt did not land during sampling (steps seen: {steps_seen[-3:]})"
        else:
            prompt, needle = bad_prompt(server, kind, index)
            result = client.run(prompt, timeout=600)
            detail, problem = check_error(kind, result, needle)
        rss = server.rss_bytes()
        record = PromptRecord(index, kind, result.status, round(time.monotonic() - began, 3), rss, detail, problem)
        report.records.append(record)
        if kind == "good" and not problem and not report.rss_after_first_good:
            report.rss_after_first_good = rss
        report.rss_peak = max(report.rss_peak, rss)
        mark = "ok" if not problem else f"PROBLEM: {problem}"
        log(
            f"[soak] {index + 1:3d}/{prompts} {kind:<18} {result.status:<11} {record.seconds:6.2f}s rss {rss / 2**20:7.1f} MiB  {mark}"
        )
        if problem:
            report.failures.append(f"prompt {index + 1} ({kind}): {problem}")
        if index > 0 and kinds[index - 1] == "interrupt" and kind == "good" and problem:
            report.failures.append(f"prompt {index + 1}: the prompt after the interrupt did not run")

    try:
        stats = server.get_json("/system_stats", timeout=30)
        queue = server.get_json("/queue", timeout=30)
    except Exception as e:  # not answering is the finding
        report.failures.append(f"the server did not answer /system_stats at the end: {e!r}")
    else:
        report.server_answered_at_end = bool(stats.get("system"))
        if not report.server_answered_at_end:
            report.failures.append(f"/system_stats answered without a system section: {stats}")
        if queue.get("queue_running") or queue.get("queue_pending"):
            report.failures.append(f"the queue is not empty at the end: {queue}")
    report.rss_end = server.rss_bytes()
    report.rss_peak = max(report.rss_peak, report.rss_end)
    report.duration_seconds = round(time.monotonic() - start, 1)

    if not report.rss_after_first_good:
        report.failures.append("no good prompt succeeded, so there is no RSS baseline")
    elif rss_tolerance is not None and abs(report.rss_delta) > rss_tolerance:
        report.failures.append(
            f"RSS at the end {report.rss_end / 2**20:.1f} MiB is {100 * report.rss_delta:+.2f}% from "
            f"{report.rss_after_first_good / 2**20:.1f} MiB after the first good prompt (bound {100 * rss_tolerance:.0f}%)"
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=100, help="how many prompts to queue (at least 20)")
    parser.add_argument("--json", type=Path, help="write the figures and every prompt's record here")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's dynamic trim threshold on (then single RSS samples swing by ~50 MiB)",
    )
    args = parser.parse_args(argv)
    plan(args.prompts)  # a bad count fails before booting anything

    start = time.monotonic()
    server = boot_server(server_env={} if args.default_malloc else None)
    print(f"[soak] ComfyUI up on {server.url} (pid {server.proc.pid}) after {time.monotonic() - start:.1f}s")
    try:
        report = run_soak(server, args.prompts)
    finally:
        server.cleanup()
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=1))
        print(f"[soak] figures written to {args.json}")
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
