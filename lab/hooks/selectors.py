"""Selectors: which sites a capture or an edit applies to, parsed once into an object.

    Selector.parse("up_blocks.1.attentions.0.transformer_blocks.0.attn2")   # an exact name
    Selector.parse("up_blocks.*.attn2")          # a glob
    Selector.parse("re:attn2$")                  # a regex (searched in names); a compiled re.Pattern too
    Selector.parse(lambda site: site.level == 1) # a predicate on Site
    Selector.parse("cross up 16x16")             # shorthand words that all must hold
    Selector.parse(["mid_block", "up 8x8"])      # any of several

Selectors compose without touching strings: `parse("up") & kind("cross")` is "the cross-attention part of
this selection", `a | b` either. `resolve(sites, latent_size)` gives the matching sites in site order and
raises a ValueError that says what exists when nothing matches. A selector naming a resolution ("16x16")
needs the run's latent size; `needs_latent_size` says so, and before the run such words match anything.
The "unet" site (the UNet call) is picked by its exact name only. The "merge" sites (decoder resnets, where
a skip connection joins the backbone) are picked by their exact name, kind("merge"), the shorthand word
"merge", or a glob/regex that mentions "resnets" (and, inside `kind("merge") & other`, filtered by the
other part); no other selector reaches them, so selections written before merge sites existed pick what
they always picked.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Callable

from lab.hooks.sites import Site

SHORTHAND_WORDS = ("attention", "cross", "self", "blocks", "merge", "down", "mid", "up")
_RESOLUTION_WORD = re.compile(r"^(\d+)x(\d+)$")
_LEVEL_WORD = re.compile(r"^level(\d+)$")
SELECTOR_HELP = (
    "A selector is a site name, a glob ('up_blocks.*.attn2'), 're:<regex>' or a compiled regex "
    "(searched in names), a list of selectors, a predicate on Site, or shorthand words that all must "
    "hold: cross, self, attention, blocks, merge, down, mid, up, levelN, HxW (query size in this run, e.g. "
    "'cross up 16x16'; shorthands pick attention sites unless 'blocks' or 'merge' is one of the words). "
    "'unet' (the UNet call) is picked by its exact name only; merge sites (decoder resnets where a skip "
    "joins the backbone: 'up_blocks.1.resnets.0', tensors 'backbone' and 'skip') by their name, "
    "lab.hooks.kind('merge'), the word 'merge' ('up merge', 'merge 16x16') or a glob/regex that mentions "
    "'resnets' ('up_blocks.*.resnets.*'). lab.sites(pipe) lists every site."
)


def is_shorthand(selector) -> bool:
    """True when `selector` is a string of shorthand words only ("cross up 16x16")."""
    words = selector.split() if isinstance(selector, str) else []
    return bool(words) and all(w in SHORTHAND_WORDS or _RESOLUTION_WORD.match(w) or _LEVEL_WORD.match(w) for w in words)


class Selector:
    """A parsed selector. Subclasses say what matches; `resolve` is shared.

    `reaches_merge`: whether the selector may pick merge sites at all (see the module docstring);
    the others never see them, so what they picked before merge sites existed is unchanged. Inside
    `a & b`, a part that reaches them lets the other parts filter them: kind("merge") & predicate.
    """

    needs_latent_size = False
    reaches_merge = False

    @staticmethod
    def parse(spec) -> "Selector":
        """The selector object for any accepted form (a Selector is returned as it is)."""
        if isinstance(spec, Selector):
            return spec
        if isinstance(spec, Site):
            return Name(spec.name)
        if isinstance(spec, (list, tuple, set, frozenset)):
            if not spec:
                raise ValueError("empty list of sites")
            return AnyOf([Selector.parse(part) for part in spec])
        if isinstance(spec, re.Pattern):
            return Regex(spec)
        if callable(spec):
            return Predicate(spec)
        if not isinstance(spec, str):
            raise TypeError(f"cannot select sites with a {type(spec).__name__}. {SELECTOR_HELP}")
        if spec.startswith("re:"):
            return Regex(re.compile(spec[3:]))
        if is_shorthand(spec):
            return Shorthand(spec.split())
        if any(char in spec for char in "*?["):
            return Glob(spec)
        return Name(spec)

    def matches(self, site: Site, latent_size) -> bool:
        raise NotImplementedError

    def pool(self, all_sites: list[Site], merge: bool | None = None) -> list[Site]:
        """The sites this selector may pick: not the UNet call (only its exact name picks it), nor merge
        sites unless it reaches them (or `merge` says so: the other part of an `&` reaches them)."""
        merge = self.reaches_merge or bool(merge)
        return [site for site in all_sites if site.kind != "unet" and (merge or site.kind != "merge")]

    def resolve(
        self, all_sites: list[Site], latent_size: tuple[int, int] | None = None, *, merge: bool | None = None
    ) -> list[Site]:
        """The matching sites, in site order. Raises ValueError if none matches."""
        pool = self.pool(all_sites, merge)
        matched = [site for site in pool if self.matches(site, latent_size)]
        if not matched:
            raise ValueError(f"{self!r} matches no site{self._sizes_hint(pool, latent_size)}. {SELECTOR_HELP}")
        return matched

    def _sizes_hint(self, pool, latent_size) -> str:
        if not (self.needs_latent_size and latent_size is not None):
            return ""
        sizes = sorted({"%dx%d" % s.spatial_size(latent_size) for s in pool if s.is_attention})
        return f" (latent {latent_size[0]}x{latent_size[1]}: attention sites have queries of {', '.join(sizes)})"

    def __and__(self, other) -> "Selector":
        return AllOf([self, Selector.parse(other)])

    def __or__(self, other) -> "Selector":
        return AnyOf([self, Selector.parse(other)])


class Name(Selector):
    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return repr(self.name)

    def matches(self, site, latent_size) -> bool:
        return site.name == self.name

    def resolve(self, all_sites, latent_size=None, *, merge=None):
        matched = [site for site in all_sites if site.name == self.name]  # "unet" and merge sites included
        if not matched:
            names = [site.name for site in all_sites]
            close = difflib.get_close_matches(self.name, names + list(SHORTHAND_WORDS), n=4, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown site {self.name!r}.{hint} {SELECTOR_HELP}")
        return matched


class Glob(Selector):
    def __init__(self, pattern: str):
        self.pattern = pattern
        self.reaches_merge = "resnets" in pattern

    def __repr__(self):
        return f"glob {self.pattern!r}"

    def matches(self, site, latent_size) -> bool:
        return fnmatch.fnmatchcase(site.name, self.pattern)


class Regex(Selector):
    def __init__(self, pattern: re.Pattern):
        self.pattern = pattern
        self.reaches_merge = "resnets" in pattern.pattern

    def __repr__(self):
        return f"regex {self.pattern.pattern!r}"

    def matches(self, site, latent_size) -> bool:
        return bool(self.pattern.search(site.name))


class Predicate(Selector):
    def __init__(self, function: Callable[[Site], bool]):
        self.function = function

    def __repr__(self):
        return f"predicate {getattr(self.function, '__name__', self.function)!r}"

    def matches(self, site, latent_size) -> bool:
        return bool(self.function(site))


class Shorthand(Selector):
    """Words that all must hold. They pick attention sites; with 'blocks', block sites; with 'merge', merge sites."""

    def __init__(self, words: list[str]):
        self.words = list(words)
        self.needs_latent_size = any(_RESOLUTION_WORD.match(word) for word in self.words)
        self.reaches_merge = "merge" in self.words
        if {"blocks", "merge"} <= set(self.words):
            raise ValueError(
                f"shorthand {' '.join(self.words)!r}: 'blocks' and 'merge' pick different sites; "
                "give a list to have both, e.g. ['blocks up', 'merge up']"
            )

    def __repr__(self):
        return f"shorthand {' '.join(self.words)!r}"

    def matches(self, site, latent_size) -> bool:
        if ("blocks" in self.words) != (site.kind == "block") or ("merge" in self.words) != (site.kind == "merge"):
            return False
        for word in self.words:
            if word in ("cross", "self") and site.kind != word:
                return False
            if word in ("down", "mid", "up") and site.place != word:
                return False
            level = _LEVEL_WORD.match(word)
            if level and site.level != int(level.group(1)):
                return False
            resolution = _RESOLUTION_WORD.match(word)
            # Without a latent size (checking a selector before the run) a resolution matches anything.
            if resolution and latent_size is not None:
                if site.spatial_size(latent_size) != (int(resolution.group(1)), int(resolution.group(2))):
                    return False
        return True


class AnyOf(Selector):
    """Sites picked by any of the parts; every part must pick something (a typo is not silently ignored)."""

    def __init__(self, parts: list[Selector]):
        self.parts = parts
        self.needs_latent_size = any(part.needs_latent_size for part in parts)
        self.reaches_merge = any(part.reaches_merge for part in parts)

    def __repr__(self):
        return "[" + ", ".join(map(repr, self.parts)) + "]"

    def matches(self, site, latent_size) -> bool:
        return any(part.matches(site, latent_size) for part in self.parts)

    def resolve(self, all_sites, latent_size=None, *, merge=None):
        chosen = {site.name for part in self.parts for site in part.resolve(all_sites, latent_size, merge=merge)}
        return [site for site in all_sites if site.name in chosen]


class AllOf(Selector):
    """Sites picked by every part, e.g. `parse(user_choice) & kind("cross")`."""

    def __init__(self, parts: list[Selector]):
        self.parts = parts
        self.needs_latent_size = any(part.needs_latent_size for part in parts)
        self.reaches_merge = any(part.reaches_merge for part in parts)

    def __repr__(self):
        return " and ".join(map(repr, self.parts))

    def matches(self, site, latent_size) -> bool:
        return all(part.matches(site, latent_size) for part in self.parts)

    def resolve(self, all_sites, latent_size=None, *, merge=None):
        chosen = None
        merge = self.reaches_merge or merge  # a part that reaches merge sites lets the others filter them
        for part in self.parts:
            names = {site.name for site in part.resolve(all_sites, latent_size, merge=merge)}
            chosen = names if chosen is None else chosen & names
        matched = [site for site in all_sites if site.name in chosen]
        if not matched:
            raise ValueError(f"{self!r} matches no site{self._sizes_hint(all_sites, latent_size)}. {SELECTOR_HELP}")
        return matched


class Kind(Selector):
    """Sites of one kind: "self", "cross", "block", "merge" (or "attention" for both attention kinds)."""

    def __init__(self, kind: str):
        if kind not in ("self", "cross", "block", "merge", "attention"):
            raise ValueError(f"kind must be 'self', 'cross', 'block', 'merge' or 'attention', got {kind!r}")
        self.kind = kind
        self.reaches_merge = kind == "merge"

    def __repr__(self):
        return f"kind {self.kind!r}"

    def matches(self, site, latent_size) -> bool:
        return site.is_attention if self.kind == "attention" else site.kind == self.kind


def kind(name: str) -> Selector:
    """The selector of every site of one kind, to compose: `Selector.parse(choice) & kind("cross")`."""
    return Kind(name)


def select_sites(model_or_sites, selector, latent_size: tuple[int, int] | None = None) -> list[Site]:
    """The sites that `selector` picks (see SELECTOR_HELP), in order. Resolutions need `latent_size`.

    `model_or_sites` is a pipeline or a UNet (its sites, "unet" included), or a list of `Site`
    records, which need no module: e.g. the sites a saved run recorded, long after the model is gone.
    """
    from lab.hooks.sites import sites

    parsed = Selector.parse(selector)
    if latent_size is None and parsed.needs_latent_size:
        raise ValueError(f"selector {selector!r} names a resolution: pass latent_size=(height, width)")
    if isinstance(model_or_sites, (list, tuple)) and all(isinstance(site, Site) for site in model_or_sites):
        return parsed.resolve(list(model_or_sites), latent_size)
    return parsed.resolve(sites(model_or_sites, unet=True), latent_size)
