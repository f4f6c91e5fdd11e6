// Front end of widgets.GuidanceExplorer. No dependencies, no network. It follows widgets/static/base.js in one
// ES module (widgets.base.esm): h, slider, select, setOptions, labelled, connect, requester, decodePng,
// latestOnly, colormapTable, applyColormap, putPixels, progressIndicator, messageLine, showStatus and
// redrawTimer are base.js's helpers.
//
// Python sends, for the method and scale chosen: the plain and the guided image (PNG), their difference (one
// byte per pixel), and what the method reads: panels of frames (one per denoising step, one byte per pixel at
// the map's own size), lines for a small plot, a note per step. The method buttons, the scale slider and
// "Apply" (prompt, seed, guidance, steps, the method's options) ask the kernel (one request in flight, latest
// wins: base.js's requester); an answer from the kernel's cache is drawn at once, a new scale runs the model
// first (busy, with a progress bar). The step slider, the merge-site chooser, opacity and colormap are redrawn
// here alone.
//
// The root element records the last redraw (data-redraw-ms, data-redraw-kind: "kernel" after a computation,
// "cache" for a cached answer, "local" for the browser alone; data-redraw-count) and the kernel's
// pipeline_runs (data-pipeline-runs) with every answer. The browser test reads them.

const SERIES_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
const PLOT_WIDTH = 380;
const PLOT_HEIGHT = 130;
const PLOT_MARGIN = { left: 34, right: 8, top: 8, bottom: 20 };

function svgElement(tag, attributes = {}, ...children) {
  // h() for SVG: elements of the SVG namespace.
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  for (const child of children) if (child !== null && child !== undefined) element.append(child);
  return element;
}

