// Open-Sora web extension: live derived values and warnings on "Open-Sora Empty Latent Video".
//
// Shows pixel size, latent size, tokens and duration as the widgets change, and a red warning, outline
// and title badge for what the chosen version cannot take, before the user queues. The numbers come
// from the server's rules (GET /opensora/size_rules, one rule set per version choice, "2.0 DC-AE" included),
// evaluated by opensora_rules.js.
//
// Also:
// - "Open-Sora Save Prompt Embeds" shows the file it saved and lists it on the graph's Load Prompt Embeds nodes;
// - "Open-Sora Encode Prompt" greys out the inputs the linked text encoder's version ignores (1.x: aesthetic /
//   motion score, camera motion; 2.0: motion_score_v2, fps), and "Open-Sora Sampler" the inputs its latent's version
//   ignores (SAMPLER_IGNORES);
// - a new "Open-Sora Encode Reference" starts with its seed's "control after generate" on "fixed". The frontend adds
//   that control to every INT named seed, on "randomize"; here the seed is the 1.x VAE posterior sample's, so
//   randomizing it changed an image-to-video result on every Run with the Sampler's seed fixed.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { derive } from "./opensora_rules.js";

const NODE_TYPE = "OpenSoraEmptyLatentVideo";
const REFERENCE_NODE_TYPE = "OpenSoraEncodeReference";
const PROMPT_NODE_TYPE = "OpenSoraEncodePrompt";
const SAVE_EMBEDS_NODE_TYPE = "OpenSoraSavePromptEmbeds";
const LOAD_EMBEDS_NODE_TYPE = "OpenSoraLoadPromptEmbeds";
const SAVED_PREFIX = "saved opensora_prompts/"; // Save Prompt Embeds' ui.text, before the name Load lists
// Encode Prompt's inputs that only one generation reads (the other ignores them): greyed out for the other one,
// when the text encoder's version is known from a linked Load Open-Sora Text Encoder.
const PROMPT_INPUTS_OF = { "1.x": ["aesthetic_score", "motion_score", "camera_motion"], "2.0": ["motion_score_v2", "fps"] };
// The Open-Sora Sampler's inputs each version ignores, greyed out when the linked latent's version is known (from its
// Empty Latent Video, also through Encode Reference).
const SAMPLER_NODE_TYPE = "OpenSoraSampler";
const LOOP_INPUTS = ["loops", "condition_frame_length", "condition_frame_edit"];
const SAMPLER_IGNORES = {
  "1.2": ["image_cfg", "oscillation", "image_oscillation", "scale_image_weight", "sdedit", "flaw_fix", "guidance_passes"],
  "1.3": ["guidance_passes"],
  "2.0": ["sdedit", "flaw_fix", ...LOOP_INPUTS],
};
const RULES_ROUTE = "/opensora/size_rules";
const INFO_WIDGET = "opensora_info";
const INPUT_NAMES = ["version", "resolution", "aspect_ratio", "num_frames", "batch_size", "width", "height", "fps"];
const COLORS = { text: "#c8d0c8", label: "#8a948a", error: "#ff5a5a", note: "#f0b43c" };

// ---------------------------------------------------------------------------------------------
// Loading the rules
// ---------------------------------------------------------------------------------------------

let rulesPromise = null;
const state = { rules: null, failure: null };

function loadRules() {
  if (!rulesPromise) {
    rulesPromise = (async () => {
      try {
        const response = await api.fetchApi(RULES_ROUTE, { cache: "no-store" });
        if (!response.ok) throw new Error(`GET ${RULES_ROUTE} answered ${response.status}`);
        state.rules = await response.json();
      } catch (error) {
        // A warning, not an error: the graph stays usable, the node says what is missing.
        state.failure = `Open-Sora size rules unavailable (${error.message})`;
        console.warn(`[Open-Sora] ${state.failure}`);
      }
      refreshAll();
      return state.rules;
    })();
  }
  return rulesPromise;
}

// ---------------------------------------------------------------------------------------------
// The node side
// ---------------------------------------------------------------------------------------------

function formatNumber(value) {
  return value == null ? "?" : Number(value).toLocaleString("en-US");
}

