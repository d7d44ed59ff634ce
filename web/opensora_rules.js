// Open-Sora size rules, evaluated in the page: the server sends them (GET /opensora/size_rules, built by
// opensora_lib/size_rules.py) and this file only interprets them; it holds no size, frame or latent constant.
// Rules are plain JSON: preset size tables, frame-count rules ({image, step, min, max, trained_max}) and
// latent formulas written as small Python-style expressions ("1 if n == 1 else (n - 1) // 16 * 5").
// No ComfyUI imports: ComfyUI loads this file as an extension too, and it has no side effects.

// ---------------------------------------------------------------------------------------------
// A tiny evaluator for the rule expressions: numbers, names, + - * / // %, comparisons, and/or/not,
// "a if cond else b", calls to ceil/floor/min/max/abs/sqrt/int, and top-level tuples "a, b".
// ---------------------------------------------------------------------------------------------

const FUNCTIONS = {
  ceil: Math.ceil,
  floor: Math.floor,
  min: Math.min,
  max: Math.max,
  abs: Math.abs,
  sqrt: Math.sqrt,
  int: Math.trunc,
};
const TOKEN = /\s*(?:(\d+(?:\.\d*)?|\.\d+)|([A-Za-z_]\w*)|(\/\/|==|!=|<=|>=|[-+*/%(),<>]))/y;

function tokenize(text) {
  const tokens = [];
  TOKEN.lastIndex = 0;
  while (TOKEN.lastIndex < text.length) {
    const start = TOKEN.lastIndex;
    const match = TOKEN.exec(text);
    if (!match) {
      if (/^\s*$/.test(text.slice(start))) break;
      throw new Error(`cannot read rule ${JSON.stringify(text)} at ${JSON.stringify(text.slice(start))}`);
    }
    if (match[1] !== undefined) tokens.push({ kind: "number", value: Number(match[1]) });
    else if (match[2] !== undefined) tokens.push({ kind: "name", value: match[2] });
    else tokens.push({ kind: "op", value: match[3] });
  }
  return tokens;
}

function pyFloorDiv(a, b) {
  if (b === 0) throw new Error("division by zero in a size rule");
  return Math.floor(a / b);
}

function pyMod(a, b) {
  if (b === 0) throw new Error("modulo by zero in a size rule");
  return ((a % b) + b) % b; // Python's sign convention
}

const BINARY = {
  "+": (a, b) => a + b,
  "-": (a, b) => a - b,
  "*": (a, b) => a * b,
  "/": (a, b) => a / b,
  "//": pyFloorDiv,
  "%": pyMod,
  "==": (a, b) => a === b,
  "!=": (a, b) => a !== b,
  "<": (a, b) => a < b,
  "<=": (a, b) => a <= b,
  ">": (a, b) => a > b,
  ">=": (a, b) => a >= b,
};

