"""Drive the real ComfyUI frontend in headless Chromium (Debian's `chromium`) over the DevTools protocol.

- `Chromium`: starts the system browser with a throw-away profile and talks CDP over aiohttp's
  websocket (no browser download, no extra package). Collects console errors and page exceptions.
- `check_frontend(url, workflows, screenshot)`: opens ComfyUI, checks every UI workflow loads with all node
  types registered, and exercises the Open-Sora node's live derived values and warnings. Returns a report
  dict; raises `BrowserCheckError` with the reason when something is wrong.

Standalone: `python scripts/browser_check.py [--url http://127.0.0.1:8188]` (without --url it boots its
own ComfyUI with `comfy_host.ComfyServer`). tests/test_browser.py runs the same checks under pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
NODE_TYPE = "OpenSoraEmptyLatentVideo"
EXTENSION_NAME = "OpenSora.DerivedValues"


class BrowserCheckError(AssertionError):
    """A check against the real frontend failed; the message says which and why."""


def find_browser() -> str:
    """The Chromium executable: $CHROMIUM, else the first of chromium / google-chrome on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        if not shutil.which(env):
            raise FileNotFoundError(f"CHROMIUM={env} is not an executable")
        return shutil.which(env)
    for name in BROWSER_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("no Chromium found; run scripts/install_browser.sh (apt-get install chromium)")


