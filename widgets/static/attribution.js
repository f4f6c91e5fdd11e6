// Front end of widgets.AttributionExplorer. No dependencies, no network. It follows widgets/static/base.js
// in one ES module (widgets.base.esm): h, slider, labelled, connect, requester, decodePng, applyColormap,
// maskImage, showStatus, redrawTimer... are base.js's helpers.
//
// Python sends the picture (PNG), the heat map of the current selection (one byte per pixel), the colormap
// lookup tables and the x̂0 frames. The browser composites the overlay and the mask itself, so opacity,
// colormap, threshold, mask and the trajectory scrubber redraw without waiting for the kernel; a new word,
// step range, layer group or head asks Python for one new heat map (computed from captured data).
//
// The root element records how long the last redraw took (data-redraw-ms, data-redraw-kind,
// data-redraw-count): from the control's input event to the canvas holding the new pixels. The browser
// test reads them, and the status line shows them.

function render({ model, el }) {
  const view = connect(model);
  const listen = view.listen;

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

  const stepFrom = slider(0, 0, 1, 0, "sx-step-from");
  const stepTo = slider(0, 0, 1, 0, "sx-step-to");
  const stepRange = h("div", { class: "sx-dual" }, h("div", { class: "sx-dual-track" }), stepFrom, stepTo);
  const stepReadout = readout();
  const groupSlider = slider(0, 0, 1, 0, "sx-group");
  const groupReadout = readout();
  const headSlider = slider(-1, 0, 1, -1, "sx-head");
  const headReadout = readout();
  const imageSelect = select([], "sx-image");
  const imageRow = labelled("Image", imageSelect);

  const opacitySlider = slider(0, 1, 0.05, 0.5, "sx-opacity");
  const opacityReadout = readout();
  const colormapSelect = select([], "sx-colormap");

  const thresholdSlider = slider(0, 1, 0.01, 0.4, "sx-threshold");
  const thresholdReadout = readout();
  const maskToggle = h("input", { type: "checkbox", class: "sx-show-mask" });

  const strip = h("div", { class: "sx-strip" });
  const trajectorySlider = slider(0, 0, 1, 0, "sx-trajectory-step");
  const trajectoryReadout = readout();

  const promptInput = h("input", { type: "text", class: "sx-gen-prompt", "aria-label": "prompt" });
  const seedInput = h("input", { type: "number", class: "sx-gen-seed", min: "0", step: "1", "aria-label": "seed" });
  const stepsInput = h("input", { type: "number", class: "sx-gen-steps", min: "1", max: "200", step: "1", "aria-label": "steps" });
  const guidanceInput = h("input", { type: "number", class: "sx-gen-guidance", min: "0", max: "30", step: "0.5", "aria-label": "guidance" });
  const generateButton = h("button", { type: "button", class: "sx-generate-button" }, "Generate");
  const generateHint = h("span", { class: "sx-hint" });
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

  const root = widgetRoot("sdlab-explorer",
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
      progressIndicator(),
      generateHint),
    h("div", { class: "sx-status" }, messageLine(), timing));
  el.append(root);

  // ---------------------------------------------------------------------------------------- drawing
  let width = 0;
  let height = 0;
  let basePixels = null; // RGBA of the generated image, native size
  const decodeLatest = latestOnly(decodePng); // decoding is asynchronous: only the latest picture may land
  const recordRedraw = redrawTimer(root, timing, "new heat map from the kernel");

  function paint() {
    const heat = bytesOf(model.get("heat"));
    if (!basePixels || heat.length !== width * height) return false;
    const threshold = Number(model.get("threshold"));
    // Main view: the heat map over the image, or (show_mask) the image dimmed outside the mask, as
    // AttributionExplorer.snapshot() draws it; beside it, the mask alone.
    const overlay = model.get("show_mask")
      ? maskImage(heat, width, threshold, { base: basePixels, dim: 0.25 })
      : applyColormap(heat, width, colormapTable(model.get("colormap_tables"), model.get("colormap")),
        { base: basePixels, opacity: Number(model.get("opacity")) });
    putPixels(overlayCanvas, overlay);
    putPixels(maskCanvas, maskImage(heat, width, threshold));
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
    const png = bytesOf(model.get("image_png"));
    if (png.length === 0) return;
    const image = await decodeLatest(png);
    if (!image) return;
    ({ width, height, data: basePixels } = image);
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

  // A new word, step range, layer group or head asks the kernel for a heat map. One request is in flight:
  // while a slider is dragged, later positions wait and only the latest is sent (base.js's requester).
  const heatMaps = requester(view);
  const requestHeatMap = heatMaps.ask;
  const setLocal = (key, value) => view.save({ [key]: value });

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
    setOptions(imageSelect, Array.from({ length: n }, (_, i) => [i, `image ${i + 1} of ${n}`]));
    imageSelect.value = String(model.get("image_index"));
  }

  function showDisplayControls() {
    opacitySlider.value = String(model.get("opacity"));
    opacityReadout.textContent = Number(model.get("opacity")).toFixed(2);
    thresholdSlider.value = String(model.get("threshold"));
    thresholdReadout.textContent = Number(model.get("threshold")).toFixed(2);
    maskToggle.checked = model.get("show_mask");
    const names = Object.keys(model.get("colormap_tables") || {});
    if (colormapSelect.options.length !== names.length) setOptions(colormapSelect, names);
    colormapSelect.value = model.get("colormap");
  }

  let frameUrls = [];
  function showTrajectory() {
    for (const url of frameUrls) URL.revokeObjectURL(url);
    frameUrls = model.get("trajectory_pngs").map(pngUrl);
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

  function generate() {
    // Read every field before setting any: each model.set fires a change that refills the fields from the model.
    const settings = {
      prompt: promptInput.value,
      seed: Math.max(0, Math.round(Number(seedInput.value) || 0)),
      num_inference_steps: Math.max(1, Math.round(Number(stepsInput.value) || 1)),
      guidance_scale: Number(guidanceInput.value) || 0,
    };
    view.save(settings);
    view.event("generate"); // LabWidget.on_event("generate", ...): busy, progress bar, then the new run
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
  listen("image_png", loadImage);
  listen("heat", () => {
    // Only one request is in flight, so a new heat map while one is pending is its answer.
    if (!paint()) return;
    const started = heatMaps.takeStart();
    if (started !== null) recordRedraw(started, "kernel");
  });
  listen("heat_label", () => { heatLabel.textContent = model.get("heat_label"); });
  listen("image_prompt", () => { promptLabel.textContent = `“${model.get("image_prompt")}”`; });
  listen("words word occurrence", showWords);
  listen("num_steps step_start step_stop can_slice", showSteps);
  listen("site_group_names site_group", showGroups);
  listen("num_heads head can_slice", showHead);
  listen("num_images image_index", showImages);
  listen("opacity threshold show_mask colormap colormap_tables", () => {
    showDisplayControls();
    paint();
  });
  listen("trajectory_pngs", showTrajectory);
  listen("trajectory_step", showTrajectoryStep);
  listen("prompt seed num_inference_steps guidance_scale can_generate", showGenerate);
  listen("display_size", resize);
  // busy / progress / message (LabWidget): while the model runs every fieldset is disabled, so nothing moves.
  showStatus(view, root);

  // First draw from the state the model already holds.
  resize();
  heatLabel.textContent = model.get("heat_label");
  promptLabel.textContent = `“${model.get("image_prompt")}”`;
  showWords();
  showSteps();
  showGroups();
  showHead();
  showImages();
  showDisplayControls();
  showTrajectory();
  showGenerate();
  loadImage();

  view.onCleanup(() => { for (const url of frameUrls) URL.revokeObjectURL(url); });
  return view.dispose;
}

export default { render };