/** The value a widget stands for, following a link to a primitive node when the input is connected. */
function inputValue(node, name) {
  const widget = widgetNamed(node, name);
  const index = node.inputs?.findIndex((input) => input.name === name || input.widget?.name === name) ?? -1;
  const linked = index >= 0 && node.inputs[index].link != null;
  if (linked) {
    const source = typeof node.getInputNode === "function" ? node.getInputNode(index) : null;
    // Only a primitive's value is known here (core PrimitiveInt & co. name it "value"; the frontend's
    // PrimitiveNode holds one widget); any other node computes it when the prompt runs.
    const sourceWidget = source?.widgets?.find((w) => w.name === "value") ??
      (source?.type === "PrimitiveNode" ? source.widgets?.[0] : undefined);
    if (sourceWidget) return sourceWidget.value;
    return undefined;
  }
  return widget?.value;
}

function readValues(node) {
  const values = {};
  for (const name of INPUT_NAMES) values[name] = inputValue(node, name);
  // Optional inputs that are missing mean their defaults, as on the Python side.
  values.width ??= 0;
  values.height ??= 0;
  values.fps ??= 24;
  values.batch_size ??= 1;
  return values;
}

function line(role, text, color) {
  const row = document.createElement("div");
  row.dataset.role = role;
  row.textContent = text;
  row.style.color = color;
  row.style.whiteSpace = "normal";
  row.style.overflowWrap = "anywhere";
  return row;
}

function describe(node) {
  const values = readValues(node);
  const missing = INPUT_NAMES.filter((name) => values[name] === undefined);
  if (state.failure) return { rows: [["warning", `⚠ ${state.failure}`, COLORS.error]], invalid: false };
  if (!state.rules) return { rows: [["status", "loading Open-Sora size rules...", COLORS.label]], invalid: false };
  if (missing.length) {
    return { rows: [["status", `derived values need ${missing.join(", ")} (connected to a non-primitive input)`, COLORS.label]], invalid: false };
  }
  const derived = derive(state.rules, values);
  const rows = [];
  const [t, h, w] = derived.latent ?? [null, null, null];
  if (derived.pixels) rows.push(["pixels", `pixels ${derived.pixels[0]}×${derived.pixels[1]} (W×H, ${derived.sizeSource})`, COLORS.text]);
  if (derived.latent) {
    const channels = derived.channels ? `, ${derived.channels} ch` : "";
    rows.push(["latent", `latent ${t ?? "?"}×${h}×${w} (T×H×W${channels})`, COLORS.text]);
    rows.push(["tokens", `tokens ${formatNumber(derived.tokensPerFrame)} / frame, ${formatNumber(derived.tokens)} total`, COLORS.text]);
  }
  if (derived.seconds != null) {
    rows.push(["duration", `duration ${derived.seconds.toFixed(2)} s (${values.num_frames} frames at ${values.fps} fps)`, COLORS.text]);
  }
  for (const error of derived.errors) rows.push(["warning", `⚠ ${error}`, COLORS.error]);
  if (node.opensora?.adapted) rows.push(["note", `• ${node.opensora.adapted}`, COLORS.note]);
  for (const note of derived.notes) rows.push(["note", `• ${note}`, COLORS.note]);
  return { rows, invalid: derived.errors.length > 0 };
}

function signature(node) {
  return JSON.stringify([readValues(node), !!state.rules, state.failure]);
}

const BADGE_TEXT = "⚠ invalid for Open-Sora";

function makeBadge(node) {
  const Badge = globalThis.LGraphBadge;
  if (typeof Badge !== "function" || !Array.isArray(node.badges)) return null;
  const badge = new Badge({ text: "", fgColor: "#ffffff", bgColor: "#b3261e" });
  node.badges.push(() => badge); // empty text = not drawn
  return badge;
}

const LINE_HEIGHT = 15;
const CHAR_WIDTH = 6.7; // 11px monospace

/** Height the info text needs at the node's current width (long warnings wrap). */
function infoHeight(node, element) {
  const rows = [...element.children];
  // Laid out on the page: the rows' own heights (not the container's, which the frontend stretches).
  const measured = rows.reduce((sum, row) => sum + row.offsetHeight, 0);
  if (element.isConnected && measured > 0) return 8 + measured;
  // Not laid out yet: estimate, leaving room for word wrapping.
  const perLine = Math.max(20, Math.floor((0.85 * ((node.size?.[0] ?? 300) - 28)) / CHAR_WIDTH));
  let lines = 0;
  for (const row of rows) lines += Math.max(1, Math.ceil(row.textContent.length / perLine));
  return 8 + LINE_HEIGHT * Math.max(1, lines);
}

