"""sdlab: look inside Stable Diffusion and edit what it does.

    import lab
    pipe = lab.load_pipeline()                       # the embedded TinyWorld model, or any SD 1.x / 2.x / XL
    with lab.trace(pipe) as tr:
        maps = tr.capture("cross", "probs", reduce=lab.Mean(over=("steps", "heads")))
        pipe("a red circle left of a blue square")

`lab.__all__` lists the verbs users call and the reducers they pass; the library's types (Site,
StepContext, Capture, Selector, Result, ...) live in their modules: lab.hooks, lab.results, ...
The core every technique stands on: lab.hooks (sites, selectors, named batch rows, captures and
edits), lab.diffusion (schedules, DDIM steps, guidance, VAE and prompt encoding), lab.weights
(weight edits that are always undone), lab.results (one result shape, saved as safetensors + JSON).
"""

__version__ = "0.1.0"

from lab import (
    daam,
    diffusion,
    dift,
    esd,
    heatmap,
    hooks,
    inversion,
    ovam,
    p2p,
    results,
    sliders,
    tokens,
    uce,
    uce_debias,
    weights,
)

# The types imported below outside __all__ (Capture, Site, AttributionRun, ...) have been reachable as
# lab.<Name> since before __all__ existed; their home is the module they come from.
from lab.attend_excite import attend_and_excite
from lab.daam import AttributionRun, HeatMap, OptimizedToken  # noqa: F401
from lab.freeu import FREEU_PRESETS, freeu
from lab.hooks import (  # noqa: F401
    Capture,
    CaptureTooLarge,
    Edit,
    ExplicitAttnProcessor,
    Mean,
    MemoryEstimate,
    Site,
    Stack,
    StepContext,
    Sum,
    TopK,
    Trace,
    active_hooks,
    remove_all_hooks,
    scale_tokens,
    select_sites,
    sites,
    trace,
)
from lab.p2p import prompt_to_prompt
from lab.pag import pag
from lab.pipelines import load_pipeline
from lab.sag import sag
from lab.tokens import prompt_tokens, token_indices

__all__ = [
    # verbs
    "load_pipeline",
    "trace",
    "sites",
    "select_sites",
    "scale_tokens",
    "prompt_tokens",
    "token_indices",
    "active_hooks",
    "remove_all_hooks",
    "attend_and_excite",
    "prompt_to_prompt",
    "sag",
    "pag",
    "freeu",
    "FREEU_PRESETS",
    # reducers, passed to Trace.capture
    "Mean",
    "Sum",
    "Stack",
    "TopK",
    # modules
    "hooks",
    "tokens",
    "daam",
    "dift",
    "ovam",
    "heatmap",
    "results",
    "diffusion",
    "weights",
    "inversion",
    "p2p",
    "uce",
    "uce_debias",
    "esd",
    "sliders",
]

_LAZY_MODULES = ("testing",)


def __getattr__(name: str):
    # `lab.testing` builds pipelines, which imports all of diffusers' and transformers' pipeline code
    # (seconds, plus transformers' torchvision notices): loaded on first use, not on `import lab`.
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f"lab.{name}")
    raise AttributeError(f"module 'lab' has no attribute {name!r}")
