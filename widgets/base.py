"""What every sdlab widget shares, kernel side: LabWidget, and the encoders that feed its front end.

    from widgets.base import LabWidget, esm, css, png_bytes, heat_bytes, colormap_tables

    class Editor(LabWidget):
        _esm = esm("editor.js")                     # static/base.js + static/editor.js, one ES module
        _css = css("editor.css")                    # static/base.css + static/editor.css
        requested_traits = ("strength",)            # the browser asks for new output when these move

        def answer_request(self):                   # compute it, from the latest values (latest wins)
            self.picture = png_bytes(edit(self.strength))

        def run_edit(self):
            with self.working("editing…") as progress:   # busy, progress bar; cleared even if it fails
                for step in progress.track(range(20)):   # tqdm-like: "step 3 / 20"
                    ...

Every LabWidget has, synced with the browser:
  busy, progress (0..1), progress_text   what a long kernel job shows while it runs (see working());
  message, message_level                 why the last thing failed ("" when nothing did); level "info",
                                         "warning" or "error";
  request, answered_request              the request throttle: the browser numbers its requests and keeps
                                         one in flight; the kernel echoes the number once it has answered.
Browser events (`model.send({event: "name"})`) go to handlers registered with on_event(); the static
copy for exported notebooks (nbconvert HTML, GitHub) is drawn by the static_picture() hook.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
from pathlib import Path
from typing import Callable, Iterable, Iterator

import anywidget
import matplotlib
import numpy as np
import traitlets
from PIL import Image

STATIC = Path(__file__).resolve().parent / "static"
COLORMAPS = ("jet", "turbo", "viridis", "inferno", "gray")
# Pictures larger than this are downsampled before they are sent: widgets show them at a few hundred
# pixels, and a full SDXL image would be 1 MB per redraw.
MAX_SENT_SIZE = 512

__all__ = [
    "COLORMAPS",
    "LabWidget",
    "MAX_SENT_SIZE",
    "Progress",
    "Unanswerable",
    "as_numpy",
    "colormap_table",
    "colormap_tables",
    "css",
    "esm",
    "heat_bytes",
    "png_bytes",
    "static_figure",
]


# ---------------------------------------------------------------------------------------------------------
# The front end: one ES module and one style sheet per widget, composed from files shipped in static/
# ---------------------------------------------------------------------------------------------------------


def esm(*files: str) -> str:
    """The ES module of a widget: static/base.js, then the widget's own files, as one text.

    anywidget loads `_esm` as a single module, and a module can only import another by URL: a sibling file
    would need a bundler, or a server route the kernel does not have. Concatenating keeps it simple and
    offline: base.js's helpers (h, slider, drawPng, requester...) are top-level functions in the same module
    scope as the widget's code, which uses them by name. A widget redefining one is a SyntaxError in the
    browser (duplicate declaration in a module), so clashes do not go unnoticed.
    """
    return _compose("base.js", *files, comment=("// ", ""))


def css(*files: str) -> str:
    """The style sheet of a widget: static/base.css (theme variables, shared controls), then its own."""
    return _compose("base.css", *files, comment=("/* ", " */"))


def _compose(*files: str, comment: tuple[str, str]) -> str:
    opening, closing = comment
    return "\n".join(f"{opening}---- widgets/static/{name}{closing}\n{(STATIC / name).read_text()}" for name in files)


# ---------------------------------------------------------------------------------------------------------
# Encoders: what goes over the wire
# ---------------------------------------------------------------------------------------------------------


def png_bytes(image: Image.Image, max_size: int = MAX_SENT_SIZE) -> bytes:
    """An RGB PNG of the image, downsampled (aspect kept) so that neither side exceeds max_size."""
    image = image.convert("RGB")
    if max(image.size) > max_size:
        image = image.copy()
        image.thumbnail((max_size, max_size), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def colormap_table(name: str) -> bytes:
    """256 RGB entries (768 bytes) of a matplotlib colormap: the colours HeatMap.overlay uses."""
    rgba = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))
    return (rgba[:, :3] * 255 + 0.5).astype(np.uint8).tobytes()


def colormap_tables(names: Iterable[str] = COLORMAPS) -> dict[str, bytes]:
    """name -> colormap_table(name): sent once; the browser colours one-byte maps with them (applyColormap)."""
    return {name: colormap_table(name) for name in names}


def as_numpy(values) -> np.ndarray:
    """A float32 array from a torch tensor (any device) or anything numpy takes."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


