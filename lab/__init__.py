"""sdlab: look inside Stable Diffusion and edit what it does."""

from lab import hooks, tokens
from lab.hooks import (
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
from lab.tokens import prompt_tokens, token_indices
from lab.pipelines import load_pipeline
from lab import daam
from lab.daam import AttributionRun, HeatMap, OptimizedToken


def __getattr__(name: str):
    # `lab.testing` builds pipelines, which imports all of diffusers' and transformers' pipeline code
    # (seconds, plus transformers' torchvision notices): loaded on first use, not on `import lab`.
    if name == "testing":
        import importlib

        return importlib.import_module("lab.testing")
    raise AttributeError(f"module 'lab' has no attribute {name!r}")
