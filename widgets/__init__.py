"""Jupyter widgets of sdlab. The front ends are plain JavaScript files in widgets/static, shipped with the package.

    import widgets
    widgets.AttributionExplorer()        # embedded TinyWorld model, a default prompt: DAAM heat maps to explore
"""

from widgets.attribution import AttributionExplorer

__all__ = ["AttributionExplorer"]