function render({ model, el }) {
  const view = connect(model);
  const listen = view.listen;

  // ---------------------------------------------------------------------------------------- layout
  const resultLabel = h("span", { class: "sx-gx-result" });
  const methodButtons = h("div", { class: "sx-gx-methods sx-segmented", role: "radiogroup", "aria-label": "guidance method" });
  const scaleName = h("span", { class: "sx-row-name sx-gx-scale-name" });
  const scaleSlider = slider(0, 1, 0.1, 0, "sx-gx-scale");
  const scaleTicks = h("datalist", { id: `sx-gx-ticks-${Math.random().toString(36).slice(2)}` });
  scaleSlider.setAttribute("list", scaleTicks.id);
  const scaleReadout = readout();
  const cachedNote = h("span", { class: "sx-hint sx-gx-cached" });

  const figure = (className, caption) => {
    const canvas = h("canvas", { class: `sx-gx-canvas ${className}` });
    const label = h("div", { class: "sx-gx-label" }, caption);
    const note = h("div", { class: "sx-gx-note" });
    const stage = h("div", { class: "sx-gx-stage" }, canvas);
    return { canvas, label, note, stage, element: h("figure", { class: "sx-gx-figure" }, stage, h("figcaption", {}, label, note)) };
  };
  const plainFigure = figure("sx-gx-plain", "plain");
  const guidedFigure = figure("sx-gx-guided", "guided");
  const differenceFigure = figure("sx-gx-difference", "difference |guided − plain|");

  const usesTitle = h("div", { class: "sx-section-title sx-gx-uses-title" });
  const usesText = h("div", { class: "sx-hint sx-gx-uses-text" });
  const stepSlider = slider(0, 0, 1, 0, "sx-gx-step");
  const stepReadout = h("span", { class: "sx-readout sx-gx-step-readout" });
  const groupSelect = select([], "sx-gx-group");
  const groupRow = labelled("Merge site", groupSelect);
  const panels = h("div", { class: "sx-gx-panels" });
  const plotLabel = h("div", { class: "sx-hint sx-gx-plot-label" });
  const plot = svgElement("svg", { class: "sx-gx-plot", width: PLOT_WIDTH, height: PLOT_HEIGHT,
    viewBox: `0 0 ${PLOT_WIDTH} ${PLOT_HEIGHT}` });
  const legend = h("div", { class: "sx-gx-legend" });
  const stepNote = h("div", { class: "sx-gx-step-note" });

  const promptInput = h("input", { type: "text", class: "sx-gx-prompt", "aria-label": "prompt" });
  const seedInput = h("input", { type: "number", class: "sx-gx-seed", step: "1", "aria-label": "seed" });
  const guidanceInput = h("input", { type: "number", class: "sx-gx-guidance", min: "0", step: "0.5",
    "aria-label": "guidance scale" });
  const stepsInput = h("input", { type: "number", class: "sx-gx-steps", min: "1", max: "200", step: "1",
    "aria-label": "denoising steps" });
  const subjectsInput = h("input", { type: "text", class: "sx-gx-subjects", placeholder: "shape words of the prompt",
    "aria-label": "Attend-and-Excite subjects" });
  const scheduleSelect = select([["paper", "paper (lab's defaults)"], ["adapted", "adapted: schedule_for(steps)"]],
    "sx-gx-schedule");
  const layersInput = h("input", { type: "text", class: "sx-gx-layers", "aria-label": "PAG layers" });
  const layersList = h("datalist", { id: `sx-gx-layers-${Math.random().toString(36).slice(2)}` },
    ...["mid", "up", "down", "self", "down_blocks.1", "up_blocks.0", "up self 16x16"].map((v) => h("option", { value: v })));
  layersInput.setAttribute("list", layersList.id);
  const presetSelect = select([], "sx-gx-preset");
  const applyButton = h("button", { type: "button", class: "sx-gx-apply" }, "Apply");
  const pendingHint = h("span", { class: "sx-hint sx-gx-pending" });
  const optionRows = {
    attend_excite: [labelled("Subjects", subjectsInput), labelled("Schedule", scheduleSelect)],
    pag: [labelled("Layers", layersInput, layersList)],
    freeu: [labelled("Preset", presetSelect)],
    sag: [],
  };

  const opacitySlider = slider(0, 1, 0.05, 0.55, "sx-gx-opacity");
  const opacityReadout = readout();
  const colormapSelect = select([], "sx-gx-colormap");
  const timing = h("span", { class: "sx-timing" });

  const root = widgetRoot("sdlab-guidance",
    h("div", { class: "sx-gx-header" }, h("span", { class: "sx-gx-title" }, "Guidance explorer"), resultLabel),
    h("fieldset", { class: "sx-gx-choose" },
      methodButtons,
      h("label", { class: "sx-row sx-gx-scale-row" }, scaleName, scaleSlider, scaleReadout),
      scaleTicks,
      h("div", { class: "sx-gx-go" }, cachedNote, progressIndicator())),
    h("div", { class: "sx-gx-gallery" }, plainFigure.element, guidedFigure.element, differenceFigure.element),
    h("div", { class: "sx-gx-uses sx-ruled" },
      usesTitle,
      usesText,
      h("div", { class: "sx-gx-step-controls" }, labelled("Step", stepSlider, stepReadout), groupRow),
      panels,
      h("div", { class: "sx-gx-plot-box" }, plotLabel, plot, legend),
      stepNote),
    h("div", { class: "sx-gx-controls sx-ruled" },
      h("fieldset", { class: "sx-gx-settings" },
        h("div", { class: "sx-section-title" }, "Generation (applied by Apply)"),
        labelled("Prompt", promptInput),
        labelled("Seed", seedInput),
        labelled("Guidance", guidanceInput),
        labelled("Steps", stepsInput),
        h("div", { class: "sx-gx-options" }),
        h("div", { class: "sx-gx-go" }, applyButton, pendingHint)),
      h("fieldset", { class: "sx-gx-display" },
        h("div", { class: "sx-section-title" }, "Display"),
        labelled("Opacity", opacitySlider, opacityReadout),
        labelled("Colormap", colormapSelect))),
    h("div", { class: "sx-status" }, messageLine(), timing));
  el.append(root);
  const optionsBox = root.querySelector(".sx-gx-options");

  const recordRedraw = redrawTimer(root, timing, "computed in the kernel");
  const requests = requester(view, { timeoutMs: 120000 }); // a computation takes seconds: do not resend meanwhile
  const decodePlain = latestOnly(decodePng);
  const decodeGuided = latestOnly(decodePng);
  let guidedPixels = null; // ImageData of the guided image, under the panels
  let panelViews = []; // { panel, stage, base, overlay }

  // -------------------------------------------------------------------------------------- the method
  function info(method = model.get("method")) {
    return (model.get("method_info") || {})[method] || { label: method, scale: "scale", min: 0, max: 1, step: 0.1 };
  }

  function showMethods() {
    const methods = Object.keys(model.get("method_info") || {});
    if (methodButtons.children.length !== methods.length) {
      methodButtons.replaceChildren(...methods.map((method) => h("button", {
        type: "button", class: "sx-gx-method sx-segment", "data-method": method, role: "radio",
        onclick: () => chooseMethod(method),
      }, info(method).label)));
    }
    for (const button of methodButtons.children) {
      const chosen = button.dataset.method === model.get("method");
      button.classList.toggle("sx-selected", chosen);
      button.setAttribute("aria-checked", String(chosen));
    }
    for (const [method, rows] of Object.entries(optionRows)) {
      for (const row of rows) row.style.display = method === model.get("method") ? "" : "none";
    }
    if (optionsBox.children.length === 0) optionsBox.append(...Object.values(optionRows).flat());
    showScale();
  }

  function showScale() {
    const { scale, min, max, step } = info();
    const value = (model.get("scales") || {})[model.get("method")] ?? min;
    scaleName.textContent = scale;
    scaleSlider.min = String(min);
    scaleSlider.max = String(max);
    scaleSlider.step = String(step);
    scaleSlider.value = String(value);
    scaleReadout.textContent = formatScale(value);
    showCached();
  }

  function formatScale(value) {
    return Number(value).toFixed(2).replace(/\.?0+$/, "");
  }

  function showCached() {
    const cached = model.get("cached") || [];
    scaleTicks.replaceChildren(...cached.map((value) => h("option", { value: String(value) })));
    cachedNote.textContent = cached.length ? `computed: ${cached.map(formatScale).join(", ")} (instant)` : "";
  }

  function chooseMethod(method) {
    if (model.get("busy") || method === model.get("method")) return;
    requests.ask({ method });
  }

  scaleSlider.addEventListener("input", () => {
    scaleReadout.textContent = formatScale(scaleSlider.value);
    requests.ask({ scales: { ...model.get("scales"), [model.get("method")]: Number(scaleSlider.value) } });
  });

  // ---------------------------------------------------------------------------------------- drawing
  function sentSize() {
    const [width, height] = model.get("sent_size");
    return { width, height };
  }

  function resize() {
    const size = model.get("display_size");
    const { width, height } = sentSize();
    const tall = Math.round((size * height) / Math.max(width, 1));
    for (const stage of root.querySelectorAll(".sx-gx-stage")) {
      stage.style.width = `${size}px`;
      stage.style.height = `${tall}px`;
    }
    for (const figureElement of root.querySelectorAll(".sx-gx-figure")) figureElement.style.width = `${size}px`;
    // Square pixels when enlarging (TinyWorld's 64x64); smooth resampling when shrinking a large image.
    const rendering = width >= size ? "auto" : "pixelated";
    for (const canvas of root.querySelectorAll(".sx-gx-canvas")) canvas.style.imageRendering = rendering;
  }

  async function drawImages() {
    // The answer's images; then every panel (they sit on the guided image). Returns false if superseded.
    const [plain, guided] = await Promise.all([decodePlain(model.get("plain_png")), decodeGuided(model.get("guided_png"))]);
    if (!plain || !guided) return false;
    putPixels(plainFigure.canvas, plain);
    putPixels(guidedFigure.canvas, guided);
    guidedPixels = guided;
    drawDifference();
    return true;
  }

  function drawDifference() {
    const heat = bytesOf(model.get("difference"));
    const { width, height } = sentSize();
    if (heat.length !== width * height || !width) return;
    const table = colormapTable(model.get("colormap_tables"), model.get("colormap"));
    putPixels(differenceFigure.canvas, applyColormap(heat, width, table));
  }

  function currentPanels() {
    const group = model.get("group");
    return (model.get("overlay_panels") || []).filter((panel) => !panel.group || panel.group === group);
  }

  function buildPanels() {
    panelViews = currentPanels().map((panel) => {
      const base = panel.over === "guided" ? h("canvas", { class: "sx-gx-canvas sx-gx-base" }) : null;
      const overlay = h("canvas", { class: `sx-gx-overlay sx-gx-${panel.mode}` });
      const stage = h("div", { class: "sx-gx-stage" }, base, overlay);
      const element = h("figure", { class: "sx-gx-figure sx-gx-panel" }, stage,
        h("figcaption", {}, h("div", { class: "sx-gx-label" }, panel.label)));
      return { panel, stage, base, overlay, element };
    });
    panels.replaceChildren(...panelViews.map((panelView) => panelView.element));
    resize();
  }

  function drawPanels() {
    // The frame of the current step in every panel on display; true when something was drawn.
    const step = Number(model.get("step"));
    const table = colormapTable(model.get("colormap_tables"), model.get("colormap"));
    const opacity = Number(model.get("opacity"));
    for (const { panel, base, overlay } of panelViews) {
      if (base && guidedPixels) putPixels(base, guidedPixels);
      const frames = panel.frames || [];
      const frame = bytesOf(frames[Math.min(step, frames.length - 1)]);
      if (frame.length !== panel.width * panel.height) continue;
      if (panel.mode === "mask") {
        const pixels = new ImageData(panel.width, panel.height);
        const top = table.length - 3;
        for (let i = 0, p = 0; i < frame.length; i += 1, p += 4) {
          pixels.data[p] = table[top];
          pixels.data[p + 1] = table[top + 1];
          pixels.data[p + 2] = table[top + 2];
          pixels.data[p + 3] = frame[i] > 127 ? 255 : 0;
        }
        putPixels(overlay, pixels);
      } else {
        putPixels(overlay, applyColormap(frame, panel.width, table));
      }
      overlay.style.opacity = base ? String(opacity) : "1";
    }
    return panelViews.length > 0;
  }

  function currentSeries() {
    const group = model.get("group");
    return (model.get("overlay_series") || []).filter((series) => !series.group || series.group === group);
  }

  function drawPlot() {
    const series = currentSeries();
    const frames = (model.get("overlay_steps") || []).length;
    const step = Number(model.get("step"));
    const { left, right, top, bottom } = PLOT_MARGIN;
    const innerWidth = PLOT_WIDTH - left - right;
    const innerHeight = PLOT_HEIGHT - top - bottom;
    const values = series.flatMap((line) => line.values.filter((v) => v !== null));
    const ymax = Math.max(...series.map((line) => line.ymax ?? 0), ...values, 1e-9);
    const x = (frame) => left + (frames > 1 ? (frame / (frames - 1)) * innerWidth : innerWidth / 2);
    const y = (value) => top + innerHeight * (1 - value / ymax);
    const children = [];
    const width = frames > 1 ? innerWidth / (frames - 1) : innerWidth;
    for (const frame of model.get("overlay_shaded") || []) {
      children.push(svgElement("rect", { class: "sx-gx-shade", x: x(frame) - width / 2, y: top, width, height: innerHeight }));
    }
    children.push(svgElement("line", { class: "sx-gx-axis", x1: left, y1: top + innerHeight, x2: left + innerWidth, y2: top + innerHeight }));
    children.push(svgElement("line", { class: "sx-gx-axis", x1: left, y1: top, x2: left, y2: top + innerHeight }));
    const label = (text, attributes) => svgElement("text", { class: "sx-gx-tick", ...attributes }, text);
    children.push(label(formatScale(ymax.toPrecision(2)), { x: left - 4, y: top + 8, "text-anchor": "end" }));
    children.push(label("0", { x: left - 4, y: top + innerHeight, "text-anchor": "end" }));
    children.push(label("step", { x: left + innerWidth, y: PLOT_HEIGHT - 4, "text-anchor": "end" }));
    children.push(label(String((model.get("overlay_steps") || [0])[0] ?? 0), { x: left, y: PLOT_HEIGHT - 6, "text-anchor": "middle" }));
    series.forEach((line) => {
      // A polyline per run of known values (null: no reading at that step).
      let points = [];
      const flush = () => {
        if (points.length > 1) {
          children.push(svgElement("polyline", { class: "sx-gx-line", points: points.join(" "), fill: "none",
            stroke: SERIES_COLORS[line.color % SERIES_COLORS.length], "stroke-width": 1.6,
            "stroke-dasharray": line.dashed ? "4 3" : "none" }));
        } else if (points.length === 1) {
          const [cx, cy] = points[0].split(",");
          children.push(svgElement("circle", { cx, cy, r: 2, fill: SERIES_COLORS[line.color % SERIES_COLORS.length] }));
        }
        points = [];
      };
      line.values.forEach((value, frame) => {
        if (value === null) flush();
        else points.push(`${x(frame).toFixed(1)},${y(value).toFixed(1)}`);
      });
      flush();
    });
    if (frames) children.push(svgElement("line", { class: "sx-gx-now", x1: x(step), y1: top, x2: x(step), y2: top + innerHeight }));
    plot.replaceChildren(...children);
    legend.replaceChildren(...series.map((line) => h("span", { class: "sx-gx-key" },
      h("span", { class: `sx-gx-swatch${line.dashed ? " sx-gx-dashed" : ""}`,
        style: `border-color: ${SERIES_COLORS[line.color % SERIES_COLORS.length]}` }), line.label)));
    plotLabel.textContent = model.get("plot_label");
  }

  function showStep() {
    const steps = model.get("overlay_steps") || [];
    const timesteps = model.get("overlay_timesteps") || [];
    const step = Math.min(Number(model.get("step")), Math.max(steps.length - 1, 0));
    stepSlider.max = String(Math.max(steps.length - 1, 0));
    stepSlider.value = String(step);
    stepReadout.textContent = steps.length ? `${steps[step]} · t ${timesteps[step]}` : "";
    const notes = (model.get("group_notes") || {})[model.get("group")] ?? model.get("overlay_notes") ?? [];
    stepNote.textContent = notes[step] ? `step ${steps[step]}: ${notes[step]}` : "";
  }

  function showGroups() {
    const groups = model.get("overlay_groups") || [];
    groupRow.style.display = groups.length ? "" : "none";
    if ([...groupSelect.options].map((o) => o.value).join() !== groups.join()) setOptions(groupSelect, groups);
    if (groups.length) groupSelect.value = model.get("group");
  }

  function showTexts() {
    resultLabel.textContent = model.get("result_label");
    differenceFigure.note.textContent = model.get("difference_label");
    usesTitle.textContent = `What ${info().label} uses`;
    usesText.textContent = model.get("overlay_text");
    root.dataset.pipelineRuns = String(model.get("pipeline_runs"));
    root.dataset.shownVersion = String(model.get("shown_version"));
  }

  function drawOverlay() {
    showGroups();
    buildPanels();
    drawPanels();
    drawPlot();
    showStep();
  }

  async function onAnswer() {
    // A new answer (images, difference, overlay, labels: one message from Python's hold_sync). What it answers
    // is read now: the kernel's echo of the request comes next and would clear it while the PNGs decode.
    const started = requests.takeStart();
    const kind = model.get("from_cache") ? "cache" : "kernel";
    showTexts();
    showMethods();
    if (!(await drawImages())) return;
    drawOverlay();
    root.dataset.drawnVersion = String(model.get("shown_version"));
    if (started !== null) recordRedraw(started, kind);
  }

  function redrawLocally(what) {
    const started = performance.now();
    what();
    recordRedraw(started, "local");
  }

  // ---------------------------------------------------------------------------- generation settings
  function showSettings() {
    for (const [input, name] of [[promptInput, "prompt"], [subjectsInput, "subjects"], [layersInput, "pag_layers"]]) {
      if (document.activeElement !== input) input.value = model.get(name);
    }
    seedInput.value = String(model.get("seed"));
    guidanceInput.value = String(model.get("guidance_scale"));
    stepsInput.value = String(model.get("num_inference_steps"));
    scheduleSelect.value = model.get("ae_schedule");
    const presets = Object.keys(model.get("freeu_presets") || {});
    if (presetSelect.options.length !== presets.length) {
      setOptions(presetSelect, presets.map((name) => {
        const v = model.get("freeu_presets")[name];
        return [name, `${name}: b ${v.b1}, ${v.b2} · s ${v.s1}, ${v.s2}`];
      }));
    }
    presetSelect.value = model.get("freeu_preset");
    showPending();
  }

  function chosenSettings() {
    return {
      prompt: promptInput.value,
      seed: Math.round(Number(seedInput.value) || 0),
      guidance_scale: Number(guidanceInput.value) || 0,
      num_inference_steps: Math.max(1, Math.round(Number(stepsInput.value) || 1)),
      subjects: subjectsInput.value,
      ae_schedule: scheduleSelect.value,
      pag_layers: layersInput.value,
      freeu_preset: presetSelect.value,
    };
  }

  function showPending() {
    const chosen = chosenSettings();
    const changed = Object.entries(chosen).some(([name, value]) => value !== model.get(name));
    pendingHint.textContent = changed ? "changed: Apply (or Enter) to generate" : "";
    applyButton.classList.toggle("sx-changed", changed);
  }

  function apply() {
    requests.ask(chosenSettings()); // read every control before any model.set refills them
  }

  for (const input of [promptInput, seedInput, guidanceInput, stepsInput, subjectsInput, layersInput]) {
    input.addEventListener("input", showPending);
    input.addEventListener("keydown", (event) => { if (event.key === "Enter") apply(); });
  }
  for (const control of [scheduleSelect, presetSelect]) control.addEventListener("change", showPending);
  applyButton.addEventListener("click", apply);

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
    redrawLocally(() => { drawPanels(); drawPlot(); showStep(); });
  });
  groupSelect.addEventListener("change", () => {
    view.save({ group: groupSelect.value });
    redrawLocally(drawOverlay);
  });
  opacitySlider.addEventListener("input", () => {
    view.save({ opacity: Number(opacitySlider.value) });
    opacityReadout.textContent = Number(opacitySlider.value).toFixed(2);
    redrawLocally(drawPanels);
  });
  colormapSelect.addEventListener("change", () => {
    view.save({ colormap: colormapSelect.value });
    redrawLocally(() => { drawDifference(); drawPanels(); });
  });

  // ----------------------------------------------------------------------------- changes from Python
  listen("shown_version", onAnswer);
  listen("method method_info scales", showMethods);
  listen("cached", showCached);
  listen("prompt seed guidance_scale num_inference_steps subjects ae_schedule pag_layers freeu_preset freeu_presets",
    showSettings);
  listen("opacity colormap colormap_tables", () => { showDisplayControls(); drawDifference(); drawPanels(); });
  listen("display_size sent_size", resize);
  listen("pipeline_runs", showTexts);
  // busy / progress / message (LabWidget): while the model runs every fieldset is disabled.
  showStatus(view, root);

  // First draw from the state the model already holds.
  showSettings();
  showDisplayControls();
  showTexts();
  showMethods();
  resize();
  drawImages().then((drawn) => {
    if (!drawn) return;
    drawOverlay();
    root.dataset.drawnVersion = String(model.get("shown_version"));
  });

  return view.dispose;
}

export default { render };
