// Front end of widgets.EditingExplorer. No dependencies, no network. It follows widgets/static/base.js in one
// ES module (widgets.base.esm): h, slider, select, setOptions, labelled, readout, widgetRoot, connect, requester,
// bytesOf, decodePng, latestOnly, colormapTable, applyColormap, putPixels, progressIndicator, messageLine,
// showStatus and redrawTimer are base.js's helpers.
//
// Python sends, for the image, inversion and edit chosen: the source, its reconstruction, P2P's source row and
// the edit (PNGs), two differences (one byte per pixel), LocalBlend's mask of every step (one byte per latent
// position) and the blend words' final maps. The method buttons, the injection sliders and "Apply" ask the kernel
// (one request in flight, latest wins: base.js's requester); an answer from the kernel's cache is drawn at once,
// anything new runs the model first (busy, with a progress bar). "Pick" and "Upload" are browser events. The
// step slider (the mask of another step), opacity and colormap are redrawn here alone.
//
// The root element records the last redraw (data-redraw-ms, data-redraw-kind: "kernel" after a computation,
// "cache" for a cached answer, "local" for the browser alone; data-redraw-count) and the kernel's
// pipeline_runs (data-pipeline-runs). The browser test reads them.

function render({ model, el }) {
  const view = connect(model);
  const listen = view.listen;

  // ---------------------------------------------------------------------------------------- layout
  const figure = (className, caption) => {
    const canvas = h("canvas", { class: `sx-ed-canvas ${className}` });
    const note = h("div", { class: "sx-ed-note" });
    const stage = h("div", { class: "sx-ed-stage" }, canvas);
    const element = h("figure", { class: "sx-ed-figure" }, stage,
      h("figcaption", {}, h("div", { class: "sx-ed-label" }, caption), note));
    return { canvas, note, stage, element };
  };
  const sourceFigure = figure("sx-ed-source", "source image");
  const reconstructionFigure = figure("sx-ed-reconstruction", "reconstruction from x_T");
  const reconstructionDifference = figure("sx-ed-reconstruction-difference", "|reconstruction − source|");
  const editSourceFigure = figure("sx-ed-edit-source", "P2P's source row");
  const editedFigure = figure("sx-ed-edited", "edit");
  const editDifference = figure("sx-ed-edit-difference", "|edit − source|");
  const maskCanvas = h("canvas", { class: "sx-ed-overlay sx-ed-mask" });
  const maskFigure = figure("sx-ed-mask-base", "LocalBlend mask over the edit");
  maskFigure.stage.append(maskCanvas);
  const blendPanels = h("div", { class: "sx-ed-blend-panels" });

  const inversionLabel = h("span", { class: "sx-ed-result sx-ed-inversion-label" });
  const editLabel = h("span", { class: "sx-ed-result sx-ed-edit-label" });
  const stepSlider = slider(0, 0, 1, 0, "sx-ed-step");
  const stepReadout = h("span", { class: "sx-readout sx-ed-step-readout" });
  const stepRow = labelled("Step", stepSlider, stepReadout);
  const stepNote = h("div", { class: "sx-ed-step-note" });

  // Source: a TinyWorld render by seed, or a file.
  const seedInput = h("input", { type: "number", class: "sx-ed-seed", step: "1", "aria-label": "TinyWorld seed" });
  const pickButton = h("button", { type: "button", class: "sx-ed-pick" }, "Pick");
  const fileInput = h("input", { type: "file", class: "sx-ed-file", accept: "image/png,image/jpeg" });
  const sourceNote = h("span", { class: "sx-hint sx-ed-source-note" });
  const sourcePrompt = h("input", { type: "text", class: "sx-ed-source-prompt", "aria-label": "source prompt" });

  // Inversion.
  const methodButtons = h("div", { class: "sx-ed-methods sx-segmented", role: "radiogroup", "aria-label": "inversion method" });
  const stepsInput = h("input", { type: "number", class: "sx-ed-steps", min: "1", max: "99", step: "1" });
  const guidanceInput = h("input", { type: "number", class: "sx-ed-guidance", min: "0", step: "0.5" });

  // Edit.
  const targetPrompt = h("input", { type: "text", class: "sx-ed-target-prompt", "aria-label": "edited prompt" });
  const editSelect = select([["auto", "auto (replace if as many words)"], ["replace", "replace a word"],
    ["refine", "refine (words added)"], ["reweight", "reweight a word"]], "sx-ed-edit");
  const reweightWord = h("input", { type: "text", class: "sx-ed-reweight-word", placeholder: "word of the edited prompt" });
  const reweightScale = h("input", { type: "number", class: "sx-ed-reweight-scale", step: "0.5" });
  const reweightRow = labelled("Reweight", h("span", { class: "sx-ed-pair" }, reweightWord, reweightScale));
  const blendWords = h("input", { type: "text", class: "sx-ed-blend", placeholder: "e.g. square (empty: no LocalBlend)" });
  const blendThreshold = h("input", { type: "number", class: "sx-ed-threshold", min: "0", max: "0.95", step: "0.05" });
  const crossSlider = slider(0, 1, 0.05, 0.8, "sx-ed-cross");
  const crossReadout = readout();
  const selfSlider = slider(0, 1, 0.05, 0.4, "sx-ed-self");
  const selfReadout = readout();
  const applyButton = h("button", { type: "button", class: "sx-ed-apply" }, "Apply");
  const pendingHint = h("span", { class: "sx-hint sx-ed-pending" });
  const cachedNote = h("span", { class: "sx-hint sx-ed-cached" });

  const opacitySlider = slider(0, 1, 0.05, 0.55, "sx-ed-opacity");
  const opacityReadout = readout();
  const colormapSelect = select([], "sx-ed-colormap");
  const timing = h("span", { class: "sx-timing" });

  const root = widgetRoot("sdlab-editing",
    h("div", { class: "sx-ed-header" }, h("span", { class: "sx-ed-title" }, "Inversion and editing explorer"),
      cachedNote, progressIndicator()),
    h("fieldset", { class: "sx-ed-choose sx-ruled" },
      h("div", { class: "sx-section-title" }, "Source image and inversion"),
      h("div", { class: "sx-ed-go" }, h("span", {}, "TinyWorld seed"), seedInput, pickButton, h("span", {}, "or"),
        fileInput, sourceNote),
      labelled("Prompt", sourcePrompt),
      h("div", { class: "sx-ed-go" }, methodButtons, h("span", {}, "steps"), stepsInput, h("span", {}, "guidance"),
        guidanceInput)),
    h("div", { class: "sx-ed-row" }, inversionLabel),
    h("div", { class: "sx-ed-gallery" }, sourceFigure.element, reconstructionFigure.element,
      reconstructionDifference.element),
    h("fieldset", { class: "sx-ed-editing sx-ruled" },
      h("div", { class: "sx-section-title" }, "Prompt-to-Prompt"),
      labelled("Edited", targetPrompt),
      labelled("Edit", editSelect),
      reweightRow,
      labelled("LocalBlend", h("span", { class: "sx-ed-pair" }, blendWords, blendThreshold)),
      labelled("Cross τc", crossSlider, crossReadout),
      labelled("Self τs", selfSlider, selfReadout),
      h("div", { class: "sx-ed-go" }, applyButton, pendingHint)),
    h("div", { class: "sx-ed-row" }, editLabel),
    h("div", { class: "sx-ed-gallery" }, editSourceFigure.element, editedFigure.element, editDifference.element,
      maskFigure.element, blendPanels),
    h("div", { class: "sx-ed-steps-box" }, stepRow, stepNote),
    h("fieldset", { class: "sx-ed-display" },
      labelled("Opacity", opacitySlider, opacityReadout),
      labelled("Colormap", colormapSelect)),
    h("div", { class: "sx-status" }, messageLine(), timing));
  el.append(root);

  const recordRedraw = redrawTimer(root, timing, "computed in the kernel");
  const requests = requester(view, { timeoutMs: 300000 }); // an inversion takes seconds: do not resend meanwhile
  const decoders = [0, 1, 2, 3].map(() => latestOnly(decodePng));
  let editedPixels = null;

  // -------------------------------------------------------------------------------------- the method
  function showMethods() {
    const info = model.get("method_info") || {};
    if (methodButtons.children.length !== Object.keys(info).length) {
      methodButtons.replaceChildren(...Object.entries(info).map(([method, { label }]) => h("button", {
        type: "button", class: "sx-ed-method sx-segment", "data-method": method, role: "radio",
        onclick: () => { if (!model.get("busy") && method !== model.get("method")) requests.ask({ method }); },
      }, label)));
    }
    for (const button of methodButtons.children) {
      const chosen = button.dataset.method === model.get("method");
      button.classList.toggle("sx-selected", chosen);
      button.setAttribute("aria-checked", String(chosen));
    }
  }

  // ---------------------------------------------------------------------------------------- drawing
  function resize() {
    const size = model.get("display_size");
    const [width, height] = model.get("sent_size");
    const tall = Math.round((size * height) / Math.max(width, 1));
    for (const stage of root.querySelectorAll(".sx-ed-stage")) {
      stage.style.width = `${size}px`;
      stage.style.height = `${tall}px`;
    }
    for (const element of root.querySelectorAll(".sx-ed-figure")) element.style.width = `${size}px`;
    const rendering = width >= size ? "auto" : "pixelated";
    for (const canvas of root.querySelectorAll(".sx-ed-canvas")) canvas.style.imageRendering = rendering;
  }

  async function drawImages() {
    const names = ["source_png", "reconstruction_png", "edit_source_png", "edited_png"];
    const images = await Promise.all(names.map((name, i) => decoders[i](model.get(name))));
    if (images.some((image) => !image)) return false;
    const canvases = [sourceFigure, reconstructionFigure, editSourceFigure, editedFigure].map((f) => f.canvas);
    images.forEach((image, i) => putPixels(canvases[i], image));
    editedPixels = images[3];
    drawDifferences();
    return true;
  }

  function drawDifferences() {
    const [width] = model.get("sent_size");
    const table = colormapTable(model.get("colormap_tables"), model.get("colormap"));
    for (const [name, target] of [["reconstruction_difference", reconstructionDifference], ["edit_difference", editDifference]]) {
      const heat = bytesOf(model.get(name));
      if (width && heat.length) putPixels(target.canvas, applyColormap(heat, width, table));
    }
    for (const panel of blendPanels.querySelectorAll("canvas")) {
      const data = (model.get("blend_panels") || [])[Number(panel.dataset.index)];
      if (data) putPixels(panel, applyColormap(bytesOf(data.frame), data.width, table));
    }
  }

  function buildBlendPanels() {
    const panels = model.get("blend_panels") || [];
    blendPanels.replaceChildren(...panels.map((panel, index) => {
      const canvas = h("canvas", { class: "sx-ed-canvas sx-ed-blend-map", "data-index": String(index) });
      return h("figure", { class: "sx-ed-figure" }, h("div", { class: "sx-ed-stage" }, canvas),
        h("figcaption", {}, h("div", { class: "sx-ed-label" }, panel.label)));
    }));
    resize();
    for (const canvas of blendPanels.querySelectorAll("canvas")) canvas.style.imageRendering = "auto";
  }

  function drawMask() {
    // The mask of the current step over the edit: inside in the colormap's top colour, outside dimmed.
    const frames = model.get("mask_frames") || [];
    const has = frames.length > 0;
    maskFigure.element.style.display = has ? "" : "none";
    stepRow.style.display = has ? "" : "none";
    if (!has) {
      stepNote.textContent = "no LocalBlend: type blend words to keep the edit to where they attend";
      return false;
    }
    const [width, height] = model.get("mask_size");
    const step = Math.min(Number(model.get("step")), frames.length - 1);
    const frame = bytesOf(frames[step]);
    if (editedPixels) putPixels(maskFigure.canvas, editedPixels);
    const table = colormapTable(model.get("colormap_tables"), model.get("colormap"));
    const pixels = new ImageData(width, height);
    const top = table.length - 3;
    for (let i = 0, p = 0; i < frame.length; i += 1, p += 4) {
      const inside = frame[i] > 127;
      pixels.data[p] = inside ? table[top] : 0;
      pixels.data[p + 1] = inside ? table[top + 1] : 0;
      pixels.data[p + 2] = inside ? table[top + 2] : 0;
      pixels.data[p + 3] = inside ? 255 : 150;
    }
    putPixels(maskCanvas, pixels);
    maskCanvas.style.opacity = String(model.get("opacity"));
    stepSlider.max = String(frames.length - 1);
    stepSlider.value = String(step);
    stepReadout.textContent = `${step + 1} / ${frames.length}`;
    stepNote.textContent = `after step ${step}: ${(model.get("mask_notes") || [])[step] ?? ""}`;
    return true;
  }

  function showTexts() {
    inversionLabel.textContent = model.get("inversion_label");
    editLabel.textContent = model.get("edit_label");
    reconstructionDifference.note.textContent = model.get("reconstruction_label");
    editDifference.note.textContent = model.get("difference_label");
    cachedNote.textContent = model.get("cached_note");
    root.dataset.pipelineRuns = String(model.get("pipeline_runs"));
    root.dataset.shownVersion = String(model.get("shown_version"));
  }

  async function onAnswer() {
    const started = requests.takeStart();
    const kind = model.get("from_cache") ? "cache" : "kernel";
    showTexts();
    showMethods();
    showSettings();
    if (!(await drawImages())) return;
    buildBlendPanels();
    drawDifferences();
    drawMask();
    root.dataset.drawnVersion = String(model.get("shown_version"));
    if (started !== null) recordRedraw(started, kind);
  }

  function redrawLocally(what) {
    const started = performance.now();
    what();
    recordRedraw(started, "local");
  }

  // ---------------------------------------------------------------------------------------- settings
  const texts = [[sourcePrompt, "source_prompt"], [targetPrompt, "target_prompt"], [reweightWord, "reweight_word"],
    [blendWords, "blend_words"]];
  const numbers = [[stepsInput, "num_inference_steps"], [guidanceInput, "guidance_scale"],
    [reweightScale, "reweight_scale"], [blendThreshold, "blend_threshold"]];

  function showSettings() {
    for (const [input, name] of texts) if (document.activeElement !== input) input.value = model.get(name);
    for (const [input, name] of numbers) input.value = String(model.get(name));
    if (document.activeElement !== seedInput) seedInput.value = String(model.get("seed"));
    editSelect.value = model.get("edit");
    reweightRow.style.display = model.get("edit") === "reweight" ? "" : "none";
    crossSlider.value = String(model.get("cross_steps"));
    crossReadout.textContent = Number(model.get("cross_steps")).toFixed(2);
    selfSlider.value = String(model.get("self_steps"));
    selfReadout.textContent = Number(model.get("self_steps")).toFixed(2);
    sourceNote.textContent = model.get("source") === "upload" ? "showing your upload" : "";
    showPending();
  }

  function chosenSettings() {
    const chosen = {};
    for (const [input, name] of texts) chosen[name] = input.value;
    for (const [input, name] of numbers) chosen[name] = Number(input.value) || 0;
    chosen.num_inference_steps = Math.max(1, Math.round(chosen.num_inference_steps));
    chosen.edit = editSelect.value;
    return chosen;
  }

  function showPending() {
    const changed = Object.entries(chosenSettings()).some(([name, value]) => value !== model.get(name));
    pendingHint.textContent = changed ? "changed: Apply (or Enter) to run" : "";
    applyButton.classList.toggle("sx-changed", changed);
  }

  function apply() {
    requests.ask(chosenSettings());
  }

  for (const [input] of [...texts, ...numbers]) {
    input.addEventListener("input", showPending);
    input.addEventListener("keydown", (event) => { if (event.key === "Enter") apply(); });
  }
  editSelect.addEventListener("change", () => {
    reweightRow.style.display = editSelect.value === "reweight" ? "" : "none";
    showPending();
  });
  applyButton.addEventListener("click", apply);
  for (const [control, name, shown] of [[crossSlider, "cross_steps", crossReadout], [selfSlider, "self_steps", selfReadout]]) {
    control.addEventListener("input", () => {
      shown.textContent = Number(control.value).toFixed(2);
      requests.ask({ [name]: Number(control.value) });
    });
  }

  function pick() {
    view.event("pick", { seed: Math.round(Number(seedInput.value) || 0) });
  }
  pickButton.addEventListener("click", pick);
  seedInput.addEventListener("keydown", (event) => { if (event.key === "Enter") pick(); });
  fileInput.addEventListener("change", async () => {
    const file = fileInput.files[0];
    if (!file) return;
    const bytes = new Uint8Array(await file.arrayBuffer());
    let binary = "";
    for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    view.event("upload", { name: file.name, data: btoa(binary) });
    fileInput.value = "";
  });

  // ---------------------------------------------------------------------------------- display controls
  function showDisplayControls() {
    opacitySlider.value = String(model.get("opacity"));
    opacityReadout.textContent = Number(model.get("opacity")).toFixed(2);
    const names = Object.keys(model.get("colormap_tables") || {});
    if (colormapSelect.options.length !== names.length) setOptions(colormapSelect, names);
    colormapSelect.value = model.get("colormap");
  }

  stepSlider.addEventListener("input", () => {
    view.save({ step: Number(stepSlider.value) });
    redrawLocally(drawMask);
  });
  opacitySlider.addEventListener("input", () => {
    view.save({ opacity: Number(opacitySlider.value) });
    opacityReadout.textContent = Number(opacitySlider.value).toFixed(2);
    redrawLocally(drawMask);
  });
  colormapSelect.addEventListener("change", () => {
    view.save({ colormap: colormapSelect.value });
    redrawLocally(() => { drawDifferences(); drawMask(); });
  });

  // ----------------------------------------------------------------------------- changes from Python
  listen("shown_version", onAnswer);
  listen("method method_info", showMethods);
  listen("seed source source_prompt target_prompt edit reweight_word reweight_scale cross_steps self_steps " +
    "blend_words blend_threshold num_inference_steps guidance_scale", showSettings);
  listen("opacity colormap colormap_tables", () => { showDisplayControls(); drawDifferences(); drawMask(); });
  listen("display_size sent_size", resize);
  listen("pipeline_runs cached_note", showTexts);
  showStatus(view, root);

  showSettings();
  showDisplayControls();
  showTexts();
  showMethods();
  resize();
  drawImages().then((drawn) => {
    if (!drawn) return;
    buildBlendPanels();
    drawDifferences();
    drawMask();
    root.dataset.drawnVersion = String(model.get("shown_version"));
  });

  return view.dispose;
}

export default { render };
