// Front end of widgets.AttributionExplorer (an anywidget ES module). No dependencies, no network.
//
// Python sends the picture (PNG), the heat map of the current selection (one byte per pixel), the colormap
// lookup tables and the x̂0 frames. The browser composites the overlay and the mask itself, so opacity,
// colormap, threshold, mask and the trajectory scrubber redraw without waiting for the kernel; a new word,
// step range, layer group or head asks Python for one new heat map (computed from captured data).
//
// The root element records how long the last redraw took (data-redraw-ms, data-redraw-kind,
// data-redraw-count): from the control's input event to the canvas holding the new pixels. The browser
// test reads them, and the status line shows them.

function h(tag, props = {}, ...children) {
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

function bytesOf(value) {
  // Bytes traits arrive as DataView (or ArrayBuffer); view them as bytes without copying.
  if (!value) return new Uint8Array(0);
  if (value instanceof DataView) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  return new Uint8Array(value.buffer ?? value);
}

function slider(min, max, step, value) {
  return h("input", { type: "range", min: String(min), max: String(max), step: String(step), value: String(value) });
}

function labelled(text, control, readout) {
  return h("label", { class: "sx-row" }, h("span", { class: "sx-row-name" }, text), control, readout ?? null);
}

function render({ model, el }) {
  const cleanups = [];
  const listen = (name, callback) => {
    model.on(name, callback);
    cleanups.push(() => model.off(name, callback));
  };

  // ---------------------------------------------------------------------------------------- layout
  const overlayCanvas = h("canvas", { class: "sx-overlay", title: "the generated image with the heat map" });
  const maskCanvas = h("canvas", { class: "sx-mask", title: "where the normalised heat map ≥ threshold" });
  const x0Image = h("img", { class: "sx-x0", alt: "predicted clean image at this step" });
  const heatLabel = h("figcaption", { class: "sx-heat-label" });
  const maskLabel = h("figcaption");
  const x0Label = h("figcaption");
  const promptLabel = h("span", { class: "sx-prompt" });

  const wordChips = h("div", { class: "sx-chips", role: "listbox", "aria-label": "prompt words" });
  const typedWord = h("input", { type: "text", class: "sx-typed-word", placeholder: "any word…",
    title: "a word that is not in the prompt gives an open-vocabulary map" });
  const typedButton = h("button", { class: "sx-typed-go", type: "button" }, "map");

  const stepFrom = slider(0, 0, 1, 0);
  stepFrom.classList.add("sx-step-from");
  const stepTo = slider(0, 0, 1, 0);
  stepTo.classList.add("sx-step-to");
  const stepRange = h("div", { class: "sx-dual" }, h("div", { class: "sx-dual-track" }), stepFrom, stepTo);
  const stepReadout = h("span", { class: "sx-readout" });
  const groupSlider = slider(0, 0, 1, 0);
  groupSlider.classList.add("sx-group");
  const groupReadout = h("span", { class: "sx-readout" });
  const headSlider = slider(-1, 0, 1, -1);
  headSlider.classList.add("sx-head");
  const headReadout = h("span", { class: "sx-readout" });
  const imageSelect = h("select", { class: "sx-image" });
  const imageRow = labelled("Image", imageSelect);

  const opacitySlider = slider(0, 1, 0.05, 0.5);
  opacitySlider.classList.add("sx-opacity");
  const opacityReadout = h("span", { class: "sx-readout" });
  const colormapSelect = h("select", { class: "sx-colormap" });

  const thresholdSlider = slider(0, 1, 0.01, 0.4);
  thresholdSlider.classList.add("sx-threshold");
  const thresholdReadout = h("span", { class: "sx-readout" });
  const maskToggle = h("input", { type: "checkbox", class: "sx-show-mask" });

  const strip = h("div", { class: "sx-strip" });
  const trajectorySlider = slider(0, 0, 1, 0);
  trajectorySlider.classList.add("sx-trajectory-step");
  const trajectoryReadout = h("span", { class: "sx-readout" });

  const promptInput = h("input", { type: "text", class: "sx-gen-prompt", "aria-label": "prompt" });
  const seedInput = h("input", { type: "number", class: "sx-gen-seed", min: "0", step: "1", "aria-label": "seed" });
  const stepsInput = h("input", { type: "number", class: "sx-gen-steps", min: "1", max: "200", step: "1", "aria-label": "steps" });
  const guidanceInput = h("input", { type: "number", class: "sx-gen-guidance", min: "0", max: "30", step: "0.5", "aria-label": "guidance" });
  const generateButton = h("button", { type: "button", class: "sx-generate-button" }, "Generate");
  const progressBar = h("progress", { class: "sx-progress", max: "1", value: "0" });
  const progressText = h("span", { class: "sx-progress-text" });
  const generateHint = h("span", { class: "sx-hint" });
  const message = h("div", { class: "sx-message", role: "alert" });
  const timing = h("span", { class: "sx-timing" });

  const controls = h("fieldset", { class: "sx-controls" },
    h("div", { class: "sx-section" },
      h("div", { class: "sx-section-title" }, "Word"),
      wordChips,
      h("div", { class: "sx-typed" }, typedWord, typedButton)),
    h("div", { class: "sx-section" },
      h("div", { class: "sx-section-title" }, "Which attention"),
      labelled("Steps", stepRange, stepReadout),
      labelled("Layers", groupSlider, groupReadout),
      labelled("Head", headSlider, headReadout),
      imageRow),
    h("div", { class: "sx-section" },
      h("div", { class: "sx-section-title" }, "Display"),
      labelled("Opacity", opacitySlider, opacityReadout),
      labelled("Colormap", colormapSelect),
      labelled("Threshold", thresholdSlider, thresholdReadout),
      h("label", { class: "sx-row sx-check" }, maskToggle, h("span", {}, "show the mask on the image"))));

  const root = h("div", { class: "sdlab-explorer" },
    h("div", { class: "sx-header" }, h("span", { class: "sx-title" }, "Attribution explorer"), promptLabel),
    h("div", { class: "sx-body" },
      h("figure", { class: "sx-main" }, overlayCanvas, heatLabel),
      h("div", { class: "sx-side" },
        h("figure", {}, maskCanvas, maskLabel),
        h("figure", {}, x0Image, x0Label)),
      controls),
    h("fieldset", { class: "sx-trajectory" },
      h("div", { class: "sx-section-title" }, "x̂₀ trajectory: the model's guess of the final image at each step"),
      strip,
      labelled("Step", trajectorySlider, trajectoryReadout)),
    h("fieldset", { class: "sx-generate" },
      promptInput,
      h("label", { class: "sx-field" }, "seed", seedInput),
      h("label", { class: "sx-field" }, "steps", stepsInput),
      h("label", { class: "sx-field" }, "guidance", guidanceInput),
      generateButton,
      h("span", { class: "sx-progress-box" }, progressBar, progressText),
      generateHint),
    h("div", { class: "sx-status" }, message, timing));
  // Keys pressed in the explorer belong to its controls. JupyterLab sees them twice otherwise: its shortcuts
  // (command mode: "a" inserts a cell; the attribute opts out) and the notebook's own handler, which takes
  // the arrow keys for moving between cells and pulls the focus off a slider (stopping the bubbling).
  root.setAttribute("data-lm-suppress-shortcuts", "true");
  for (const type of ["keydown", "keypress", "keyup"]) root.addEventListener(type, (event) => event.stopPropagation());
  el.append(root);

  // ---------------------------------------------------------------------------------------- drawing
  let width = 0;
  let height = 0;
  let basePixels = null; // RGBA of the generated image, native size
  let imageVersion = 0; // decoding is asynchronous: only the latest picture may land
  let redrawCount = 0;

  function recordRedraw(started, kind) {
    const milliseconds = performance.now() - started;
    redrawCount += 1;
    root.dataset.redrawMs = milliseconds.toFixed(1);
    root.dataset.redrawKind = kind;
    root.dataset.redrawCount = String(redrawCount);
    timing.textContent = `redrawn in ${milliseconds.toFixed(0)} ms${kind === "kernel" ? " (new heat map from the kernel)" : ""}`;
  }

  function colormapTable() {
    const tables = model.get("colormap_tables") || {};
    return bytesOf(tables[model.get("colormap")] ?? Object.values(tables)[0]);
  }

  function paint() {
    const heat = bytesOf(model.get("heat"));
    if (!basePixels || heat.length !== width * height) return false;
    const table = colormapTable();
    const opacity = Number(model.get("opacity"));
    const threshold = Number(model.get("threshold"));
    const showMask = model.get("show_mask");
    const overlay = new ImageData(width, height);
    const mask = new ImageData(width, height);
    const out = overlay.data;
    const maskOut = mask.data;
    for (let i = 0, p = 0; i < heat.length; i += 1, p += 4) {
      const value = heat[i];
      const inside = value / 255 > threshold; // HeatMap.mask's comparison, on the normalised map
      if (showMask) {
        const keep = inside ? 1 : 0.25; // the same dimming as AttributionExplorer.snapshot()
        out[p] = basePixels[p] * keep;
        out[p + 1] = basePixels[p + 1] * keep;
        out[p + 2] = basePixels[p + 2] * keep;
      } else {
        const c = value * 3;
        out[p] = (1 - opacity) * basePixels[p] + opacity * table[c];
        out[p + 1] = (1 - opacity) * basePixels[p + 1] + opacity * table[c + 1];
        out[p + 2] = (1 - opacity) * basePixels[p + 2] + opacity * table[c + 2];
      }
      out[p + 3] = 255;
      const shade = inside ? 255 : 0;
      maskOut[p] = shade;
      maskOut[p + 1] = shade;
      maskOut[p + 2] = shade;
      maskOut[p + 3] = 255;
    }
    overlayCanvas.getContext("2d").putImageData(overlay, 0, 0);
    maskCanvas.getContext("2d").putImageData(mask, 0, 0);
    maskLabel.textContent = `mask: normalised heat > ${threshold.toFixed(2)}`;
    root.dataset.heatVersion = String((Number(root.dataset.heatVersion) || 0) + 1);
    return true;
  }

  function paintLocally() {
    // A display control changed: no kernel involved.
    const started = performance.now();
    if (paint()) recordRedraw(started, "local");
  }

  async function loadImage() {
    const version = ++imageVersion;
    const png = bytesOf(model.get("image_png"));
    if (png.length === 0) return;
    const bitmap = await createImageBitmap(new Blob([png], { type: "image/png" }));
    if (version !== imageVersion) return;
    width = bitmap.width;
    height = bitmap.height;
    for (const canvas of [overlayCanvas, maskCanvas]) {
      canvas.width = width;
      canvas.height = height;
    }
    const scratch = document.createElement("canvas");
    scratch.width = width;
    scratch.height = height;
    const context = scratch.getContext("2d");
    context.drawImage(bitmap, 0, 0);
    basePixels = context.getImageData(0, 0, width, height).data;
    resize();
    paint();
  }

  function resize() {
    const size = model.get("display_size");
    overlayCanvas.style.width = `${size}px`;
    const side = Math.round(size / 2);
    maskCanvas.style.width = `${side}px`;
    x0Image.style.width = `${side}px`;
    // Square pixels when enlarging (TinyWorld's 64x64); smooth resampling when shrinking (a 512 px image).
    const rendering = width && width >= size ? "auto" : "pixelated";
    for (const picture of [overlayCanvas, maskCanvas, x0Image]) picture.style.imageRendering = rendering;
  }

  // ------------------------------------------------------------------- asking the kernel for heat maps
  // One request in flight: while a slider is dragged, later positions wait and only the latest is sent.
  let inFlight = false;
  let inFlightTimer = null;
  let inFlightSince = null; // performance.now() of the first input the request in flight answers
  let queued = {};
  let queuedSince = null;

  function requestHeatMap(changes) {
    if (queuedSince === null) queuedSince = performance.now();
    Object.assign(queued, changes);
    if (!inFlight) flush();
  }

  function flush() {
    if (Object.keys(queued).length === 0) return;
    for (const [key, value] of Object.entries(queued)) model.set(key, value);
    model.set("request", model.get("request") + 1);
    model.save_changes();
    queued = {};
    inFlight = true;
    inFlightSince = queuedSince;
    queuedSince = null;
    clearTimeout(inFlightTimer);
    // A request can go unanswered (the kernel restarted): do not keep the controls waiting for it forever.
    inFlightTimer = setTimeout(() => { inFlight = false; flush(); }, 3000);
  }

  listen("change:answered_request", () => {
    if (model.get("answered_request") >= model.get("request")) {
      inFlight = false;
      inFlightSince = null; // answered without a new map (it was the one on display)
      clearTimeout(inFlightTimer);
      flush();
    }
  });

  function setLocal(key, value) {
    model.set(key, value);
    model.save_changes();
  }

  // ------------------------------------------------------------------------------- keeping in step
  function showWords() {
    const words = model.get("words");
    const word = model.get("word");
    const occurrence = model.get("occurrence");
    const seen = {};
    wordChips.replaceChildren(...words.map((text, index) => {
      const nth = seen[text] = (seen[text] ?? -1) + 1;
      const repeated = words.filter((other) => other === text).length > 1;
      const chipOccurrence = repeated ? nth : -1;
      const selected = text === word && (occurrence === chipOccurrence || (!repeated && occurrence < 0));
      return h("button", {
        type: "button", class: `sx-chip${selected ? " sx-selected" : ""}`, role: "option",
        "aria-selected": String(selected), "data-index": String(index),
        onclick: () => requestHeatMap({ word: text, occurrence: chipOccurrence }),
      }, text);
    }));
    const typed = word && !words.includes(word);
    typedWord.classList.toggle("sx-selected", Boolean(typed));
    if (typed && document.activeElement !== typedWord) typedWord.value = word;
  }

  function mapTypedWord() {
    const text = typedWord.value.trim();
    if (text) requestHeatMap({ word: text, occurrence: -1 });
  }

  function stepsText(first, last) {
    return first === 0 && last === model.get("num_steps") - 1 ? `all ${model.get("num_steps")}` : `${first}–${last}`;
  }

  function showSteps() {
    const n = model.get("num_steps");
    // A run traced with running means only (per_step=False) has one map per layer: nothing to slice.
    stepFrom.disabled = stepTo.disabled = !model.get("can_slice");
    for (const input of [stepFrom, stepTo]) input.max = String(Math.max(n - 1, 0));
    stepFrom.value = String(model.get("step_start"));
    stepTo.value = String(model.get("step_stop") - 1);
    const first = model.get("step_start");
    const last = model.get("step_stop") - 1;
    stepReadout.textContent = stepsText(first, last);
    const track = stepRange.firstChild;
    const span = Math.max(n - 1, 1);
    track.style.setProperty("--from", `${(100 * first) / span}%`);
    track.style.setProperty("--to", `${(100 * last) / span}%`);
  }

  function onStepInput(event) {
    let first = Number(stepFrom.value);
    let last = Number(stepTo.value);
    if (first > last) {
      // The dragged handle pushes the other one along.
      if (event.target === stepFrom) last = first; else first = last;
      stepFrom.value = String(first);
      stepTo.value = String(last);
    }
    requestHeatMap({ step_start: first, step_stop: last + 1 });
    stepReadout.textContent = stepsText(first, last);
  }

  function showGroups() {
    const names = model.get("site_group_names");
    groupSlider.max = String(Math.max(names.length - 1, 0));
    groupSlider.dataset.groups = names.join(" ");
    const index = Math.max(names.indexOf(model.get("site_group")), 0);
    groupSlider.value = String(index);
    groupReadout.textContent = names[index] ?? "";
  }

  function showHead() {
    headSlider.disabled = !model.get("can_slice");
    headSlider.max = String(model.get("num_heads") - 1);
    headSlider.value = String(model.get("head"));
    const head = model.get("head");
    headReadout.textContent = head < 0 ? "all" : `${head} of ${model.get("num_heads")}`;
  }

  function showImages() {
    const n = model.get("num_images");
    imageRow.style.display = n > 1 ? "" : "none";
    imageSelect.replaceChildren(...Array.from({ length: n }, (_, i) => h("option", { value: String(i) }, `image ${i + 1} of ${n}`)));
    imageSelect.value = String(model.get("image_index"));
  }

  function showDisplayControls() {
    opacitySlider.value = String(model.get("opacity"));
    opacityReadout.textContent = Number(model.get("opacity")).toFixed(2);
    thresholdSlider.value = String(model.get("threshold"));
    thresholdReadout.textContent = Number(model.get("threshold")).toFixed(2);
    maskToggle.checked = model.get("show_mask");
    const names = Object.keys(model.get("colormap_tables") || {});
    if (colormapSelect.options.length !== names.length) {
      colormapSelect.replaceChildren(...names.map((name) => h("option", { value: name }, name)));
    }
    colormapSelect.value = model.get("colormap");
  }

  let frameUrls = [];
  function showTrajectory() {
    for (const url of frameUrls) URL.revokeObjectURL(url);
    frameUrls = model.get("trajectory_pngs").map((png) => URL.createObjectURL(new Blob([bytesOf(png)], { type: "image/png" })));
    strip.replaceChildren(...frameUrls.map((url, step) => h("img", {
      src: url, class: "sx-frame", title: `step ${step}`, "data-step": String(step),
      onclick: () => { setLocal("trajectory_step", step); showTrajectoryStep(); },
    })));
    trajectorySlider.max = String(Math.max(frameUrls.length - 1, 0));
    root.querySelector(".sx-trajectory").style.display = frameUrls.length ? "" : "none";
    x0Image.parentElement.style.display = frameUrls.length ? "" : "none";
    showTrajectoryStep();
  }

  function showTrajectoryStep() {
    const step = Math.min(model.get("trajectory_step"), frameUrls.length - 1);
    if (step < 0) return;
    trajectorySlider.value = String(step);
    trajectoryReadout.textContent = `${step} of ${frameUrls.length - 1}`;
    x0Image.src = frameUrls[step];
    x0Label.textContent = `x̂₀ at step ${step}`;
    for (const frame of strip.children) frame.classList.toggle("sx-selected", Number(frame.dataset.step) === step);
  }

  function showGenerate() {
    promptInput.value = model.get("prompt");
    seedInput.value = String(model.get("seed"));
    stepsInput.value = String(model.get("num_inference_steps"));
    guidanceInput.value = String(model.get("guidance_scale"));
    const canGenerate = model.get("can_generate");
    generateButton.disabled = !canGenerate;
    generateHint.textContent = canGenerate ? "" : "built from a run: pass pipe= to generate";
  }

  function showBusy() {
    const busy = model.get("busy");
    // A disabled fieldset disables every control inside it: nothing moves while the model runs.
    for (const fieldset of root.querySelectorAll("fieldset")) fieldset.disabled = busy;
    root.classList.toggle("sx-busy", busy);
    progressBar.value = model.get("progress");
    progressText.textContent = model.get("progress_text");
  }

  function generate() {
    // Read every field before setting any: each model.set fires a change that refills the fields from the model.
    const settings = {
      prompt: promptInput.value,
      seed: Math.max(0, Math.round(Number(seedInput.value) || 0)),
      num_inference_steps: Math.max(1, Math.round(Number(stepsInput.value) || 1)),
      guidance_scale: Number(guidanceInput.value) || 0,
    };
    for (const [key, value] of Object.entries(settings)) model.set(key, value);
    model.save_changes();
    model.send({ event: "generate" });
  }

  // ---------------------------------------------------------------------------------- control events
  typedWord.addEventListener("keydown", (event) => { if (event.key === "Enter") mapTypedWord(); });
  typedButton.addEventListener("click", mapTypedWord);
  stepFrom.addEventListener("input", onStepInput);
  stepTo.addEventListener("input", onStepInput);
  groupSlider.addEventListener("input", () => {
    const name = model.get("site_group_names")[Number(groupSlider.value)];
    groupReadout.textContent = name;
    requestHeatMap({ site_group: name });
  });
  headSlider.addEventListener("input", () => {
    const head = Number(headSlider.value);
    headReadout.textContent = head < 0 ? "all" : `${head} of ${model.get("num_heads")}`;
    requestHeatMap({ head });
  });
  imageSelect.addEventListener("change", () => setLocal("image_index", Number(imageSelect.value)));
  opacitySlider.addEventListener("input", () => {
    setLocal("opacity", Number(opacitySlider.value));
    opacityReadout.textContent = Number(opacitySlider.value).toFixed(2);
    paintLocally();
  });
  colormapSelect.addEventListener("change", () => { setLocal("colormap", colormapSelect.value); paintLocally(); });
  thresholdSlider.addEventListener("input", () => {
    setLocal("threshold", Number(thresholdSlider.value));
    thresholdReadout.textContent = Number(thresholdSlider.value).toFixed(2);
    paintLocally();
  });
  maskToggle.addEventListener("change", () => { setLocal("show_mask", maskToggle.checked); paintLocally(); });
  trajectorySlider.addEventListener("input", () => {
    const started = performance.now();
    setLocal("trajectory_step", Number(trajectorySlider.value));
    showTrajectoryStep();
    recordRedraw(started, "local");
  });
  generateButton.addEventListener("click", generate);
  promptInput.addEventListener("keydown", (event) => { if (event.key === "Enter" && !generateButton.disabled) generate(); });

  // ----------------------------------------------------------------------------- changes from Python
  listen("change:image_png", loadImage);
  listen("change:heat", () => {
    // Only one request is in flight, so a new heat map while one is pending is its answer.
    if (paint() && inFlightSince !== null) {
      recordRedraw(inFlightSince, "kernel");
      inFlightSince = null;
    }
  });
  listen("change:heat_label", () => { heatLabel.textContent = model.get("heat_label"); });
  listen("change:image_prompt", () => { promptLabel.textContent = `“${model.get("image_prompt")}”`; });
  listen("change:words change:word change:occurrence", showWords);
  listen("change:num_steps change:step_start change:step_stop change:can_slice", showSteps);
  listen("change:site_group_names change:site_group", showGroups);
  listen("change:num_heads change:head change:can_slice", showHead);
  listen("change:num_images change:image_index", showImages);
  listen("change:opacity change:threshold change:show_mask change:colormap change:colormap_tables", () => {
    showDisplayControls();
    paint();
  });
  listen("change:trajectory_pngs", showTrajectory);
  listen("change:trajectory_step", showTrajectoryStep);
  listen("change:prompt change:seed change:num_inference_steps change:guidance_scale change:can_generate", showGenerate);
  listen("change:busy change:progress change:progress_text", showBusy);
  listen("change:message", () => { message.textContent = model.get("message"); });
  listen("change:display_size", resize);

  // First draw from the state the model already holds.
  resize();
  heatLabel.textContent = model.get("heat_label");
  promptLabel.textContent = `“${model.get("image_prompt")}”`;
  message.textContent = model.get("message");
  showWords();
  showSteps();
  showGroups();
  showHead();
  showImages();
  showDisplayControls();
  showTrajectory();
  showGenerate();
  showBusy();
  loadImage();

  return () => {
    for (const cleanup of cleanups) cleanup();
    for (const url of frameUrls) URL.revokeObjectURL(url);
    clearTimeout(inFlightTimer);
  };
}

export default { render };