class Parser {
  constructor(text) {
    this.text = text;
    this.tokens = tokenize(text);
    this.position = 0;
  }
  peek() {
    return this.tokens[this.position];
  }
  isOp(value) {
    const token = this.peek();
    return token && token.kind === "op" && token.value === value;
  }
  isWord(value) {
    const token = this.peek();
    return token && token.kind === "name" && token.value === value;
  }
  expect(value) {
    if (!this.isOp(value)) throw new Error(`expected ${JSON.stringify(value)} in rule ${JSON.stringify(this.text)}`);
    this.position++;
  }
  // tuple := ternary ("," ternary)*
  parseTuple() {
    const items = [this.parseTernary()];
    while (this.isOp(",")) {
      this.position++;
      items.push(this.parseTernary());
    }
    if (this.position !== this.tokens.length) {
      throw new Error(`unexpected ${JSON.stringify(this.peek().value)} in rule ${JSON.stringify(this.text)}`);
    }
    return items.length === 1 ? items[0] : (scope) => items.map((item) => item(scope));
  }
  parseTernary() {
    const body = this.parseOr();
    if (!this.isWord("if")) return body;
    this.position++;
    const condition = this.parseOr();
    if (!this.isWord("else")) throw new Error(`"if" without "else" in rule ${JSON.stringify(this.text)}`);
    this.position++;
    const otherwise = this.parseTernary();
    return (scope) => (condition(scope) ? body(scope) : otherwise(scope));
  }
  parseOr() {
    let left = this.parseAnd();
    while (this.isWord("or")) {
      this.position++;
      const a = left, b = this.parseAnd();
      left = (scope) => a(scope) || b(scope);
    }
    return left;
  }
  parseAnd() {
    let left = this.parseNot();
    while (this.isWord("and")) {
      this.position++;
      const a = left, b = this.parseNot();
      left = (scope) => a(scope) && b(scope);
    }
    return left;
  }
  parseNot() {
    if (!this.isWord("not")) return this.parseComparison();
    this.position++;
    const operand = this.parseNot();
    return (scope) => !operand(scope);
  }
  parseComparison() {
    const left = this.parseSum();
    const token = this.peek();
    if (token && token.kind === "op" && ["==", "!=", "<", "<=", ">", ">="].includes(token.value)) {
      this.position++;
      const operation = BINARY[token.value], right = this.parseSum();
      return (scope) => operation(left(scope), right(scope));
    }
    return left;
  }
  parseBinary(operators, next) {
    let left = next();
    for (;;) {
      const token = this.peek();
      if (!token || token.kind !== "op" || !operators.includes(token.value)) return left;
      this.position++;
      const a = left, operation = BINARY[token.value], b = next();
      left = (scope) => operation(a(scope), b(scope));
    }
  }
  parseSum() {
    return this.parseBinary(["+", "-"], () => this.parseProduct());
  }
  parseProduct() {
    return this.parseBinary(["*", "/", "//", "%"], () => this.parseUnary());
  }
  parseUnary() {
    if (this.isOp("-")) {
      this.position++;
      const operand = this.parseUnary();
      return (scope) => -operand(scope);
    }
    if (this.isOp("+")) {
      this.position++;
      return this.parseUnary();
    }
    return this.parseAtom();
  }
  parseAtom() {
    const token = this.peek();
    if (!token) throw new Error(`rule ${JSON.stringify(this.text)} ends too early`);
    this.position++;
    if (token.kind === "number") return () => token.value;
    if (token.kind === "op" && token.value === "(") {
      const inner = this.parseTernary();
      this.expect(")");
      return inner;
    }
    if (token.kind === "name") {
      const name = token.value;
      if (this.isOp("(")) {
        this.position++;
        const args = [];
        if (!this.isOp(")")) {
          args.push(this.parseTernary());
          while (this.isOp(",")) {
            this.position++;
            args.push(this.parseTernary());
          }
        }
        this.expect(")");
        const fn = FUNCTIONS[name];
        if (!fn) throw new Error(`unknown function ${name}() in rule ${JSON.stringify(this.text)}`);
        return (scope) => fn(...args.map((arg) => arg(scope)));
      }
      return (scope) => {
        if (!(name in scope)) throw new Error(`rule ${JSON.stringify(this.text)} needs ${name}`);
        return scope[name];
      };
    }
    throw new Error(`unexpected ${JSON.stringify(token.value)} in rule ${JSON.stringify(this.text)}`);
  }
}

const compiled = new Map();

/** Compile a rule expression once; the result maps a scope {n, H, W, ...} to a number (or a list for "a, b"). */
export function compileRule(text) {
  if (typeof text !== "string") throw new Error(`a size rule should be an expression string, got ${JSON.stringify(text)}`);
  if (!compiled.has(text)) compiled.set(text, new Parser(text).parseTuple());
  return compiled.get(text);
}

// ---------------------------------------------------------------------------------------------
// Evaluating the rules for one set of widget values
// ---------------------------------------------------------------------------------------------

function frameProblems(version, frames, n) {
  const { image, step, min, max, trained_max: trainedMax, rule } = frames;
  if (!Number.isInteger(n)) return { error: `num_frames must be a whole number, got ${n}` };
  const valid = (n === 1 && image) || (n >= min && n <= max && (n - min) % step === 0);
  if (!valid) {
    const nearby = [];
    if (n < min) {
      if (image) nearby.push(1);
      nearby.push(min);
    } else {
      const below = Math.min(max, min + Math.floor((n - min) / step) * step);
      nearby.push(below);
      if (below < n && below + step <= max) nearby.push(below + step);
    }
    const range = step > 1 ? ` (${min}, ${min + step}, ... ${max})` : "";
    return { error: `${n} frames: Open-Sora ${version} takes ${rule} frames${range}; try ${nearby.join(" or ")}` };
  }
  if (trainedMax != null && n > trainedMax) {
    return { note: `Open-Sora ${version} was trained on at most ${trainedMax} frames; ${n} may lose quality` };
  }
  return {};
}