function addInfoWidget(node) {
  const element = document.createElement("div");
  element.className = "opensora-info";
  Object.assign(element.style, {
    font: "11px monospace",
    lineHeight: `${LINE_HEIGHT}px`,
    padding: "2px 4px",
    color: COLORS.text,
    boxSizing: "border-box",
    overflow: "hidden",
    pointerEvents: "none",
  });
  let widget = null;
  if (typeof node.addDOMWidget === "function") {
    widget = node.addDOMWidget(INFO_WIDGET, "opensora_info", element, {
      serialize: false, // display only: no workflow value, nothing in the API prompt
      hideOnZoom: false,
      getValue: () => "",
      setValue: () => {},
      getMinHeight: () => infoHeight(node, element),
    });
  } else if (typeof node.addCustomWidget === "function") {
    // Frontends without DOM widgets: draw the same lines on the canvas.
    widget = node.addCustomWidget({
      name: INFO_WIDGET,
      type: "opensora_info",
      value: "",
      options: { serialize: false },
      draw(ctx, _node, width, y) {
        ctx.save();
        ctx.font = "11px monospace";
        let offset = y + 12;
        for (const row of element.children) {
          ctx.fillStyle = row.style.color || COLORS.text;
          ctx.fillText(row.textContent, 10, offset, width - 20);
          offset += LINE_HEIGHT;
        }
        ctx.restore();
      },
      computeSize: (width) => [width, infoHeight(node, element)],
    });
  }
  if (widget) widget.serialize = false;
  return { element, widget };
}

/** List a just-saved prompt file on the graph's Load Prompt Embeds nodes (no refresh needed); one with no file
 * chosen yet (its list was empty) takes it. */
function offerSavedPrompt(graph, name) {
  for (const node of graph?.nodes ?? []) {
    if (node.comfyClass !== LOAD_EMBEDS_NODE_TYPE && node.type !== LOAD_EMBEDS_NODE_TYPE) continue;
    const widget = widgetNamed(node, "prompt_file");
    const values = widget?.options?.values;
    if (!Array.isArray(values)) continue;
    if (!values.includes(name)) {
      values.push(name);
      values.sort();
    }
    if (!values.includes(widget.value)) widget.value = name;
  }
}

function refresh(node, force = false, configuring = false) {
  const info = node.opensora;
  if (!info) return;
  const current = signature(node);
  if (!force && current === info.signature) return;
  info.signature = current;
  const { rows, invalid } = describe(node);
  info.element.replaceChildren(...rows.map(([role, text, color]) => line(role, text, color)));
  info.element.dataset.invalid = String(invalid);
  info.invalid = invalid;
  if (info.badge) info.badge.text = invalid ? BADGE_TEXT : "";
  applyVersionWidgets(node);
  const height = infoHeight(node, info.element);
  if (height !== info.height || force) fitHeight(node, !configuring);
  info.height = height;
  node.setDirtyCanvas?.(true, true);
}

// The widgets follow the chosen version's rules:
// - the resolution and aspect lists hold only its presets (the node definition holds every version's);
// - the width / height arrows move on its size grid (1.x: 8, 2.0: 16, 2.0 DC-AE: 32), so a click from a valid size
//   lands on the next valid one (the frontend also snaps a typed INT to step2's grid from min);
// - the num_frames arrows move on its frame grid (1.3: 16, 2.0: 4) through `step` alone: with step2 the frontend
//   would snap typed counts to 1 + k x step, which the DC-AE's 4k is not, so a typed count stays as typed (and is
//   checked).
function applyVersionWidgets(node) {
  const rules = state.rules?.[widgetNamed(node, "version")?.value];
  const multiple = Math.max(8, rules?.size_limits?.multiple_of ?? 8);
  const presets = { resolution: rules?.resolutions, aspect_ratio: rules?.aspect_ratios };
  for (const widget of node.widgets ?? []) {
    if (!widget.options) continue;
    if (presets[widget.name] && Array.isArray(widget.options.values)) {
      widget.options.values = presets[widget.name];
    } else if (widget.name === "width" || widget.name === "height") {
      widget.options.step2 = multiple; // the increment on current frontends
      widget.options.step = multiple * 10; // LiteGraph's older convention: ten times the increment
    } else if (widget.name === "num_frames") {
      delete widget.options.step2; // no snapping; the arrows fall back to step / 10 (Vue widgets read 0 as a step)
      widget.options.step = (rules?.frames?.step ?? 1) * 10;
    }
  }
}

function fitHeight(node, shrink) {
  if (typeof node.computeSize !== "function" || typeof node.setSize !== "function") return;
  const wanted = node.computeSize();
  // A loaded workflow keeps the size it was saved with unless the text needs more room.
  const height = shrink ? wanted[1] : Math.max(node.size[1], wanted[1]);
  node.setSize([Math.max(node.size[0], wanted[0]), height]);
}

