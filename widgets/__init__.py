"""Jupyter widgets of sdlab. The front ends are plain JavaScript files in widgets/static, shipped with the package.

    import widgets
    widgets.AttributionExplorer()        # embedded TinyWorld model, a default prompt: DAAM heat maps to explore

What they share (busy/progress/message, the request throttle, encoders, static copies, the JS helpers of
static/base.js) is widgets.base.LabWidget: see docs/jupyter.md, "writing a widget".
"""

from widgets.attribution import AttributionExplorer

__all__ = ["AttributionExplorer"]
