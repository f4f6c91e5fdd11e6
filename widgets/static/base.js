// Helpers every sdlab widget's front end shares. No dependencies, no network.
//
// widgets/base.py sends this file and the widget's own file as ONE ES module (base.esm("editor.js")):
// anywidget loads a single module, and a module could import a sibling file only by URL (a bundler, or a
// route the kernel does not serve). So these are plain top-level functions, in scope for the widget code
// that follows, which then ends with `export default { render }`. Class names start with "sx-" (sdlab);
// base.css styles them.

// ---------------------------------------------------------------------------------------------- DOM
function h(tag, props = {}, ...children) {
  // h("button", { class: "sx-go", onclick: go }, "Go"): an element with attributes, listeners, children.
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") element.className = value;
    else if (key === "style") element.style.cssText = value;
    else if (key.startsWith("on")) element.addEventListener(key.slice(2), value);
    else element.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) element.append(child);
  }
  return element;
}

function slider(min, max, step, value, className = "") {
  return h("input", { type: "range", class: className, min: String(min), max: String(max), step: String(step), value: String(value) });
}

function select(options, className = "") {
  // options: [value, label] pairs or plain strings; setOptions() refills it later.
  return setOptions(h("select", { class: className }), options);
}

function setOptions(element, options) {
  element.replaceChildren(...options.map((option) => {
    const [value, label] = Array.isArray(option) ? option : [option, option];
    return h("option", { value: String(value) }, label);
  }));
  return element;
}

function readout() {
  return h("span", { class: "sx-readout" });
}

function labelled(text, control, readoutElement) {
  // A control row: name, control, optional readout (a three-column grid in base.css).
  return h("label", { class: "sx-row" }, h("span", { class: "sx-row-name" }, text), control, readoutElement ?? null);
}

function widgetRoot(className, ...children) {
  // The widget's outer element. Keys pressed in it belong to its controls: JupyterLab would see them
  // twice otherwise, through its shortcuts (command mode: "a" inserts a cell; the attribute opts out) and
  // the notebook's own handler, which takes the arrow keys and pulls the focus off a slider.
  const root = h("div", { class: `sdlab-widget ${className}`, "data-lm-suppress-shortcuts": "true" }, ...children);
  for (const type of ["keydown", "keypress", "keyup"]) root.addEventListener(type, (event) => event.stopPropagation());
  return root;
}

// ---------------------------------------------------------------------------------------- the model
function connect(model) {
  // view.listen("a b", fn): fn on change:a or change:b; view.save({a: 1, b: 2}): one message to the
  // kernel; view.event("generate"): a browser event (LabWidget.on_event); view.dispose() undoes it all.
  const cleanups = [];
  return {
    model,
    listen(names, callback) {
      const events = names.trim().split(/\s+/).map((name) => `change:${name}`).join(" ");
      model.on(events, callback);
      cleanups.push(() => model.off(events, callback));
    },
    save(changes) {
      for (const [key, value] of Object.entries(changes)) model.set(key, value);
      model.save_changes();
    },
    event(name, content = {}) {
      model.send({ ...content, event: name });
    },
    onCleanup(callback) {
      cleanups.push(callback);
    },
    dispose() {
      for (const cleanup of cleanups.splice(0)) cleanup();
    },
  };
}

function bytesOf(value) {
  // Bytes traits arrive as DataView (or ArrayBuffer); view them, or any typed array, as bytes without copying.
  if (!value) return new Uint8Array(0);
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  return new Uint8Array(value);
}

// ------------------------------------------------------------------- asking the kernel (the throttle)
function requester(view, { timeoutMs = 3000 } = {}) {
  // ask({word: "cat"}) sets those traits and the next request number. One request is in flight at a time:
  // what is asked meanwhile is merged and sent when the kernel echoes answered_request (latest wins), so a
  // dragged slider never builds a queue. takeStart() gives performance.now() of the first input that the
  // request in flight answers (null if none), once, to time the redraw its answer brings.
  const { model } = view;
  let inFlight = false;
  let timer = null;
  let queued = {};
  let queuedSince = null;
  let inFlightSince = null;

  function flush() {
    if (Object.keys(queued).length === 0) return;
    view.save({ ...queued, request: model.get("request") + 1 });
    queued = {};
    inFlight = true;
    inFlightSince = queuedSince;
    queuedSince = null;
    clearTimeout(timer);
    // A request can go unanswered (the kernel restarted): do not keep the controls waiting for it forever.
    timer = setTimeout(() => { inFlight = false; flush(); }, timeoutMs);
  }

  view.listen("answered_request", () => {
    if (model.get("answered_request") >= model.get("request")) {
      inFlight = false;
      inFlightSince = null; // answered without new output (what was asked is on display)
      clearTimeout(timer);
      flush();
    }
  });
  view.onCleanup(() => clearTimeout(timer));

  return {
    ask(changes) {
      if (queuedSince === null) queuedSince = performance.now();
      Object.assign(queued, changes);
      if (!inFlight) flush();
    },
    takeStart() {
      const started = inFlightSince;
      inFlightSince = null;
      return started;
    },
  };
}

// ---------------------------------------------------------------------------------------- pixels
async function decodePng(bytes) {
  // PNG bytes -> ImageData (.width, .height, .data: RGBA, row-major), ready for putPixels.
  const bitmap = await createImageBitmap(new Blob([bytesOf(bytes)], { type: "image/png" }));
  const scratch = document.createElement("canvas");
  scratch.width = bitmap.width;
  scratch.height = bitmap.height;
  const context = scratch.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  return context.getImageData(0, 0, bitmap.width, bitmap.height);
}