// Set-up nodes, so the rules' arrival can refresh them without touching app.graph (newer frontends
// log an error when it is read before the graph exists).
const liveNodes = new Set();

function refreshAll() {
  for (const node of liveNodes) refresh(node, true);
}

function chain(object, name, after) {
  const original = object[name];
  object[name] = function (...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

function watchWidgets(node) {
  for (const widget of node.widgets ?? []) {
    if (!INPUT_NAMES.includes(widget.name)) continue;
    chain(widget, "callback", () => {
      if (widget.name === "version") {
        const from = node.opensora.version;
        node.opensora.version = widget.value;
        if (from !== widget.value) adaptToVersion(node, from, widget.value);
      } else {
        node.opensora.adapted = null; // the user's own edit: the note about the version change is done
      }
      refresh(node);
    });
  }
}

function widgetNamed(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

/** The frame count nearest n that a version's rule (rules.frames) takes: 1 (an image), or min + k x step up to max. */
function nearestFrames(frames, n) {
  if (n === 1 && frames.image) return 1;
  const offset = frames.min % frames.step;
  const snapped = Math.round((n - offset) / frames.step) * frames.step + offset;
  return Math.min(frames.max, Math.max(frames.min, snapped));
}

// The user picked another version (a loaded workflow keeps its values): keep the picture's orientation (1.x writes
// aspect ratios H:W, 2.0 W:H, so "9:16" flips) and move what the new version cannot take to what it can (its default
// preset, the nearest frame count); the node notes each change.
function adaptToVersion(node, from, to) {
  const target = state.rules?.[to];
  if (!target) return;
  const changes = [];
  const set = (name, value) => {
    const widget = widgetNamed(node, name);
    if (!widget || widget.value === value) return;
    changes.push(`${name} ${widget.value} → ${value}`);
    widget.value = value;
  };
  const aspect = widgetNamed(node, "aspect_ratio")?.value;
  if (state.rules?.[from] && state.rules[from].aspect_ratio_order !== target.aspect_ratio_order) {
    const flipped = String(aspect).split(":").reverse().join(":");
    if (target.aspect_ratios.includes(flipped)) set("aspect_ratio", flipped);
  }
  if (!target.aspect_ratios.includes(widgetNamed(node, "aspect_ratio")?.value)) {
    set("aspect_ratio", target.defaults.aspect_ratio);
  }
  if (!target.resolutions.includes(widgetNamed(node, "resolution")?.value)) set("resolution", target.defaults.resolution);
  const frames = widgetNamed(node, "num_frames")?.value;
  if (typeof frames === "number") set("num_frames", nearestFrames(target.frames, frames));
  node.opensora.adapted = changes.length ? `for ${to}: ${changes.join(", ")}` : null;
}

/** The version of the Load Open-Sora Text Encoder linked to an Encode Prompt (undefined when not known). */
function encoderVersion(node) {
  const index = node.inputs?.findIndex((input) => input.name === "text_encoder") ?? -1;
  const source = index >= 0 && node.inputs[index].link != null ? node.getInputNode?.(index) : null;
  return source?.type === "OpenSoraLoadTextEncoder" ? widgetNamed(source, "version")?.value : undefined;
}

/** The version of the Empty Latent Video behind a node's latent input, also through Encode Reference. */
function latentVersion(node, depth = 0) {
  const index = node.inputs?.findIndex((input) => input.name === "latent") ?? -1;
  const source = index >= 0 && node.inputs[index].link != null ? node.getInputNode?.(index) : null;
  if (source?.type === NODE_TYPE) return widgetNamed(source, "version")?.value;
  return source?.type === REFERENCE_NODE_TYPE && depth < 8 ? latentVersion(source, depth + 1) : undefined;
}

/** Grey out the widgets among `managed` that `ignored` names (drawn greyed; still saved and queued). */
function greyOut(node, managed, ignored) {
  let changed = false;
  for (const widget of node.widgets ?? []) {
    const disabled = ignored.includes(widget.name);
    if (managed.includes(widget.name) && !!widget.disabled !== disabled) {
      widget.disabled = disabled;
      changed = true;
    }
  }
  if (changed) node.setDirtyCanvas?.(true, true);
}

function greyOutOtherVersion(node) {
  const version = encoderVersion(node);
  const ignored = version === undefined ? [] : PROMPT_INPUTS_OF[String(version).startsWith("2.0") ? "1.x" : "2.0"];
  greyOut(node, Object.values(PROMPT_INPUTS_OF).flat(), ignored);
}

function greyOutSamplerInputs(node) {
  const version = latentVersion(node);
  const key = version === undefined ? null : String(version).startsWith("2.0") ? "2.0" : String(version);
  greyOut(node, Object.values(SAMPLER_IGNORES).flat(), SAMPLER_IGNORES[key] ?? []);
}

function drawInvalidOutline(node, ctx) {
  // Only for frontends without strokeStyles; newer ones get the outline from strokeStyles below.
  if (!node.opensora?.invalid || node.strokeStyles) return;
  const title = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  ctx.save();
  ctx.strokeStyle = COLORS.error;
  ctx.lineWidth = 3;
  ctx.strokeRect(-4, -title - 4, node.size[0] + 8, node.size[1] + title + 8);
  ctx.restore();
}

function setUpNode(node) {
  if (node.opensora) return;
  const { element } = addInfoWidget(node);
  node.opensora = { element, signature: null, invalid: false, height: 0, badge: null };
  node.opensora.version = widgetNamed(node, "version")?.value; // the last version the user saw (adaptToVersion)
  watchWidgets(node);
  node.opensora.badge = makeBadge(node);
  liveNodes.add(node);
  if (node.strokeStyles && typeof node.strokeStyles === "object") {
    node.strokeStyles.opensoraInvalid = function () {
      if (this.opensora?.invalid) return { padding: 8, lineWidth: 3, color: COLORS.error };
    };
  }
  refresh(node, true);
}

export const extension = {
  name: "OpenSora.DerivedValues",
  // The evaluator, for scripts and the browser test: app.extensions.find(e => e.name === ...).derive(...)
  derive,
  loadRules,
  async setup() {
    await loadRules();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name === PROMPT_NODE_TYPE) {
      // on every draw: the encoder's version widget or the link can change without telling this node
      chain(nodeType.prototype, "onDrawForeground", function () {
        greyOutOtherVersion(this);
      });
    }
    if (nodeData?.name === SAMPLER_NODE_TYPE) {
      chain(nodeType.prototype, "onDrawForeground", function () {
        greyOutSamplerInputs(this);
      });
    }
    if (nodeData?.name === SAVE_EMBEDS_NODE_TYPE) {
      // The server's ui.text ("saved opensora_prompts/<file>"), which the frontend does not draw for a custom node.
      chain(nodeType.prototype, "onExecuted", function (output) {
        const text = output?.text?.join?.("\n");
        if (!text) return;
        this.opensoraSaved ??= addInfoWidget(this);
        this.opensoraSaved.element.replaceChildren(line("saved", text, COLORS.text));
        fitHeight(this, false);
        if (text.startsWith(SAVED_PREFIX)) offerSavedPrompt(this.graph ?? app.graph, text.slice(SAVED_PREFIX.length));
        this.setDirtyCanvas?.(true, true);
      });
    }
    if (nodeData?.name === REFERENCE_NODE_TYPE) {
      // A loaded workflow then restores its own saved choice (configure runs after creation).
      chain(nodeType.prototype, "onNodeCreated", function () {
        const seed = widgetNamed(this, "seed");
        const control = seed?.linkedWidgets?.find((widget) => widget.name === "control_after_generate");
        if (control) control.value = "fixed";
      });
    }
    if (nodeData?.name !== NODE_TYPE) return;
    loadRules();
    const prototype = nodeType.prototype;
    chain(prototype, "onNodeCreated", function () {
      setUpNode(this);
    });
    chain(prototype, "onConfigure", function () {
      if (this.opensora) this.opensora.version = widgetNamed(this, "version")?.value; // loaded, not picked
      refresh(this, true, true);
    });
    chain(prototype, "onAdded", function () {
      if (this.opensora) liveNodes.add(this);
    });
    chain(prototype, "onRemoved", function () {
      liveNodes.delete(this);
    });
    chain(prototype, "onConnectionsChange", function () {
      refresh(this);
    });
    chain(prototype, "onWidgetChanged", function () {
      refresh(this);
    });
    chain(prototype, "onDrawForeground", function (ctx) {
      // Catches changes that bypass widget callbacks (scripts, undo, linked primitives).
      refresh(this);
      drawInvalidOutline(this, ctx);
    });
  },
};

// The same file imported under a second URL must not register twice (the frontend throws on that).
if (!app.extensions?.some((registered) => registered.name === extension.name)) app.registerExtension(extension);
