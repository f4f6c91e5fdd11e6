"""Jupyter widgets of sdlab. The front ends are plain JavaScript files in widgets/static, shipped with the package.

    import widgets
    widgets.AttributionExplorer()        # embedded TinyWorld model, a default prompt: DAAM heat maps to explore
    widgets.CorrespondenceExplorer()     # embedded model, four TinyWorld stars: click a point, see DIFT's matches
    widgets.GuidanceExplorer()           # embedded model: plain vs guided for A&E, SAG, PAG, FreeU, and what each reads
    widgets.EditingExplorer()            # a TinyWorld render inverted (DDIM, null-text, ...), edited by Prompt-to-Prompt
    widgets.ErasingExplorer()            # a concept erased (UCE, ESD-x, ESD-u): held-out prompts before and after; a slider

What they share (busy/progress/message, the request throttle, encoders, static copies, the JS helpers of
static/base.js) is widgets.base.LabWidget: see docs/jupyter.md, "writing a widget".
"""

from widgets.attribution import AttributionExplorer
from widgets.correspondence import CorrespondenceExplorer
from widgets.editing import EditingExplorer
from widgets.erasing import ErasingExplorer
from widgets.guidance import GuidanceExplorer

__all__ = ["AttributionExplorer", "CorrespondenceExplorer", "EditingExplorer", "ErasingExplorer", "GuidanceExplorer"]