class Chromium:
    """Headless Chromium with one page, driven over CDP. Use as an async context manager."""

    def __init__(self, executable: str | None = None, width: int = 1600, height: int = 1000):
        self.executable = executable or find_browser()
        self.width, self.height = width, height
        self.profile = Path(tempfile.mkdtemp(prefix="opensora-chromium-"))
        self.proc: subprocess.Popen | None = None
        self.console_errors: list[str] = []
        self.exceptions: list[str] = []
        self.network_errors: list[str] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._session = None
        self._ws = None
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> Chromium:
        import aiohttp

        args = [
            self.executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
            "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", f"--user-data-dir={self.profile}",
            f"--window-size={self.width},{self.height}", "about:blank",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.is_file() or not port_file.read_text().strip():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.executable} exited with {self.proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.executable} did not open its DevTools port within 30 s")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            targets = json.loads(response.read())
        page = next(t for t in targets if t.get("type") == "page")
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=self.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def _read(self) -> None:
        import aiohttp

        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future and not future.done():
                    future.set_result(data)
            else:
                self._on_event(data.get("method"), data.get("params", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the browser closed the DevTools connection"))

    def _on_event(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
            self.console_errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description") or details.get("text", "")
            self.exceptions.append(f"{description} ({details.get('url', '')}:{details.get('lineNumber', '?')})")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") == "error":
                text = f"{entry.get('text', '')} {entry.get('url', '')}".strip()
                # Failed requests land here; the page's own errors come as console/exception events.
                (self.network_errors if entry.get("source") == "network" else self.console_errors).append(text)

    async def send(self, method: str, timeout: float = 60.0, **params) -> dict:
        message_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        await self._ws.send_str(json.dumps({"id": message_id, "method": method, "params": params}))
        data = await asyncio.wait_for(future, timeout)
        if "error" in data:
            raise RuntimeError(f"{method} failed: {data['error'].get('message')}")
        return data.get("result", {})

    async def evaluate(self, expression: str, timeout: float = 60.0):
        """Run JavaScript (promises are awaited) and return its JSON value; JS exceptions raise."""
        result = await self.send(
            "Runtime.evaluate",
            timeout=timeout,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
            userGesture=True,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserCheckError(f"JavaScript failed: {text}")
        return result.get("result", {}).get("value")

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def wait_for(self, expression: str, timeout: float = 60.0, what: str = "") -> object:
        """Poll a JS expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = await self.evaluate(expression)
            except BrowserCheckError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserCheckError(f"timed out after {timeout:.0f}s waiting for {what or expression}")
            await asyncio.sleep(0.25)

    async def screenshot(self, path: Path) -> Path:
        data = await self.send("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------

# Page-side helpers, installed once: a probe extension that records what the frontend reports as missing,
# and functions that read the Open-Sora node's displayed text.
PAGE_HELPERS = r"""
(() => {
  const app = window.comfyAPI.app.app;
  window.__opensoraCheck = { missing: [] };
  app.registerExtension({
    name: "OpenSora.BrowserCheckProbe",
    afterConfigureGraph(missing) { window.__opensoraCheck.missing.push(...(missing ?? [])); },
  });
  const info = (node) => node.widgets?.find((w) => w.name === "opensora_info");
  window.__opensoraCheck.read = (node) => {
    const element = info(node)?.element;
    const rows = {};
    for (const row of element?.children ?? []) (rows[row.dataset.role] ??= []).push(row.textContent);
    const width = node.widgets?.find((w) => w.name === "width");
    return { text: element?.textContent ?? null, rows, invalid: element?.dataset.invalid === "true",
             widthStep: width?.options?.step2 ?? null,
             badge: node.opensora?.badge?.text ?? null,
             badgeShown: (node.badges ?? []).some((b) => (typeof b === "function" ? b() : b) === node.opensora?.badge) };
  };
  window.__opensoraCheck.set = (node, name, value) => {
    const widget = node.widgets.find((w) => w.name === name);
    if (!widget) throw new Error(`no widget ${name}`);
    // The path a user's edit takes (callback + onWidgetChanged); older frontends lack setValue.
    if (typeof widget.setValue === "function") widget.setValue(value, { e: undefined, node, canvas: app.canvas });
    else { widget.value = value; widget.callback?.(value, app.canvas, node); }
  };
  return true;
})()
"""


def ui_workflows(folder: Path) -> list[Path]:
    """UI-format workflow files (JSON with a "nodes" list) in a folder; API-format files are skipped."""
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BrowserCheckError(f"{path} is not valid JSON") from None
        if isinstance(data, dict) and isinstance(data.get("nodes"), list):
            found.append(path)
    return found


def workflow_node_types(data: dict) -> set[str]:
    types = {node["type"] for node in data.get("nodes", []) if "type" in node}
    subgraphs = data.get("definitions", {}).get("subgraphs", [])
    for subgraph in subgraphs:
        types |= {node["type"] for node in subgraph.get("nodes", []) if "type" in node}
    # A subgraph instance's "type" is its definition's id, which the frontend registers on load.
    return types - {subgraph.get("id") for subgraph in subgraphs}


def mark_tutorial_done(url: str) -> None:
    """Skip the first-run template browser so it does not cover the canvas in the screenshot."""
    request = urllib.request.Request(
        f"{url}/api/settings/Comfy.TutorialCompleted",
        data=b"true",
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except OSError:
        pass  # only cosmetic


# Ready = the node and our extension are registered and the frontend has opened its first workflow (it
# does that after app.setup, so loading ours earlier would race with it).
READY = f"""(() => {{
  const app = window.comfyAPI?.app?.app;
  if (!app?.canvas?.graph || !window.LiteGraph?.registered_node_types[{json.dumps(NODE_TYPE)}]) return false;
  if (!app.extensions?.some((e) => e.name === {json.dumps(EXTENSION_NAME)})) return false;
  const workflows = app.extensionManager?.workflow;
  return workflows ? !!workflows.activeWorkflow : true;
}})()"""


async def _open(browser: Chromium, url: str) -> None:
    await browser.navigate(url + "/")
    await browser.wait_for(READY, timeout=90, what="the ComfyUI frontend with the Open-Sora node and extension")
    await asyncio.sleep(0.5)
    await browser.evaluate(PAGE_HELPERS)


def prompt_mismatches(queued: dict, api_file: Path) -> list[str]:
    """What the frontend would queue for a UI workflow against its API twin: every node and every input the API file
    sets must be there with the same value or link (the frontend may add inputs a newer core node has)."""
    if not api_file.is_file():
        return []
    problems = []
    for node_id, node in json.loads(api_file.read_text()).items():
        got = queued.get(node_id)
        if got is None or got.get("class_type") != node["class_type"]:
            problems.append(f"node {node_id} ({node['class_type']}) is not queued as such: {got}")
            continue
        for name, value in node["inputs"].items():
            if got["inputs"].get(name) != value:
                problems.append(
                    f"node {node_id} ({node['class_type']}) queues {name}={got['inputs'].get(name)!r}, the API file {value!r}"
                )
    return problems


async def _check_workflow(browser: Chromium, path: Path) -> dict:
    data = json.loads(path.read_text())
    wanted = sorted(workflow_node_types(data))
    result = await browser.evaluate(
        f"""(async () => {{
          const app = window.comfyAPI.app.app;
          window.__opensoraCheck.missing = [];
          await app.loadGraphData({json.dumps(data)}, true, true, {json.dumps(path.name)});
          await new Promise((resolve) => setTimeout(resolve, 300));
          const unregistered = {json.dumps(wanted)}.filter((t) => !(t in LiteGraph.registered_node_types));
          const dialogs = [...document.querySelectorAll(".p-dialog")].map((d) => d.textContent);
          // close them (e.g. the missing-models dialog), so the next workflow's are its own
          for (const button of document.querySelectorAll(".p-dialog-close-button, .p-dialog-header-close")) button.click();
          await new Promise((resolve) => setTimeout(resolve, 300));
          const nodes = app.graph.nodes ?? app.graph._nodes;
          const opensora = nodes.filter((n) => n.type === {json.dumps(NODE_TYPE)})
            .map((n) => window.__opensoraCheck.read(n));
          app.canvas.draw(true, true);  // Encode Prompt and the Sampler grey their inputs while drawn
          const greyedOf = (type) => nodes.filter((n) => n.type === type)
            .map((n) => n.widgets.filter((w) => w.disabled).map((w) => w.name));
          const greyed = greyedOf("OpenSoraEncodePrompt"), samplerGreyed = greyedOf("OpenSoraSampler");
          const prompt = (await app.graphToPrompt()).output;
          return {{ missing: window.__opensoraCheck.missing.map((m) => (typeof m === "string" ? m : m.type)),
                    unregistered, dialogs, count: nodes.length, opensora, prompt, greyed, samplerGreyed }};
        }})()"""
    )
    problems = prompt_mismatches(result["prompt"], path.parent / "api" / path.name)
    if result["missing"]:
        problems.append(f"the frontend reports missing node types {result['missing']}")
    if result["unregistered"]:
        problems.append(f"node types not registered in LiteGraph: {result['unregistered']}")
    missing_dialogs = [d for d in result["dialogs"] if "missing" in d.lower() and "node" in d.lower()]
    if missing_dialogs:
        problems.append(f"missing-nodes dialog shown: {missing_dialogs[0][:300]}")
    if result["count"] != len(data["nodes"]):
        problems.append(f"{result['count']} nodes on the canvas, the file has {len(data['nodes'])}")
    for shown in result["opensora"]:
        if not shown["text"] or "latent" not in shown["text"]:
            problems.append(f"an Open-Sora Empty Latent Video shows no derived values: {shown}")
    if problems:
        raise BrowserCheckError(f"workflow {path.name}: " + "; ".join(problems))
    return {
        "workflow": path.name,
        "nodes": result["count"],
        "opensora_nodes": result["opensora"],
        "dialogs": result["dialogs"],
        "greyed": result["greyed"],
        "sampler_greyed": result["samplerGreyed"],
    }


async def _check_widget_behaviour(browser: Chromium) -> dict:
    """Add a fresh node and check its derived values and warnings follow the widgets."""
    setup = await browser.evaluate(
        f"""(async () => {{
          const app = window.comfyAPI.app.app;
          if (app.canvas?.ds) {{
            app.canvas.ds.scale = 1;
            app.canvas.ds.offset = [40, 110];
          }}
          const node = LiteGraph.createNode({json.dumps(NODE_TYPE)});
          node.pos = [280, 60];
          app.graph.add(node);
          window.__opensoraCheck.node = node;
          const check = window.__opensoraCheck;
          for (const [name, value] of [["version", "1.3"], ["resolution", "360p"], ["aspect_ratio", "9:16"],
                                       ["width", 0], ["height", 0], ["fps", 24], ["num_frames", 49]]) {{
            check.set(node, name, value);
          }}
          app.canvas.setDirty(true, true);
          await new Promise((resolve) => setTimeout(resolve, 100));
          return check.read(node);
        }})()"""
    )
    steps = {"49 frames (1.3, 360p 9:16)": setup}

    async def set_and_read(name: str, value) -> dict:
        return await browser.evaluate(
            f"""(async () => {{
              const check = window.__opensoraCheck;
              check.set(check.node, {json.dumps(name)}, {json.dumps(value)});
              await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 50)));
              return check.read(check.node);
            }})()"""
        )

    steps["97 frames"] = await set_and_read("num_frames", 97)
    steps["50 frames"] = await set_and_read("num_frames", 50)
    steps["65 frames"] = await set_and_read("num_frames", 65)
    # A second node left invalid, so the screenshot shows a valid and an invalid node side by side.
    steps["second node, 50 frames"] = await browser.evaluate(
        f"""(async () => {{
          const app = window.comfyAPI.app.app, check = window.__opensoraCheck;
          const node = LiteGraph.createNode({json.dumps(NODE_TYPE)});
          node.pos = [640, 60];
          app.graph.add(node);
          check.set(node, "num_frames", 50);
          app.canvas.setDirty(true, true);
          await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 50)));
          return check.read(node);
        }})()"""
    )
    # A third node on the Video DC-AE choice: 128 frames (the official count) is valid, 129 is not.
    for frames in (128, 129):
        steps[f"2.0 DC-AE, {frames} frames"] = await browser.evaluate(
            f"""(async () => {{
              const app = window.comfyAPI.app.app, check = window.__opensoraCheck;
              let node = check.dcae;
              if (!node) {{
                node = check.dcae = LiteGraph.createNode({json.dumps(NODE_TYPE)});
                node.pos = [1000, 60];
                app.graph.add(node);
                for (const [name, value] of [["version", "2.0 DC-AE"], ["resolution", "768px"], ["aspect_ratio", "16:9"]]) {{
                  check.set(node, name, value);
                }}
              }}
              check.set(node, "num_frames", {frames});
              app.canvas.setDirty(true, true);
              await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 50)));
              return check.read(node);
            }})()"""
        )
    # A change that bypasses the widget callback (a script, undo) must show up on the next canvas draw.
    steps["direct 33 frames"] = await browser.evaluate(
        """(async () => {
          const check = window.__opensoraCheck;
          check.node.widgets.find((w) => w.name === "num_frames").value = 33;
          window.comfyAPI.app.app.canvas.setDirty(true, true);
          await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
          await new Promise((resolve) => setTimeout(resolve, 100));
          return check.read(check.node);
        })()"""
    )
    # num_frames linked: from a primitive (core PrimitiveInt) its value is known and checked; from any other node
    # (StringLength's INT) it is not, and the node says so instead of reading that node's own widgets.
    for source, value in (("PrimitiveInt", 50), ("StringLength", "abc")):
        steps[f"num_frames linked from {source}"] = await browser.evaluate(
            f"""(async () => {{
              const app = window.comfyAPI.app.app, check = window.__opensoraCheck;
              const node = LiteGraph.createNode({json.dumps(NODE_TYPE)});
              node.pos = [280, 420];
              app.graph.add(node);
              check.set(node, "version", "1.3");
              const source = LiteGraph.createNode({json.dumps(source)});
              source.pos = [0, 420];
              app.graph.add(source);
              source.widgets[0].value = {json.dumps(value)};
              const find = () => node.inputs.findIndex((i) => i.name === "num_frames" || i.widget?.name === "num_frames");
              if (find() < 0 && node.convertWidgetToInput) {{  // older frontends: widgets become inputs first
                node.convertWidgetToInput(node.widgets.find((w) => w.name === "num_frames"));
              }}
              source.connect(0, node, find());
              app.canvas.setDirty(true, true);
              await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 100)));
              const result = check.read(node);
              app.graph.remove(node);
              app.graph.remove(source);
              return result;
            }})()"""
        )
    return steps


async def _check_version_change(browser: Chromium) -> dict:
    """A user switching Empty Latent Video's version: 1.3 360p 9:16 49 frames -> 2.0 (W:H: the aspect flips to keep
    the landscape picture), then num_frames 53 (2.0's 4k+1) -> 1.3 (16k+1: 49). Each step's values, lists, arrow
    steps and shown text."""
    return await browser.evaluate(
        f"""(async () => {{
          const app = window.comfyAPI.app.app, check = window.__opensoraCheck;
          const node = LiteGraph.createNode({json.dumps(NODE_TYPE)});
          node.pos = [280, 800];
          app.graph.add(node);
          const widget = (name) => node.widgets.find((w) => w.name === name);
          const state = async () => {{
            await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 50)));
            const values = {{}};
            for (const name of ["version", "resolution", "aspect_ratio", "num_frames"]) values[name] = widget(name).value;
            return {{ values, resolutions: [...widget("resolution").options.values],
                      aspects: [...widget("aspect_ratio").options.values],
                      framesStep: widget("num_frames").options.step / 10, shown: check.read(node) }};
          }};
          for (const [name, value] of [["version", "1.3"], ["resolution", "360p"], ["aspect_ratio", "9:16"],
                                       ["num_frames", 49]]) check.set(node, name, value);
          const steps = {{ start: await state() }};
          check.set(node, "version", "2.0");
          steps.to20 = await state();
          check.set(node, "num_frames", 53);
          steps.frames53 = await state();
          check.set(node, "version", "1.3");
          steps.to13 = await state();
          // the right arrow, as a click on it runs it (LiteGraph's NumberWidget)
          widget("num_frames").incrementValue?.({{ e: undefined, node, canvas: app.canvas }});
          steps.arrow = await state();
          app.graph.remove(node);
          return steps;
        }})()"""
    )


async def _check_reference_seed(browser: Chromium) -> dict:
    """A new Encode Reference: its seed's control after generate starts on "fixed" (the frontend's default for an
    INT named seed is "randomize"); a node configured from a saved workflow keeps the saved choice."""
    return await browser.evaluate(
        """(() => {
          const app = window.comfyAPI.app.app;
          const control = (node) => node.widgets.find((w) => w.name === "seed")
            ?.linkedWidgets?.find((w) => w.name === "control_after_generate");
          const fresh = LiteGraph.createNode("OpenSoraEncodeReference");
          app.graph.add(fresh);
          const result = { fresh: control(fresh)?.value ?? null };
          control(fresh).value = "randomize";
          const saved = fresh.serialize();
          const loaded = LiteGraph.createNode("OpenSoraEncodeReference");
          app.graph.add(loaded);
          loaded.configure(saved);
          result.loaded = control(loaded)?.value ?? null;
          app.graph.remove(fresh);
          app.graph.remove(loaded);
          return result;
        })()"""
    )


async def _check_saved_embeds(browser: Chromium) -> dict:
    """Save Prompt Embeds shows the file its run saved (the frontend hands the node the server's ui output), and the
    shown text stays out of the saved workflow."""
    return await browser.evaluate(
        """(() => {
          const app = window.comfyAPI.app.app;
          const node = LiteGraph.createNode("OpenSoraSavePromptEmbeds");
          const load = LiteGraph.createNode("OpenSoraLoadPromptEmbeds");
          app.graph.add(node);
          app.graph.add(load);
          const file = load.widgets.find((w) => w.name === "prompt_file");
          file.value = undefined;  // as with an empty list
          const before = node.widgets.length;
          node.onExecuted({ text: ["saved opensora_prompts/check/opensora_prompt_00001_.safetensors"] });
          node.onExecuted({ text: ["saved opensora_prompts/check/opensora_prompt_00002_.safetensors"] });
          const result = {
            shown: node.opensoraSaved?.element.textContent ?? null,
            added: node.widgets.length - before,
            widgets_values: node.serialize().widgets_values,
            listed: file.options.values.filter((name) => name.startsWith("check/")),
            chosen: file.value,
          };
          app.graph.remove(node);
          app.graph.remove(load);
          return result;
        })()"""
    )


async def _check_serialization(browser: Chromium) -> dict:
    """The display widget must stay out of the saved workflow and the API prompt."""
    return await browser.evaluate(
        """(async () => {
          const app = window.comfyAPI.app.app, node = window.__opensoraCheck.node;
          const saved = node.serialize();
          const prompt = await app.graphToPrompt();
          return { widgets_values: saved.widgets_values, inputs: prompt.output[String(node.id)]?.inputs ?? null };
        })()"""
    )


async def _compare_with_python(browser: Chromium, cases: list[dict]) -> list[dict]:
    """Evaluate the extension's exported `derive` on cases whose Python answers are known."""
    return await browser.evaluate(
        f"""(async () => {{
          const extension = window.comfyAPI.app.app.extensions.find((e) => e.name === {json.dumps(EXTENSION_NAME)});
          const rules = await extension.loadRules();
          return {json.dumps(cases)}.map((values) => extension.derive(rules, values));
        }})()"""
    )


CASES = [  # version, resolution, aspect_ratio, num_frames, width, height
    ("1.3", "360p", "9:16", 49, 0, 0), ("1.3", "720p", "3:4", 113, 0, 0), ("1.3", "360p", "1:1", 1, 0, 0),
    ("1.3", "720p", "9:16", 17, 200, 328), ("1.3", "720p", "9:16", 129, 0, 0), ("1.2", "240p", "9:16", 51, 0, 0),
    ("1.2", "720p", "16:9", 1, 0, 0), ("1.2", "480p", "4:3", 102, 0, 0), ("1.2", "1024", "1:1", 17, 0, 0),
    ("2.0", "256px", "16:9", 129, 0, 0), ("2.0", "768px", "9:16", 33, 0, 0), ("2.0", "256px", "1:1", 1, 0, 0),
    ("2.0", "256px", "16:9", 5, 320, 512), ("2.0", "720p", "2.39:1", 65, 0, 0),
    # invalid: frame counts, sizes, presets the version lacks
    ("1.3", "360p", "9:16", 50, 0, 0), ("1.3", "360p", "9:16", 5, 0, 0), ("1.2", "360p", "9:16", 10, 0, 0),
    ("2.0", "256px", "16:9", 50, 0, 0), ("2.0", "256px", "16:9", 129, 100, 160), ("1.3", "360p", "9:16", 49, 640, 0),
    ("1.3", "720p", "2.39:1", 49, 0, 0), ("1.2", "256px", "16:9", 51, 0, 0), ("2.0", "360p_16d", "16:9", 33, 0, 0),
    ("1.2", "360p", "9:16", 51, 8, 64),
    # the Video DC-AE choice: 1 or 4k frames up to 128, sizes on a 32-pixel grid
    ("2.0 DC-AE", "768px", "16:9", 128, 0, 0), ("2.0 DC-AE", "256px", "1:1", 1, 0, 0),
    ("2.0 DC-AE", "768px", "9:16", 16, 320, 512), ("2.0 DC-AE", "768px", "16:9", 129, 0, 0),
    ("2.0 DC-AE", "768px", "16:9", 128, 336, 192), ("2.0 DC-AE", "256px", "16:9", 5, 0, 0),
]  # fmt: skip


def python_expectations() -> list[tuple[dict, dict]]:
    """(widget values, what opensora_lib.sizes says) for CASES: the numbers when valid, else the error."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from opensora_lib import sizes  # pure PyTorch: importable without ComfyUI

    cases = []
    for choice, resolution, aspect, frames, width, height in CASES:
        values = {"version": choice, "resolution": resolution, "aspect_ratio": aspect, "num_frames": frames,
                  "batch_size": 1, "width": width, "height": height, "fps": 24}  # fmt: skip
        version, autoencoder = sizes.parse_latent_choice(choice)  # "2.0 DC-AE" -> ("2.0", "dc_ae")
        try:
            pixel_h, pixel_w = sizes.resolve_size(choice, resolution, aspect, width, height)  # the node's own rule
            latent = sizes.latent_shape(version, frames, pixel_h, pixel_w, autoencoder=autoencoder)
        except ValueError as error:
            cases.append((values, {"valid": False, "python_error": str(error)}))
            continue
        per_frame = sizes.tokens_per_frame(version, pixel_h, pixel_w, autoencoder=autoencoder)
        expected = {"valid": True, "pixels": [pixel_w, pixel_h], "latent": list(latent), "tokensPerFrame": per_frame,
                    "tokens": per_frame * latent[0]}  # fmt: skip
        cases.append((values, expected))
    return cases


def compare_derived(values: dict, derived: dict, expected: dict) -> str | None:
    """None when the page's derive() agrees with Python on one case, else the disagreement."""
    if not expected["valid"]:
        if derived["errors"]:
            return None
        return f"derive({values}) shows no error, Python says: {expected['python_error']}"
    got = {key: derived.get(key) for key in expected if key != "valid"}
    want = {key: value for key, value in expected.items() if key != "valid"}
    if derived["errors"] or got != want:
        return f"derive({values}) = {got} errors={derived['errors']}, Python says {want}"
    return None


# Zoom the canvas so the whole workflow is in the screenshot (the README shows these pictures).
FIT_GRAPH = """(() => {
  const app = window.comfyAPI.app.app;
  const nodes = app.graph.nodes ?? app.graph._nodes;
  const left = Math.min(...nodes.map((n) => n.pos[0])), top = Math.min(...nodes.map((n) => n.pos[1]));
  const right = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
  const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
  const canvas = app.canvas.canvas;
  const scale = Math.min((canvas.width - 160) / (right - left), (canvas.height - 170) / (bottom - top), 1);
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [110 / scale - left, 125 / scale - top];
  app.canvas.min_font_size_for_lod = 0;  // the screenshot shows the text at any zoom (0: never low quality)
  app.canvas.setDirty(true, true);
  return scale;
})()"""


async def run_checks(url: str, workflows_dir: Path, screenshot: Path) -> dict:
    mark_tutorial_done(url)
    async with Chromium() as browser:
        await _open(browser, url)
        report: dict = {"workflows": [], "url": url}
        report["frontend"] = await browser.evaluate("window.__COMFYUI_FRONTEND_VERSION__ ?? null")
        for path in ui_workflows(workflows_dir):
            report["workflows"].append(await _check_workflow(browser, path))
            await browser.evaluate(FIT_GRAPH)
            shot = screenshot.with_name(f"workflow_{path.stem}.png")
            report["workflows"][-1]["screenshot"] = str(await browser.screenshot(shot))
        await browser.evaluate("window.comfyAPI.app.app.graph.clear?.() ?? true")
        report["steps"] = await _check_widget_behaviour(browser)
        report["serialized"] = await _check_serialization(browser)
        report["reference_seed"] = await _check_reference_seed(browser)
        report["saved_embeds"] = await _check_saved_embeds(browser)
        report["version_change"] = await _check_version_change(browser)
        cases = python_expectations()
        derived = await _compare_with_python(browser, [values for values, _ in cases])
        report["cases"] = [
            {"values": values, "browser": got, "python": expected} for (values, expected), got in zip(cases, derived)
        ]
        await asyncio.sleep(0.3)
        report["screenshot"] = str(await browser.screenshot(screenshot))
        report["console_errors"] = list(browser.console_errors)
        report["exceptions"] = list(browser.exceptions)
        report["network_errors"] = list(browser.network_errors)
    return report


# Errors the pinned frontend logs on a bare ComfyUI too (no pack loaded), or on a machine without internet access,
# matched exactly; anything else fails.
KNOWN_FRONTEND_ERRORS = {
    # Offline (tests, CI): the missing-models dialog asks huggingface.co for the size of each file a workflow names.
    "missing-models dialog offline: no file size from huggingface.co": re.compile(
        r"^console\.error: Error fetching file size: TypeError: Failed to fetch\s+at fetchFileSize \("
    ),
    # 1.32.9 at page load: useRenderModeSetting sets a setting whose definition is not registered yet.
    "frontend 1.32.9 settings-store onChange at load": re.compile(
        r"^console\.error: TypeError: Cannot read properties of undefined \(reading 'id'\)\s+at onChange \("
    ),
    # 1.49.6 (ComfyUI 0.33.0) at page load: a settings-store computed reads ComfyApp.rootGraph before setup.
    "frontend 1.49.6 rootGraph read before setup": re.compile(
        r"^console\.error: ComfyApp graph accessed before initialization$"
    ),
}


def known_frontend_error(text: str) -> str | None:
    return next((name for name, pattern in KNOWN_FRONTEND_ERRORS.items() if pattern.search(text)), None)


def pack_request(text: str) -> bool:
    """A failed request for the pack's own files or routes (not registry look-ups or missing input images)."""
    return "/extensions/ComfyUI-OpenSora" in text or "/opensora/" in text


def assess(report: dict) -> list[str]:
    """Every problem in a `run_checks` report, as sentences; empty when the frontend behaves."""
    problems = [f"page error: {text}" for text in report["exceptions"]]
    problems += [f"console error: {text}" for text in report["console_errors"] if not known_frontend_error(text)]
    problems += [f"failed request of the pack: {text}" for text in report["network_errors"] if pack_request(text)]
    steps = report["steps"]
    first, later = steps["49 frames (1.3, 360p 9:16)"], steps["97 frames"]
    unknown = "num_frames linked from StringLength"  # its value is known only when the prompt runs
    for name, shown in steps.items():
        if name != unknown and (not shown["text"] or "latent" not in shown["text"]):
            problems.append(f"{name}: no derived values shown ({shown['text']!r})")
    if first["text"] == later["text"]:
        problems.append(f"the displayed values did not change from 49 to 97 frames: {first['text']!r}")
    for name in ("49 frames (1.3, 360p 9:16)", "97 frames", "65 frames", "direct 33 frames"):
        if steps[name]["invalid"] or steps[name]["rows"].get("warning") or steps[name]["badge"]:
            problems.append(f"{name}: a warning is shown for a valid frame count: {steps[name]}")
    for name in ("50 frames", "second node, 50 frames"):
        bad = steps[name]
        if not (bad["invalid"] and bad["rows"].get("warning") and bad["badge"] and bad["badgeShown"]):
            problems.append(f"{name} on 1.3: no warning text and badge: {bad}")
    dcae_good, dcae_bad = steps["2.0 DC-AE, 128 frames"], steps["2.0 DC-AE, 129 frames"]
    if dcae_good["invalid"] or dcae_good["rows"].get("warning") or "128 ch" not in (dcae_good["text"] or ""):
        problems.append(f"2.0 DC-AE with 128 frames: not shown as a valid 128-channel latent: {dcae_good}")
    if not (dcae_bad["invalid"] and any("4k" in row for row in dcae_bad["rows"].get("warning", []))):
        problems.append(f"2.0 DC-AE with 129 frames: no '1 or 4k' warning: {dcae_bad}")
    # the width / height arrows follow the version's size grid
    for name, step in (("49 frames (1.3, 360p 9:16)", 8), ("2.0 DC-AE, 128 frames", 32)):
        if steps[name].get("widthStep") != step:
            problems.append(f"{name}: the width widget steps by {steps[name].get('widthStep')}, not {step}")
    if report["reference_seed"] != {"fresh": "fixed", "loaded": "randomize"}:
        problems.append(
            "Encode Reference's seed control should start on 'fixed' and keep a saved choice: "
            f"{report['reference_seed']}"
        )
    expected_saved = {
        "shown": "saved opensora_prompts/check/opensora_prompt_00002_.safetensors",  # the latest run's file
        "added": 1,  # one display widget, reused by later runs
        "widgets_values": ["opensora_prompt"],
        # listed on Load Prompt Embeds at once; a Load node with no file chosen takes the first
        "listed": ["check/opensora_prompt_00001_.safetensors", "check/opensora_prompt_00002_.safetensors"],
        "chosen": "check/opensora_prompt_00001_.safetensors",
    }
    if report["saved_embeds"] != expected_saved:
        problems.append(f"Save Prompt Embeds should show its latest file: {report['saved_embeds']} != {expected_saved}")
    saved = report["serialized"]
    expected_values = ["1.3", "360p", "9:16", 33, 1, 0, 0, 24]
    if saved["widgets_values"] != expected_values:
        problems.append(f"saved widgets_values {saved['widgets_values']} != {expected_values}")
    if saved["inputs"] is None or "opensora_info" in saved["inputs"] or saved["inputs"].get("num_frames") != 33:
        problems.append(f"the API prompt's inputs for the node are wrong: {saved['inputs']}")
    for case in report["cases"]:
        disagreement = compare_derived(case["values"], case["browser"], case["python"])
        if disagreement:
            problems.append(disagreement)
    return problems


def check_frontend(url: str, workflows_dir: Path | None = None, screenshot: Path | None = None) -> dict:
    """Run every check against a running ComfyUI at `url`; returns the raw report (see tests/test_browser.py)."""
    workflows_dir = workflows_dir or REPO / "workflows"
    screenshot = screenshot or REPO / "artifacts" / "browser" / "opensora_node.png"
    return asyncio.run(run_checks(url, workflows_dir, screenshot))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running ComfyUI with this pack (default: boot one)")
    parser.add_argument("--screenshot", type=Path, default=REPO / "artifacts" / "browser" / "opensora_node.png")
    parser.add_argument("--front-end-root", help="when booting: serve this frontend build (e.g. a newer package)")
    args = parser.parse_args()
    if args.url:
        report = check_frontend(args.url.rstrip("/"), screenshot=args.screenshot)
    else:
        sys.path.insert(0, str(REPO / "scripts"))
        from comfy_host import ComfyServer

        extra = ["--front-end-root", args.front_end_root] if args.front_end_root else []
        with ComfyServer(extra_args=extra) as server:
            report = check_frontend(server.url, screenshot=args.screenshot)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    problems = assess(report)
    for problem in problems:
        print(f"FAIL: {problem}")
    print(f"screenshot: {report['screenshot']}")
    print("browser check: " + ("FAILED" if problems else "PASS"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