function latestOnly(asyncFunction) {
  // Calls may finish out of order; only the latest call's result is delivered, earlier ones give null.
  let latest = 0;
  return async (...args) => {
    const ticket = ++latest;
    const result = await asyncFunction(...args);
    return ticket === latest ? result : null;
  };
}

function pngUrl(bytes) {
  // An object URL for an <img> (revoke it with URL.revokeObjectURL when replaced).
  return URL.createObjectURL(new Blob([bytesOf(bytes)], { type: "image/png" }));
}

function colormapTable(tables, name) {
  // The 768-byte lookup table of a colormap (widgets.base.colormap_tables), the first one if name is unknown.
  tables = tables || {};
  return bytesOf(tables[name] ?? Object.values(tables)[0]);
}

function applyColormap(heat, width, table, { base = null, opacity = 1 } = {}) {
  // One byte per pixel, row-major, `width` wide -> RGBA ImageData: the table's colours, blended over
  // base's RGBA pixels with `opacity` when base is given (HeatMap.overlay's arithmetic). The loops are
  // written out per channel: this runs on every slider move, on up to 512x512 pixels.
  const out = new ImageData(width, heat.length / width);
  const data = out.data;
  const keep = base ? 1 - opacity : 0;
  const mix = base ? opacity : 1;
  const under = base ?? data; // without base: zeros (ImageData starts transparent black) times 0
  for (let i = 0, p = 0; i < heat.length; i += 1, p += 4) {
    const c = heat[i] * 3;
    data[p] = keep * under[p] + mix * table[c];
    data[p + 1] = keep * under[p + 1] + mix * table[c + 1];
    data[p + 2] = keep * under[p + 2] + mix * table[c + 2];
    data[p + 3] = 255;
  }
  return out;
}

function maskImage(heat, width, threshold, { base = null, dim = 0.25 } = {}) {
  // Where the normalised map is > threshold (HeatMap.mask's comparison): white on black, or, given base,
  // base's pixels with those outside the mask dimmed to `dim`.
  const out = new ImageData(width, heat.length / width);
  const data = out.data;
  for (let i = 0, p = 0; i < heat.length; i += 1, p += 4) {
    const inside = heat[i] / 255 > threshold;
    if (base) {
      const keep = inside ? 1 : dim;
      data[p] = base[p] * keep;
      data[p + 1] = base[p + 1] * keep;
      data[p + 2] = base[p + 2] * keep;
    } else {
      const shade = inside ? 255 : 0;
      data[p] = shade;
      data[p + 1] = shade;
      data[p + 2] = shade;
    }
    data[p + 3] = 255;
  }
  return out;
}

function putPixels(canvas, imageData) {
  // Draw RGBA pixels on a canvas, resizing its backing store (not its CSS size) to fit them.
  if (canvas.width !== imageData.width) canvas.width = imageData.width;
  if (canvas.height !== imageData.height) canvas.height = imageData.height;
  canvas.getContext("2d").putImageData(imageData, 0, 0);
}

// ----------------------------------------------------------------------- busy, progress, message
function progressIndicator() {
  // A progress bar with its text; base.css shows it only while the widget is busy.
  return h("span", { class: "sx-progress-box" },
    h("progress", { class: "sx-progress", max: "1", value: "0" }), h("span", { class: "sx-progress-text" }));
}

function messageLine() {
  return h("div", { class: "sx-message", role: "alert" });
}

function showStatus(view, root) {
  // Keep root in step with LabWidget's busy / progress / progress_text / message / message_level: while
  // busy every fieldset in root is disabled (so is every control inside it) and root has class sx-busy.
  const { model } = view;
  function showBusy() {
    const busy = model.get("busy");
    for (const fieldset of root.querySelectorAll("fieldset")) fieldset.disabled = busy;
    root.classList.toggle("sx-busy", busy);
    for (const bar of root.querySelectorAll(".sx-progress")) bar.value = model.get("progress");
    for (const text of root.querySelectorAll(".sx-progress-text")) text.textContent = model.get("progress_text");
  }
  function showMessage() {
    for (const line of root.querySelectorAll(".sx-message")) {
      line.textContent = model.get("message");
      line.dataset.level = model.get("message_level");
    }
  }
  view.listen("busy progress progress_text", showBusy);
  view.listen("message message_level", showMessage);
  showBusy();
  showMessage();
}

// --------------------------------------------------------------------------------------- timing
function redrawTimer(root, timing = null, kernelNote = "new data from the kernel") {
  // record(started, kind): the time since `started` (performance.now()) as root's data-redraw-ms, with
  // data-redraw-kind ("local": the browser alone; "kernel": new data from Python) and data-redraw-count,
  // which the browser test reads; also written in the `timing` element if given.
  let count = 0;
  return function record(started, kind) {
    const milliseconds = performance.now() - started;
    count += 1;
    root.dataset.redrawMs = milliseconds.toFixed(1);
    root.dataset.redrawKind = kind;
    root.dataset.redrawCount = String(count);
    if (timing) timing.textContent = `redrawn in ${milliseconds.toFixed(0)} ms${kind === "kernel" ? ` (${kernelNote})` : ""}`;
  };
}