def heat_bytes(normalized, size: tuple[int, int]) -> bytes:
    """A map with values in 0..1 as one byte per pixel (0..255), row-major, resized to size = (width, height)."""
    heat = np.clip(as_numpy(normalized) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if heat.shape[::-1] != tuple(size):
        heat = np.asarray(Image.fromarray(heat).resize(tuple(size), Image.BILINEAR))
    return heat.tobytes()


def static_figure(picture: Image.Image, caption: str, *, note: str, css_class: str = "sdlab-widget-static") -> str:
    """HTML of a still picture with a caption: what an exported notebook shows in place of a live widget."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    caption = html.escape(caption)
    return (
        f'<figure class="{css_class}" style="margin:0">'
        f'<img src="data:image/png;base64,{data}" alt="{caption}" '
        f'style="image-rendering:pixelated;width:{picture.width}px">'
        f'<figcaption style="font-size:12px">{caption}<br><em>{html.escape(note)}</em></figcaption></figure>'
    )


# ---------------------------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------------------------


class Unanswerable(Exception):
    """Raised by answer_request() when the request cannot be answered; its text is shown as is in message."""


class Progress:
    """What a job inside LabWidget.working() reports, tqdm-like. Also a `fn(done, total)` callback, the
    signature lab.daam.trace_generation(callback=...) calls after every step."""

    def __init__(self, widget: "LabWidget", total: int | None = None, unit: str = "step"):
        self.widget, self.total, self.unit, self.done = widget, total, unit, 0

    def __call__(self, done: int, total: int | None = None, text: str | None = None) -> None:
        self.done, self.total = done, self.total if total is None else total
        with self.widget.hold_sync():  # an unknown total: the bar stays empty, the text counts
            self.widget.progress = min(max(done / self.total, 0.0), 1.0) if self.total else 0.0
            count = f"{done} / {self.total}" if self.total else f"{done}"
            self.widget.progress_text = text if text is not None else f"{self.unit} {count}"

    def update(self, n: int = 1) -> None:
        self(self.done + n)

    def track(self, iterable: Iterable, total: int | None = None) -> Iterator:
        """Yield from iterable, counting each item once done (like tqdm(iterable))."""
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = total if total is not None else self.total
        for item in iterable:
            yield item
            self.update()


class LabWidget(anywidget.AnyWidget):
    """An anywidget with sdlab's shared state: busy/progress/message, the request throttle, browser events
    and a static copy for exported notebooks. Subclasses set _esm = esm("their.js"), _css = css("their.css")."""

    # -- a long kernel job (working()) -----------------------------------------------------------------
    busy = traitlets.Bool(False).tag(sync=True)
    progress = traitlets.Float(0.0).tag(sync=True)  # 0..1
    progress_text = traitlets.Unicode("").tag(sync=True)  # "step 3 / 20"
    # -- what went wrong ----------------------------------------------------------------------------------
    message = traitlets.Unicode("").tag(sync=True)  # why the last request or job failed ("" when it did not)
    message_level = traitlets.Unicode("error").tag(sync=True)  # "info" | "warning" | "error"
    # -- the request throttle: the browser numbers its requests and keeps one in flight; the kernel echoes
    # the number it has answered, so a dragged slider sends its latest position, never a queue of stale ones.
    request = traitlets.Int(0).tag(sync=True)
    answered_request = traitlets.Int(0).tag(sync=True)

    #: traits whose change (from the browser, with a request number, or from Python) asks for new output
    requested_traits: tuple[str, ...] = ()

    #: the static copy's figure class and note (static_picture() draws it)
    static_css_class = "sdlab-widget-static"
    static_note = "Static copy of an sdlab widget: run the notebook in JupyterLab to use it."

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._answered_state = None  # requested_state() of the output on display
        self._quiet = 0  # > 0: inside quietly(), requested traits move without new output
        self._event_handlers: dict[str, tuple[Callable, str, bool]] = {}
        self.on_msg(self._on_browser_message)
        # Registered here, after the subclass's own @observe handlers: those run first on the same change.
        self.observe(self._on_requested, names=[*self.requested_traits, "request"])

    # -- messages ----------------------------------------------------------------------------------------

    def show_message(self, text: str, level: str = "error") -> None:
        with self.hold_sync():
            self.message, self.message_level = text, level

    def show_error(self, error: BaseException, prefix: str = "") -> None:
        self.show_message(f"{prefix}{': ' if prefix else ''}{type(error).__name__}: {error}", "error")

    # -- long kernel jobs --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def working(self, text: str = "starting…", *, failure: str = "", unit: str = "step") -> Iterator[Progress]:
        """Busy while the block runs (the browser disables the controls and shows a progress bar).

        Yields a Progress: `progress(done, total)`, `progress.update()`, `progress.track(iterable)`.
        busy and progress are cleared however the block ends; an exception is shown in message (after
        `failure`, e.g. "generation failed") and raised again.
        """
        with self.hold_sync():
            self.busy, self.progress, self.progress_text = True, 0.0, text
            self.show_message("")
        try:
            yield Progress(self, unit=unit)
        except Exception as error:
            self.show_error(error, failure)
            raise
        finally:
            with self.hold_sync():
                self.busy, self.progress, self.progress_text = False, 0.0, ""

    # -- browser events ----------------------------------------------------------------------------------

    def on_event(
        self, name: str, handler: Callable[[dict], object], *, failure: str = "", while_busy: bool = False
    ) -> None:
        """Call handler(content) when the browser sends {event: name, ...}.

        Ignored while busy unless while_busy (a second click cannot queue a second job). An error is shown
        in message (after `failure`), not raised: the browser's send() has no one to raise it to.
        """
        self._event_handlers[name] = (handler, failure, while_busy)

    def _on_browser_message(self, widget, content, buffers) -> None:
        handler, failure, while_busy = self._event_handlers.get(content.get("event"), (None, "", False))
        if handler is None or (self.busy and not while_busy):
            return
        try:
            handler(content)
        except Exception as error:
            self.show_error(error, failure)

    # -- answering requests (the kernel half of the throttle) -------------------------------------------

    def requested_state(self):
        """What answer_request() would draw, hashable; None: nothing to draw yet. Default: the requested traits."""
        return tuple(getattr(self, name) for name in self.requested_traits)

    def answer_request(self) -> None:
        """Compute and set the output for the current values of the requested traits (subclasses)."""

    def refresh(self, force: bool = False) -> None:
        """Answer the current state unless its answer is on display already.

        Latest wins: a browser message that changes several traits calls the observers once per trait, all
        after every value is set, so the first call computes from the final values and the others find it
        done. Output and a cleared message go in one update; a failure is shown in message, not raised.
        """
        state = self.requested_state()
        if self._quiet or state is None or (state == self._answered_state and not force):
            return
        try:
            with self.hold_sync():
                self.answer_request()
                self.show_message("")
        except Unanswerable as refusal:
            self.show_message(str(refusal))
            return
        except Exception as error:  # a word the tokenizer cannot place, an unknown layer...: say so
            self.show_error(error)
            return
        self._answered_state = state

    @contextlib.contextmanager
    def quietly(self) -> Iterator[None]:
        """Requested traits may move inside the block without new output (e.g. while a new run is set up)."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def _on_requested(self, change) -> None:
        self.refresh()
        # After the answer (it went out first): the browser may now send its next request.
        self.answered_request = self.request

    # -- static copy for exported notebooks --------------------------------------------------------------

    def static_picture(self) -> Image.Image | None:
        """The still picture an exported notebook shows (subclasses); None: no static copy."""
        return None

    def static_caption(self) -> str:
        return ""

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        picture = self.static_picture() if bundle is not None else None
        if picture is None:
            return bundle
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
        figure = static_figure(picture, self.static_caption(), note=self.static_note, css_class=self.static_css_class)
        return {**data, "text/html": figure}, metadata


# -- pictures and progress shared by the technique widgets -------------------------------------------------


@contextlib.contextmanager
def progress_bars_off(pipe):
    """The pipeline's own tqdm bars off while a widget runs it (the widget's bar replaces them), then as they were."""
    saved = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(**{**saved, "disable": True})
    try:
        yield
    finally:
        pipe.set_progress_bar_config(**saved)


def label_font(size: int):
    """matplotlib's DejaVu Sans (PIL's default font has no "−", "→" or "“”"), else PIL's default."""
    from matplotlib import font_manager
    from PIL import ImageFont

    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except OSError:
        return ImageFont.load_default()


def coloured(heat: np.ndarray, table: np.ndarray) -> Image.Image:
    """uint8 heat indices through a colormap table (256, 3) -> an RGB image."""
    return Image.fromarray(np.clip(table[heat] + 0.5, 0, 255).astype(np.uint8))


def labelled_strip(tiles: list[tuple[str, Image.Image]], width: int, height: int) -> Image.Image:
    """Tiles side by side, each resized (nearest) to width x height under its label, shortened to fit."""
    from PIL import ImageDraw

    gap, band = 6, 15
    picture = Image.new("RGB", (len(tiles) * (width + gap) - gap, height + band), (255, 255, 255))
    draw, font = ImageDraw.Draw(picture), label_font(11)
    for index, (label, tile) in enumerate(tiles):
        x = index * (width + gap)
        picture.paste(tile.resize((width, height), Image.NEAREST), (x, band))
        while len(label) > 4 and draw.textlength(label, font=font) > width:
            label = label[:-2] + "…"
        draw.text((x, 1), label, fill=(60, 60, 60), font=font)
    return picture
