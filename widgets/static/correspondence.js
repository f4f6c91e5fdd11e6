// Front end of widgets.CorrespondenceExplorer. No dependencies, no network. It follows widgets/static/base.js
// in one ES module (widgets.base.esm): h, slider, select, labelled, connect, requester, decodePng,
// applyColormap, putPixels, showStatus, redrawTimer... are base.js's helpers.
//
// Python sends the images (PNG, the source first), the keypoints of TinyWorld renders, and for the point on
// the source: per target, its cosine-similarity map (one byte per pixel) and the matched pixel. A click (or a
// drag) on the source moves the point marker at once and asks the kernel for the new maps and matches (one
// request in flight, latest wins: base.js's requester); opacity, colormap and the keypoint markers are
// redrawn here alone. Block, timestep, ensemble and prompt take effect on "Recompute" (new features: busy,
// with a progress bar).
//
// The root element records how long the last redraw took (data-redraw-ms, data-redraw-kind,
// data-redraw-count: from the pointer event to the targets holding the new maps and markers) and counts
// the maps painted (data-heat-version); every marker carries its position as data-x / data-y (image
// pixels). The browser test reads them.

// Clicks this close to a source keypoint (screen pixels) land on it exactly.
const SNAP_PIXELS = 8;

function render({ model, el }) {
  const view = connect(model);
  const listen = view.listen;

  // ---------------------------------------------------------------------------------------- layout
  const summary = h("span", { class: "sx-cx-summary" });
  const gallery = h("div", { class: "sx-cx-gallery" });

  const blockSelect = select([], "sx-cx-block");
  const timestepSlider = slider(0, 999, 1, 261, "sx-cx-timestep");
  const timestepReadout = readout();
  const ensembleInput = h("input", { type: "number", class: "sx-cx-ensemble", min: "1", max: "64", step: "1",
    "aria-label": "ensemble size" });
  const promptInput = h("input", { type: "text", class: "sx-cx-prompt", "aria-label": "prompt",
    placeholder: "prompt (may be empty)" });
  const recomputeButton = h("button", { type: "button", class: "sx-cx-recompute" }, "Recompute");
  const pendingHint = h("span", { class: "sx-hint sx-cx-pending" });

  const opacitySlider = slider(0, 1, 0.05, 0.6, "sx-cx-opacity");
  const opacityReadout = readout();
  const colormapSelect = select([], "sx-cx-colormap");
  const keypointToggle = h("input", { type: "checkbox", class: "sx-cx-show-keypoints" });
  const timing = h("span", { class: "sx-timing" });

  const root = widgetRoot("sdlab-correspondence",
    h("div", { class: "sx-cx-header" }, h("span", { class: "sx-cx-title" }, "Correspondence explorer (DIFT)"), summary),
    h("div", { class: "sx-hint sx-cx-instructions" },
      "Click or drag on the source: each target shows the cosine similarity of its pixels' features with the " +
      "point's, and its best match (ringed)."),
    gallery,
    h("div", { class: "sx-cx-controls sx-ruled" },
      h("fieldset", { class: "sx-cx-features" },
        h("div", { class: "sx-section-title" }, "Features (applied by Recompute)"),
        labelled("Block", blockSelect),
        labelled("Timestep", timestepSlider, timestepReadout),
        labelled("Ensemble", ensembleInput),
        labelled("Prompt", promptInput),
        h("div", { class: "sx-cx-go" }, recomputeButton, progressIndicator(), pendingHint)),
      h("fieldset", { class: "sx-cx-display" },
        h("div", { class: "sx-section-title" }, "Display"),
        labelled("Opacity", opacitySlider, opacityReadout),
        labelled("Colormap", colormapSelect),
        h("label", { class: "sx-row sx-check" }, keypointToggle, h("span", {}, "show the ground-truth keypoints")))),
    h("div", { class: "sx-status" }, messageLine(), timing));
  el.append(root);

  // ---------------------------------------------------------------------------------------- figures
  // figures[0] is the source; each: { figure, canvas, stage, label, note, pixels, markers }
  let figures = [];
  const decoders = [];
  const recordRedraw = redrawTimer(root, timing, "new maps from the kernel");
  const matches = requester(view);

  function imageSize() {
    const [width, height] = model.get("image_size");
    return { width, height };
  }

  function place(marker, x, y) {
    // (x, y) in image pixels, continuous: the marker's centre, as a percentage of the stage.
    const { width, height } = imageSize();
    marker.style.left = `${(100 * x) / width}%`;
    marker.style.top = `${(100 * y) / height}%`;
    marker.dataset.x = String(x);
    marker.dataset.y = String(y);
  }

  function buildFigures() {
    const pngs = model.get("image_pngs");
    figures = pngs.map((_, index) => {
      const canvas = h("canvas", { class: index === 0 ? "sx-cx-canvas sx-cx-source" : "sx-cx-canvas sx-cx-target",
        "data-index": String(index) });
      const stage = h("div", { class: "sx-cx-stage" }, canvas);
      const label = h("div", { class: "sx-cx-label" });
      const note = h("div", { class: "sx-cx-note" });
      const figure = h("figure", { class: `sx-cx-figure${index === 0 ? " sx-cx-source-figure" : ""}`,
        "data-index": String(index) }, stage, h("figcaption", {}, label, note));
      return { figure, canvas, stage, label, note, pixels: null, markers: {} };
    });
    gallery.replaceChildren(...figures.map((f) => f.figure));
    const source = figures[0];
    if (source) {
      source.markers.query = h("div", { class: "sx-cx-marker sx-query", title: "the point" });
      source.stage.append(source.markers.query);
      source.stage.addEventListener("pointerdown", onPointerDown);
      source.stage.addEventListener("pointermove", onPointerMove);
      source.stage.addEventListener("pointerup", onPointerUp);
      source.stage.addEventListener("pointercancel", onPointerUp);
    }
    for (const target of figures.slice(1)) {
      target.markers.truth = h("div", { class: "sx-cx-marker sx-truth", title: "the true position of this keypoint" });
      target.markers.match = h("div", { class: "sx-cx-marker sx-match", title: "the best match" });
      target.stage.append(target.markers.truth, target.markers.match);
    }
    showKeypoints();
    showLabels();
    resize();
    pngs.forEach((png, index) => loadImage(index, png));
  }

  async function loadImage(index, png) {
    decoders[index] = decoders[index] ?? latestOnly(decodePng);
    const image = await decoders[index](png);
    const figure = figures[index];
    if (!image || !figure) return;
    figure.pixels = image;
    if (index === 0) putPixels(figure.canvas, image);
    else if (figures.slice(1).every((target) => target.pixels)) paintTargets();
    else paintTarget(index);
  }

  function showKeypoints() {
    const keypoints = model.get("keypoints");
    figures.forEach((figure, index) => {
      for (const old of figure.stage.querySelectorAll(".sx-kp")) old.remove();
      for (const [name, [x, y]] of Object.entries(keypoints[index] ?? {})) {
        const ring = h("div", { class: "sx-cx-marker sx-kp", title: name, "data-name": name });
        place(ring, x, y);
        figure.stage.insertBefore(ring, figure.stage.querySelector(".sx-cx-marker:not(.sx-kp)"));
      }
    });
    root.classList.toggle("sx-cx-hide-keypoints", !model.get("show_keypoints"));
  }

  function showLabels() {
    const labels = model.get("image_labels");
    const notes = model.get("match_notes");
    figures.forEach((figure, index) => {
      figure.label.textContent = labels[index] ?? "";
      figure.note.textContent = index === 0 ? pointText() : notes[index - 1] ?? "";
    });
  }

  function pointText() {
    const [x, y] = model.get("point");
    const keypoint = model.get("query_keypoint");
    return `point (${x.toFixed(1)}, ${y.toFixed(1)})${keypoint ? ` · keypoint ${keypoint}` : ""}`;
  }

  function resize() {
    const size = model.get("display_size");
    const { width, height } = imageSize();
    const [sentWidth] = model.get("sent_size");
    // Square pixels when enlarging (TinyWorld's 64x64); smooth resampling when shrinking (a 512 px image).
    const rendering = sentWidth && sentWidth >= size ? "auto" : "pixelated";
    for (const figure of figures) {
      figure.stage.style.width = `${size}px`;
      figure.stage.style.height = `${Math.round((size * height) / Math.max(width, 1))}px`;
      figure.canvas.style.imageRendering = rendering;
      figure.figure.style.width = `${size}px`;
    }
  }

  // ---------------------------------------------------------------------------------------- drawing
  function paintTarget(index) {
    const figure = figures[index];
    const heat = bytesOf(model.get("heats")[index - 1]);
    const [sentWidth, sentHeight] = model.get("sent_size");
    if (!figure || !figure.pixels) return false;
    if (heat.length !== sentWidth * sentHeight) {
      putPixels(figure.canvas, figure.pixels);
      return false;
    }
    const table = colormapTable(model.get("colormap_tables"), model.get("colormap"));
    putPixels(figure.canvas, applyColormap(heat, sentWidth, table,
      { base: figure.pixels.data, opacity: Number(model.get("opacity")) }));
    return true;
  }

  function paintTargets() {
    // Every target with its map; counted in data-heat-version when all of them were painted.
    let painted = 0;
    for (let index = 1; index < figures.length; index += 1) painted += paintTarget(index) ? 1 : 0;
    const all = figures.length > 1 && painted === figures.length - 1;
    if (all) root.dataset.heatVersion = String((Number(root.dataset.heatVersion) || 0) + 1);
    return all;
  }

  function showMatches() {
    const matched = model.get("matched");
    const keypoints = model.get("keypoints");
    const query = model.get("query_keypoint");
    figures.slice(1).forEach((figure, i) => {
      const match = matched[i];
      figure.markers.match.style.display = match ? "" : "none";
      if (match) place(figure.markers.match, match[0] + 0.5, match[1] + 0.5); // the pixel's centre
      const truth = query ? (keypoints[i + 1] ?? {})[query] : null;
      figure.markers.truth.style.display = truth ? "" : "none";
      if (truth) place(figure.markers.truth, truth[0], truth[1]);
    });
    if (figures[0]) place(figures[0].markers.query, ...model.get("point"));
    showLabels();
  }

  function onNewMaps() {
    // The answer to a click: maps, matches and notes arrive in one message (Python's hold_sync).
    showMatches();
    if (!paintTargets()) return;
    const started = matches.takeStart();
    if (started !== null) recordRedraw(started, "kernel");
  }

  function paintLocally() {
    const started = performance.now();
    if (paintTargets()) recordRedraw(started, "local");
  }

  // ------------------------------------------------------------------------------ clicking the source
  let dragging = false;

  function pointAt(event) {
    // The event's position in source-image pixels (continuous), snapped onto a keypoint within SNAP_PIXELS.
    const rect = figures[0].stage.getBoundingClientRect();
    const { width, height } = imageSize();
    const px = Math.min(Math.max(event.clientX - rect.left, 0), rect.width - 0.01);
    const py = Math.min(Math.max(event.clientY - rect.top, 0), rect.height - 0.01);
    let x = (px / rect.width) * width;
    let y = (py / rect.height) * height;
    if (model.get("show_keypoints")) {
      let best = SNAP_PIXELS;
      for (const [kx, ky] of Object.values(model.get("keypoints")[0] ?? {})) {
        const distance = Math.hypot(((kx - x) * rect.width) / width, ((ky - y) * rect.height) / height);
        if (distance <= best && kx >= 0 && kx < width && ky >= 0 && ky < height) {
          best = distance;
          x = kx;
          y = ky;
        }
      }
    }
    return [Math.round(x * 100) / 100, Math.round(y * 100) / 100];
  }

  function askFor(event) {
    if (model.get("busy")) return;
    const point = pointAt(event);
    place(figures[0].markers.query, ...point); // the point moves now; the matches follow from the kernel
    figures[0].note.textContent = `point (${point[0].toFixed(1)}, ${point[1].toFixed(1)})`;
    matches.ask({ point });
  }

  function onPointerDown(event) {
    if (event.button !== 0) return;
    dragging = true;
    figures[0].stage.setPointerCapture?.(event.pointerId);
    event.preventDefault();
    askFor(event);
  }

  function onPointerMove(event) {
    if (dragging) askFor(event);
  }

  function onPointerUp(event) {
    dragging = false;
    figures[0].stage.releasePointerCapture?.(event.pointerId);
  }

  // ------------------------------------------------------------------------------- feature settings
  function blocksValue(blocks) {
    return blocks.join("+");
  }

  function showSettings() {
    const names = model.get("block_names");
    const current = blocksValue(model.get("blocks"));
    const options = names.includes(current) ? names : [...names, current];
    setOptions(blockSelect, options);
    blockSelect.value = current;
    timestepSlider.max = String(model.get("num_train_timesteps") - 1);
    timestepSlider.value = String(model.get("timestep"));
    timestepReadout.textContent = String(model.get("timestep"));
    ensembleInput.value = String(model.get("ensemble"));
    if (document.activeElement !== promptInput) promptInput.value = model.get("prompt");
    recomputeButton.disabled = !model.get("can_recompute");
    showPending();
  }

  function chosenSettings() {
    return {
      blocks: blockSelect.value.split("+").filter(Boolean),
      timestep: Math.round(Number(timestepSlider.value)),
      ensemble: Math.max(1, Math.round(Number(ensembleInput.value) || 1)),
      prompt: promptInput.value,
    };
  }

  function showPending() {
    const shown = model.get("feature_settings") || {};
    const chosen = chosenSettings();
    const changed = shown.timestep !== undefined && (chosen.timestep !== shown.timestep ||
      chosen.ensemble !== shown.ensemble || chosen.prompt !== shown.prompt ||
      blocksValue(chosen.blocks) !== blocksValue(shown.blocks || []));
    pendingHint.textContent = !model.get("can_recompute") ? "built from features: pass pipe= to recompute"
      : changed ? "settings changed: Recompute to apply" : "";
    recomputeButton.classList.toggle("sx-changed", changed);
  }

  function recompute() {
    // Read every control before setting any: each model.set fires a change that refills them from the model.
    view.save(chosenSettings());
    view.event("recompute"); // LabWidget.on_event("recompute", ...): busy, progress bar, then the new maps
  }

  function showDisplayControls() {
    opacitySlider.value = String(model.get("opacity"));
    opacityReadout.textContent = Number(model.get("opacity")).toFixed(2);
    const names = Object.keys(model.get("colormap_tables") || {});
    if (colormapSelect.options.length !== names.length) setOptions(colormapSelect, names);
    colormapSelect.value = model.get("colormap");
    keypointToggle.checked = model.get("show_keypoints");
  }

  // ---------------------------------------------------------------------------------- control events
  timestepSlider.addEventListener("input", () => {
    timestepReadout.textContent = timestepSlider.value;
    showPending();
  });
  for (const control of [blockSelect, ensembleInput, promptInput]) {
    control.addEventListener("input", showPending);
    control.addEventListener("change", showPending);
  }
  promptInput.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !recomputeButton.disabled) recompute();
  });
  recomputeButton.addEventListener("click", recompute);
  opacitySlider.addEventListener("input", () => {
    view.save({ opacity: Number(opacitySlider.value) });
    opacityReadout.textContent = Number(opacitySlider.value).toFixed(2);
    paintLocally();
  });
  colormapSelect.addEventListener("change", () => {
    view.save({ colormap: colormapSelect.value });
    paintLocally();
  });
  keypointToggle.addEventListener("change", () => {
    view.save({ show_keypoints: keypointToggle.checked });
    root.classList.toggle("sx-cx-hide-keypoints", !keypointToggle.checked);
  });

  // ----------------------------------------------------------------------------- changes from Python
  listen("image_pngs", buildFigures);
  listen("image_size sent_size display_size", () => { resize(); showKeypoints(); showMatches(); });
  listen("image_labels", showLabels);
  listen("keypoints show_keypoints", () => { showKeypoints(); showDisplayControls(); });
  listen("heats", onNewMaps);
  listen("matched match_notes query_keypoint point", showMatches);
  listen("opacity colormap colormap_tables", () => { showDisplayControls(); paintTargets(); });
  listen("block_names blocks timestep ensemble prompt num_train_timesteps can_recompute", showSettings);
  listen("feature_settings", showPending);
  listen("feature_summary", () => { summary.textContent = model.get("feature_summary"); });
  // busy / progress / message (LabWidget): while features are extracted every fieldset is disabled.
  showStatus(view, root);

  // First draw from the state the model already holds.
  summary.textContent = model.get("feature_summary");
  buildFigures();
  showSettings();
  showDisplayControls();
  showMatches();

  return view.dispose;
}

export default { render };
