// Front end of widgets.ErasingExplorer. No dependencies, no network. It follows widgets/static/base.js in one ES
// module (widgets.base.esm): h, slider, labelled, readout, widgetRoot, connect, requester, bytesOf, decodePng,
// latestOnly, putPixels, progressIndicator, messageLine, showStatus and redrawTimer are base.js's helpers.
//
// Python sends, for the erasure on display, one tile per held-out prompt and seed: the image before and after
// (PNGs) and the judge's reading of each; and, for the slider, the image without it and at the chosen scale.
// "Run" saves the erasing controls and sends the browser event "run" (the kernel erases, or answers from its
// cache); "Train slider" sends "train_slider". The scale, start-step, prompt and seed of the slider ask the kernel
// (one request in flight, latest wins: base.js's requester); an image already computed is answered from the
// kernel's cache at once, anything new runs the model first (busy, with a progress bar).
//
// The root element records the last redraw (data-redraw-ms, data-redraw-kind: "kernel" after a computation,
// "cache" for a cached answer; data-redraw-count), the kernel's pipeline_runs (data-pipeline-runs) and the
// versions drawn (data-drawn-version, data-slider-drawn). The browser test reads them.

function render({ model, el }) {
  const view = connect(model);
  const listen = view.listen;

  // ---------------------------------------------------------------------------------------- layout
  const eraseLabel = h("div", { class: "sx-er-result sx-er-erase-label" });
  const summary = h("div", { class: "sx-er-summary" });
  const grid = h("div", { class: "sx-er-grid" });

  const conceptInput = h("input", { type: "text", class: "sx-er-concept", "aria-label": "concept to erase" });
  const methodButtons = h("div", { class: "sx-er-methods sx-segmented", role: "radiogroup", "aria-label": "erasing method" });
  const preserveInput = h("input", { type: "text", class: "sx-er-preserve", placeholder: "e.g. circle, square (empty: none)" });
  const guideInput = h("input", { type: "text", class: "sx-er-guide", placeholder: "empty: nothing" });
  const uceRows = h("div", { class: "sx-er-uce" }, labelled("Preserve", preserveInput), labelled("Guide", guideInput));
  const iterationsInput = h("input", { type: "number", class: "sx-er-iterations", min: "1", step: "1" });
  const lrInput = h("input", { type: "number", class: "sx-er-lr", min: "0", step: "any" });
  const etaInput = h("input", { type: "number", class: "sx-er-eta", step: "0.5" });
  const esdRow = h("div", { class: "sx-er-go sx-er-esd" }, h("span", {}, "iterations"), iterationsInput,
    h("span", {}, "lr"), lrInput, h("span", {}, "η"), etaInput);
  const promptsInput = h("textarea", { class: "sx-er-prompts", rows: "4", "aria-label": "held-out prompts, one a line" });
  const runButton = h("button", { type: "button", class: "sx-er-run" }, "Run");
  const pendingHint = h("span", { class: "sx-hint sx-er-pending" });
  const cachedNote = h("span", { class: "sx-hint sx-er-cached" });

  const sliderLabel = h("div", { class: "sx-er-result sx-er-slider-label" });
  const positiveInput = h("input", { type: "text", class: "sx-er-positive", "aria-label": "positive end" });
  const negativeInput = h("input", { type: "text", class: "sx-er-negative", "aria-label": "negative end" });
  const targetInput = h("input", { type: "text", class: "sx-er-target", placeholder: "empty: everywhere" });
  const trainButton = h("button", { type: "button", class: "sx-er-train" }, "Train slider");
  const scaleSlider = slider(-4, 4, 0.25, 0, "sx-er-scale");
  const scaleReadout = readout();
  const stepSlider = slider(0, 19, 1, 0, "sx-er-start");
  const stepReadout = readout();
  const sliderPrompt = h("input", { type: "text", class: "sx-er-slider-prompt", "aria-label": "slider prompt" });
  const sliderSeed = h("input", { type: "number", class: "sx-er-slider-seed", step: "1", "aria-label": "seed" });
  const sliderControls = h("div", { class: "sx-er-slider-controls" },
    labelled("Scale", scaleSlider, scaleReadout),
    labelled("Start step", stepSlider, stepReadout),
    labelled("Prompt", h("span", { class: "sx-er-pair" }, sliderPrompt, sliderSeed)));
  const figure = (className, caption) => {
    const canvas = h("canvas", { class: `sx-er-canvas ${className}` });
    const note = h("div", { class: "sx-er-reading" });
    const title = h("div", { class: "sx-er-label" }, caption);
    const element = h("figure", { class: "sx-er-figure" }, h("div", { class: "sx-er-stage" }, canvas),
      h("figcaption", {}, title, note));
    return { canvas, note, title, element };
  };
  const baseFigure = figure("sx-er-slider-base", "without the slider");
  const scaledFigure = figure("sx-er-slider-image", "at the scale");
  const sliderCached = h("div", { class: "sx-hint sx-er-slider-cached" });
  const timing = h("span", { class: "sx-timing" });

  const root = widgetRoot("sdlab-erasing",
    h("div", { class: "sx-er-header" }, h("span", { class: "sx-er-title" }, "Erasing and sliders explorer"),
      cachedNote, progressIndicator()),
    h("fieldset", { class: "sx-er-choose sx-ruled" },
      h("div", { class: "sx-section-title" }, "Erase a concept"),
      h("div", { class: "sx-er-go" }, h("span", {}, "Concept"), conceptInput, methodButtons),
      uceRows, esdRow,
      labelled("Prompts", promptsInput),
      h("div", { class: "sx-er-go" }, runButton, pendingHint)),
    eraseLabel, summary, grid,
    h("fieldset", { class: "sx-er-slider sx-ruled" },
      h("div", { class: "sx-section-title" }, "Concept Slider"),
      sliderLabel,
      h("div", { class: "sx-er-go" }, h("span", {}, "positive"), positiveInput, h("span", {}, "negative"),
        negativeInput, h("span", {}, "on"), targetInput, trainButton),
      sliderControls),
    h("div", { class: "sx-er-gallery" }, baseFigure.element, scaledFigure.element),
    sliderCached,
    h("div", { class: "sx-status" }, messageLine(), timing));
  el.append(root);

  const recordRedraw = redrawTimer(root, timing, "computed in the kernel");
  const requests = requester(view, { timeoutMs: 300000 }); // a slider image takes a second: do not resend meanwhile
  const decode = latestOnly(async (pngs) => Promise.all(pngs.map((png) => (bytesOf(png).length ? decodePng(png) : null))));
  const decodeSlider = latestOnly(async (pngs) => Promise.all(pngs.map((png) => decodePng(png))));
  let runStarted = null;

  // -------------------------------------------------------------------------------------- the method
  function showMethods() {
    const info = model.get("method_info") || {};
    if (methodButtons.children.length !== Object.keys(info).length) {
      methodButtons.replaceChildren(...Object.entries(info).map(([method, { label, changes }]) => h("button", {
        type: "button", class: "sx-er-method sx-segment", "data-method": method, role: "radio", title: changes,
        onclick: () => { if (!model.get("busy")) { view.save({ method }); showPending(); } },
      }, label)));
    }
    const method = model.get("method");
    for (const button of methodButtons.children) {
      const chosen = button.dataset.method === method;
      button.classList.toggle("sx-selected", chosen);
      button.setAttribute("aria-checked", String(chosen));
    }
    uceRows.style.display = method === "uce" ? "" : "none";
    esdRow.style.display = method === "uce" ? "none" : "";
  }

  // ---------------------------------------------------------------------------------------- drawing
  function resize() {
    const size = model.get("display_size");
    for (const stage of root.querySelectorAll(".sx-er-stage")) {
      stage.style.width = `${size}px`;
      stage.style.height = `${size}px`;
    }
    for (const element of root.querySelectorAll(".sx-er-figure")) element.style.width = `${size}px`;
    for (const text of root.querySelectorAll(".sx-er-prompt-text")) text.style.maxWidth = `${size}px`;
    for (const name of root.querySelectorAll(".sx-er-row-name")) name.style.minHeight = `${size}px`;
  }

  function buildGrid() {
    // One column per tile: the prompt (and seed) above, before and after below, each with the judge's reading.
    const tiles = model.get("tiles") || [];
    // Readings of prompts naming the concept: red while the judge still reads it, blue once it is gone; of the
    // other prompts: orange when their objects are no longer drawn as asked.
    const columns = tiles.map((tile) => {
      const column = (when) => {
        const seen = tile[`${when}_seen`];
        let mark = "";
        if (tile.names && seen !== null) mark = seen ? "sx-er-seen" : "sx-er-unseen";
        if (!tile.names && tile[`${when}_asked`] === false) mark = "sx-er-not-asked";
        return h("figure", { class: `sx-er-figure sx-er-${when}` },
          h("div", { class: "sx-er-stage" }, h("canvas", { class: `sx-er-canvas sx-er-${when}-image` })),
          h("figcaption", {}, h("div", { class: `sx-er-reading ${mark}` },
            tile[`${when}_reading`] || (when === "after" ? "(not run)" : ""))));
      };
      return h("div", { class: `sx-er-column${tile.names ? " sx-er-names" : ""}` },
        h("div", { class: "sx-er-prompt", title: `${tile.prompt}: ${tile.names ? "names" : "does not name"} the concept` },
          h("div", { class: "sx-er-prompt-text" }, tile.prompt), h("div", { class: "sx-er-seed" }, `seed ${tile.seed}`)),
        column("before"), column("after"));
    });
    grid.replaceChildren(h("div", { class: "sx-er-row-names" }, h("div", { class: "sx-er-prompt" }, ""),
      h("div", { class: "sx-er-row-name" }, "before"), h("div", { class: "sx-er-row-name" }, "after")), ...columns);
    resize();
  }

  async function drawGrid() {
    const tiles = model.get("tiles") || [];
    const images = await decode(tiles.flatMap((tile) => [tile.before, tile.after]));
    if (!images) return false;
    const canvases = [...grid.querySelectorAll(".sx-er-column canvas")];
    images.forEach((image, i) => {
      if (image) putPixels(canvases[i], image);
      else canvases[i].getContext("2d").clearRect(0, 0, canvases[i].width, canvases[i].height);
    });
    return true;
  }

  async function drawSlider() {
    const loaded = model.get("slider_loaded");
    sliderControls.style.display = loaded ? "" : "none";
    baseFigure.element.parentElement.style.display = loaded ? "" : "none";
    sliderLabel.textContent = loaded ? model.get("slider_label") : "no slider yet: train one (its ends below)";
    if (!loaded || !bytesOf(model.get("slider_png")).length) return false;
    const images = await decodeSlider([model.get("slider_base_png"), model.get("slider_png")]);
    if (!images) return false;
    putPixels(baseFigure.canvas, images[0]);
    putPixels(scaledFigure.canvas, images[1]);
    baseFigure.note.textContent = model.get("slider_base_reading");
    scaledFigure.note.textContent = model.get("slider_reading");
    scaledFigure.title.textContent = `scale ${Number(model.get("slider_scale"))}` +
      (Number(model.get("start_step")) ? ` from step ${model.get("start_step")}` : "");
    const scales = (model.get("slider_cached") || []).map((s) => String(Number(s)));
    sliderCached.textContent = `computed for this prompt and start step (instant): scales ${scales.join(", ")}`;
    root.dataset.sliderDrawn = String(model.get("slider_version"));
    return true;
  }

  function showTexts() {
    eraseLabel.textContent = model.get("erase_label");
    summary.textContent = model.get("summary");
    cachedNote.textContent = model.get("cached_note");
    root.dataset.pipelineRuns = String(model.get("pipeline_runs"));
    root.dataset.shownVersion = String(model.get("shown_version"));
  }

  async function onErased() {
    const started = runStarted;
    runStarted = null;
    const kind = model.get("from_cache") ? "cache" : "kernel";
    showTexts();
    showSettings();
    buildGrid();
    if (!(await drawGrid())) return;
    root.dataset.drawnVersion = String(model.get("shown_version"));
    if (started !== null) recordRedraw(started, kind);
  }

  async function onSlider() {
    const started = requests.takeStart();
    const kind = model.get("from_cache") ? "cache" : "kernel";
    showTexts();
    showSliderSettings();
    if (!(await drawSlider())) return;
    if (started !== null) recordRedraw(started, kind);
  }

  // ---------------------------------------------------------------------------------------- settings
  const texts = [[conceptInput, "concept"], [preserveInput, "preserve"], [guideInput, "guide"]];
  const numbers = [[iterationsInput, "esd_iterations"], [lrInput, "esd_lr"], [etaInput, "eta"]];
  const sliderTexts = [[positiveInput, "slider_positive"], [negativeInput, "slider_negative"],
    [targetInput, "slider_target"]];

  function showSettings() {
    for (const [input, name] of texts) if (document.activeElement !== input) input.value = model.get(name);
    for (const [input, name] of numbers) if (document.activeElement !== input) input.value = String(model.get(name));
    if (document.activeElement !== promptsInput) promptsInput.value = (model.get("prompts") || []).join("\n");
    for (const [input, name] of sliderTexts) if (document.activeElement !== input) input.value = model.get(name);
    trainButton.textContent = `Train slider (${model.get("slider_iterations")} iterations)`;
    showMethods();
    showPending();
  }

  function showSliderSettings() {
    const k = Number(model.get("max_scale"));
    scaleSlider.min = String(-k);
    scaleSlider.max = String(k);
    scaleSlider.step = String(k / 16);
    scaleSlider.value = String(model.get("slider_scale"));
    scaleReadout.textContent = Number(model.get("slider_scale")).toFixed(2);
    stepSlider.max = String(Math.max(Number(model.get("num_inference_steps")) - 1, 0));
    stepSlider.value = String(model.get("start_step"));
    stepReadout.textContent = String(model.get("start_step"));
    if (document.activeElement !== sliderPrompt) sliderPrompt.value = model.get("slider_prompt");
    if (document.activeElement !== sliderSeed) sliderSeed.value = String(model.get("slider_seed"));
  }

  function chosenSettings() {
    const chosen = {};
    for (const [input, name] of texts) chosen[name] = input.value;
    for (const [input, name] of numbers) chosen[name] = Number(input.value) || 0;
    chosen.esd_iterations = Math.max(1, Math.round(chosen.esd_iterations));
    chosen.prompts = promptsInput.value.split("\n").map((p) => p.trim()).filter((p) => p);
    return chosen;
  }

  function showPending() {
    const chosen = chosenSettings();
    const result = model.get("erase_label");
    const changed = Object.entries(chosen).some(([name, value]) => JSON.stringify(value) !== JSON.stringify(model.get(name)));
    const notRun = !result || result.startsWith("before");
    pendingHint.textContent = changed ? "changed: Run (or Enter) to erase" : notRun ? "Run to erase" : "";
    runButton.classList.toggle("sx-changed", changed || notRun);
  }

  function run() {
    if (model.get("busy")) return;
    runStarted = performance.now();
    view.save(chosenSettings());
    view.event("run");
  }

  for (const [input] of [...texts, ...numbers]) {
    input.addEventListener("input", showPending);
    input.addEventListener("keydown", (event) => { if (event.key === "Enter") run(); });
  }
  promptsInput.addEventListener("input", showPending);
  runButton.addEventListener("click", run);

  function train() {
    if (model.get("busy")) return;
    const chosen = {};
    for (const [input, name] of sliderTexts) chosen[name] = input.value;
    view.save(chosen);
    view.event("train_slider");
  }
  trainButton.addEventListener("click", train);
  for (const [input] of sliderTexts) input.addEventListener("keydown", (event) => { if (event.key === "Enter") train(); });

  scaleSlider.addEventListener("input", () => {
    scaleReadout.textContent = Number(scaleSlider.value).toFixed(2);
    requests.ask({ slider_scale: Number(scaleSlider.value) });
  });
  stepSlider.addEventListener("input", () => {
    stepReadout.textContent = stepSlider.value;
    requests.ask({ start_step: Number(stepSlider.value) });
  });
  const askPrompt = () => requests.ask({ slider_prompt: sliderPrompt.value,
    slider_seed: Math.round(Number(sliderSeed.value) || 0) });
  for (const input of [sliderPrompt, sliderSeed]) {
    input.addEventListener("keydown", (event) => { if (event.key === "Enter") askPrompt(); });
  }

  // ----------------------------------------------------------------------------- changes from Python
  listen("shown_version", onErased);
  listen("slider_version", onSlider);
  listen("method method_info", showMethods);
  listen("concept preserve guide esd_iterations esd_lr eta prompts slider_positive slider_negative slider_target " +
    "slider_iterations", showSettings);
  listen("slider_scale start_step slider_prompt slider_seed max_scale num_inference_steps", showSliderSettings);
  listen("slider_loaded slider_label", drawSlider);
  listen("display_size", resize);
  listen("pipeline_runs cached_note erase_label summary", showTexts);
  showStatus(view, root);

  showSettings();
  showSliderSettings();
  showTexts();
  buildGrid();
  drawGrid().then((drawn) => { if (drawn) root.dataset.drawnVersion = String(model.get("shown_version")); });
  drawSlider();

  return view.dispose;
}

export default { render };