function pixelSize(version, rules, values) {
  const { resolution, aspect_ratio: aspect } = values;
  const width = Number(values.width) || 0;
  const height = Number(values.height) || 0;
  if (width || height) {
    if (!width || !height) return { error: "set both width and height for an exact size, or leave both at 0" };
    const { min, max, multiple_of: multiple } = rules.size_limits ?? {};
    for (const [name, value] of [["width", width], ["height", height]]) {
      if ((min != null && value < min) || (max != null && value > max)) {
        return { error: `${name} ${value}: Open-Sora ${version} takes ${min} to ${max} pixels` };
      }
      if (multiple > 1 && value % multiple) {
        const up = Math.ceil(value / multiple) * multiple;
        return { error: `${name} ${value}: Open-Sora ${version} needs multiples of ${multiple} (e.g. ${up})` };
      }
    }
    return { H: height, W: width, source: "exact size" };
  }
  const table = rules.sizes?.[resolution];
  if (!table) {
    return { error: `resolution ${resolution} is not an Open-Sora ${version} preset; use ${(rules.resolutions ?? []).join(", ")}` };
  }
  let size = table[aspect];
  if (!size && rules.raw_ratio_keys_allowed) size = rules.raw_sizes?.[resolution]?.[aspect];
  if (!size) {
    const order = rules.aspect_ratio_order ? ` (${rules.aspect_ratio_order})` : "";
    return { error: `aspect ratio ${aspect} is not available for Open-Sora ${version} ${resolution}${order}; use ${Object.keys(table).join(", ")}` };
  }
  const result = { H: size[0], W: size[1], source: `${resolution} ${aspect}` };
  const trained = rules.trained_resolutions;
  if (Array.isArray(trained) && !trained.includes(resolution)) {
    result.note = `Open-Sora ${version} was trained at ${trained.join(", ")}; ${resolution} is untested`;
  }
  return result;
}

/**
 * Everything the node shows, from the server's rules and the widget values
 * ({version, resolution, aspect_ratio, num_frames, batch_size, width, height, fps}).
 * Returns {pixels: [W, H], latent: [T, h, w], channels, tokensPerFrame, tokens, seconds, errors, notes};
 * values that cannot be derived are null and `errors` says why.
 */
export function derive(allRules, values) {
  const out = { pixels: null, latent: null, channels: null, tokensPerFrame: null, tokens: null, seconds: null, errors: [], notes: [] };
  const version = String(values.version);
  const rules = allRules?.[version];
  if (!rules) {
    out.errors.push(`unknown Open-Sora version ${version}; the server knows ${Object.keys(allRules ?? {}).join(", ")}`);
    return out;
  }
  const n = Number(values.num_frames);
  const frames = frameProblems(version, rules.frames, n);
  if (frames.error) out.errors.push(frames.error);
  if (frames.note) out.notes.push(frames.note);
  const size = pixelSize(version, rules, values);
  if (size.error) out.errors.push(size.error);
  if (size.note) out.notes.push(size.note);
  const fps = Number(values.fps);
  if (fps > 0 && Number.isFinite(n)) out.seconds = n / fps;
  if (size.error) return out;
  out.pixels = [size.W, size.H];
  out.sizeSource = size.source;
  const latent = rules.latent; // every version choice carries its own formulas
  if (!latent) {
    out.errors.push(`the server's rules for ${version} have no latent formulas`);
    return out;
  }
  out.channels = latent.channels ?? null;
  try {
    const [h, w] = compileRule(latent.latent_hw)({ H: size.H, W: size.W });
    const scope = { n, H: size.H, W: size.W, latent_h: h, latent_w: w };
    out.tokensPerFrame = compileRule(latent.tokens_per_frame)(scope);
    if (!frames.error) {
      const t = compileRule(latent.latent_frames)(scope);
      out.latent = [t, h, w];
      out.tokens = t * out.tokensPerFrame;
    } else {
      out.latent = [null, h, w];
    }
  } catch (error) {
    out.errors.push(`cannot evaluate the ${version} latent rules: ${error.message}`);
  }
  return out;
}
