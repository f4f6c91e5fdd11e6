"""TinyWorld: a procedural world of coloured shapes whose every image comes with ground truth.

A scene is 1-3 objects on a background. Each object has a shape class, a colour, a
continuous size (with a small/large label), a texture and a position; the renderer
returns the RGB image together with one mask per object and semantic keypoints per
shape class (the same keypoint ids on every instance of a class, e.g. a star's tips).
Everything is deterministic from a seed.

Rendering is 4x supersampled polygon filling, so edges are anti-aliased the way a
photograph's would be, and a mask is "at least half of the pixel is covered".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
from skimage.draw import polygon as fill_polygon

IMAGE_SIZE = 64
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLORS = {  # saturated, well separated in RGB, and far from every background
    "red": (215, 35, 35),
    "orange": (245, 135, 15),
    "yellow": (240, 215, 20),
    "green": (30, 160, 50),
    "blue": (35, 75, 215),
    "purple": (130, 50, 185),
    "pink": (245, 105, 190),
    "brown": (125, 75, 35),
}
TEXTURE_INK = (20, 20, 20)  # stripes and dots are drawn in near-black on top of the colour
TEXTURES = ("plain", "striped", "dotted")
BACKGROUNDS = ("plain", "sky", "grass")
SIZES = ("small", "large")
SIZE_RANGES = {"small": (13.0, 18.0), "large": (23.0, 30.0)}  # object extent in pixels
RELATIONS = ("left of", "right of", "above", "below")

# Semantic keypoints of each class, in the shape's unit frame (x right, y down, extent [-1, 1]).
KEYPOINT_NAMES = {
    "circle": ("center", "top", "right", "bottom", "left"),
    "square": ("center", "top_left", "top_right", "bottom_right", "bottom_left"),
    "triangle": ("center", "apex", "bottom_right", "bottom_left"),
    "star": ("center", "tip_top", "tip_upper_right", "tip_lower_right", "tip_lower_left", "tip_upper_left"),
    "heart": ("center", "left_lobe", "notch", "right_lobe", "bottom_tip"),
    "cross": ("center", "arm_top", "arm_right", "arm_bottom", "arm_left"),
}


@dataclass
class WorldObject:
    shape: str
    color: str
    size: float  # extent in pixels (width of the bounding box of the unit shape)
    texture: str
    cx: float  # centre in pixel coordinates (x right, y down)
    cy: float

    @property
    def size_label(self) -> str:
        return "small" if self.size < (SIZE_RANGES["small"][1] + SIZE_RANGES["large"][0]) / 2 else "large"


@dataclass
class Scene:
    objects: list[WorldObject]
    background: str
    relation: str | None = None  # relation of objects[0] to objects[1], when the scene is about one
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(
            objects=[WorldObject(**o) for o in d["objects"]],
            background=d["background"],
            relation=d.get("relation"),
            seed=d.get("seed", 0),
        )


@dataclass
class Rendered:
    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (n_objects, H, W) bool
    keypoints: list[dict[str, tuple[float, float]]] = field(default_factory=list)  # per object: name -> (x, y)


# ----------------------------------------------------------------------------- shapes


def unit_outline(shape: str) -> np.ndarray:
    """Polygon (N, 2) of the shape in its unit frame, extent [-1, 1] on both axes."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.9
    if shape == "triangle":
        return np.array([[0, -1], [1, 0.8], [-1, 0.8]], float)
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.55)  # fat enough to keep its tips at 13 px
        pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
        return pts + np.array([0, 0.1])  # the star's tips reach -1 at the top, ~0.8 at the bottom
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x / 17.0, (y + 2.5) / 15.5], 1)
        return pts
    if shape == "cross":
        a, w = 1.0, 0.34
        return np.array(
            [
                [-w, -a],
                [w, -a],
                [w, -w],
                [a, -w],
                [a, w],
                [w, w],
                [w, a],
                [-w, a],
                [-w, w],
                [-a, w],
                [-a, -w],
                [-w, -w],
            ],
            float,
        )
    raise ValueError(f"unknown shape {shape!r}; TinyWorld shapes are {SHAPES}")


def unit_keypoints(shape: str) -> dict[str, tuple[float, float]]:
    if shape == "circle":
        pts = [(0, 0), (0, -1), (1, 0), (0, 1), (-1, 0)]
    elif shape == "square":
        pts = [(0, 0), (-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)]
    elif shape == "triangle":
        pts = [(0, 0.2), (0, -1), (1, 0.8), (-1, 0.8)]
    elif shape == "star":
        tips = [
            (math.cos(-math.pi / 2 + k * 2 * math.pi / 5), math.sin(-math.pi / 2 + k * 2 * math.pi / 5) + 0.1)
            for k in range(5)
        ]
        pts = [(0, 0.1)] + tips
    elif shape == "heart":
        pts = [(0, 0.05), (-0.5, -0.55), (0, -0.35), (0.5, -0.55), (0, 1.0)]
    elif shape == "cross":
        pts = [(0, 0), (0, -1), (1, 0), (0, 1), (-1, 0)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return dict(zip(KEYPOINT_NAMES[shape], [(float(x), float(y)) for x, y in pts]))


def _to_pixels(obj: WorldObject, pts: np.ndarray) -> np.ndarray:
    return np.asarray(pts, float) * (obj.size / 2.0) + np.array([obj.cx, obj.cy])


# ----------------------------------------------------------------------------- rendering


def background_image(name: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """Float (H, W, 3) background in [0, 255]. Pale and unsaturated so objects stand out."""
    y = np.linspace(0, 1, size)[:, None, None]
    if name == "plain":
        top = bottom = np.array([238, 236, 230], float)
    elif name == "sky":
        top, bottom = np.array([165, 205, 245], float), np.array([220, 236, 250], float)
    elif name == "grass":
        top, bottom = np.array([205, 232, 180], float), np.array([170, 215, 150], float)
    else:
        raise ValueError(f"unknown background {name!r}; TinyWorld backgrounds are {BACKGROUNDS}")
    return np.broadcast_to(top * (1 - y) + bottom * y, (size, size, 3)).copy()


def _window(obj: WorldObject, size: int) -> tuple[int, int, int, int]:
    """Pixel window (y0, y1, x0, x1) that holds the object: all per-object work is done inside it."""
    r = obj.size / 2 + 2
    x0, x1 = max(0, int(obj.cx - r)), min(size, int(math.ceil(obj.cx + r)))
    y0, y1 = max(0, int(obj.cy - r)), min(size, int(math.ceil(obj.cy + r)))
    return y0, y1, x0, x1


def _coverage(poly_px: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
    """Fraction of each pixel of the window covered by the polygon (supersampled)."""
    y0, y1, x0, x1 = window
    h, w = (y1 - y0) * SUPERSAMPLE, (x1 - x0) * SUPERSAMPLE
    rr, cc = fill_polygon((poly_px[:, 1] - y0) * SUPERSAMPLE, (poly_px[:, 0] - x0) * SUPERSAMPLE, shape=(h, w))
    canvas = np.zeros((h, w), np.float32)
    canvas[rr, cc] = 1.0
    return canvas.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))


def _texture_ink(obj: WorldObject, window: tuple[int, int, int, int]) -> np.ndarray:
    """Fraction of each pixel of the window covered by texture ink (stripes or dots), in the object's frame."""
    y0, y1, x0, x1 = window
    if obj.texture == "plain":
        return np.zeros((y1 - y0, x1 - x0), np.float32)
    ys = y0 + (np.arange((y1 - y0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE - obj.cy
    xs = x0 + (np.arange((x1 - x0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE - obj.cx
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    if obj.texture == "striped":  # diagonal stripes, period 5 px, 40% ink
        phase = ((xx + yy) / (5.0 * math.sqrt(2))) % 1.0
        ink = (phase < 0.4).astype(np.float32)
    elif obj.texture == "dotted":  # square grid of round dots, period 5 px
        dx = (xx % 5.0) - 2.5
        dy = (yy % 5.0) - 2.5
        ink = (dx * dx + dy * dy < 1.5**2).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {obj.texture!r}; TinyWorld textures are {TEXTURES}")
    return ink.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, size: int = IMAGE_SIZE) -> Rendered:
    image = background_image(scene.background, size)
    masks, keypoints = [], []
    for obj in scene.objects:
        win = _window(obj, size)
        y0, y1, x0, x1 = win
        cover = np.zeros((size, size), np.float32)
        cover[y0:y1, x0:x1] = _coverage(_to_pixels(obj, unit_outline(obj.shape)), win)
        ink = np.zeros((size, size, 1), np.float32)
        ink[y0:y1, x0:x1, 0] = _texture_ink(obj, win)
        fill = np.array(COLORS[obj.color], float) * (1 - ink) + np.array(TEXTURE_INK, float) * ink
        image = image * (1 - cover[..., None]) + fill * cover[..., None]
        masks.append(cover >= 0.5)
        keypoints.append({k: tuple(_to_pixels(obj, np.array(v))) for k, v in unit_keypoints(obj.shape).items()})
    img = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return Rendered(img, np.array(masks, bool).reshape(len(masks), size, size), keypoints)


# ----------------------------------------------------------------------------- sampling scenes


def _sample_object(rng: np.random.Generator, shape=None, color=None, size_label=None, texture=None) -> WorldObject:
    size_label = size_label or SIZES[rng.integers(len(SIZES))]
    lo, hi = SIZE_RANGES[size_label]
    return WorldObject(
        shape=shape or SHAPES[rng.integers(len(SHAPES))],
        color=color or list(COLORS)[rng.integers(len(COLORS))],
        size=float(rng.uniform(lo, hi)),
        texture=texture or TEXTURES[rng.choice(len(TEXTURES), p=[0.5, 0.25, 0.25])],
        cx=0.0,
        cy=0.0,
    )


def _fits(obj: WorldObject, size: int) -> bool:
    r = obj.size / 2
    return r + 1 <= obj.cx <= size - r - 1 and r + 1 <= obj.cy <= size - r - 1


def _apart(a: WorldObject, b: WorldObject, gap: float = 3.0) -> bool:
    # Bounding boxes separated by a gap: objects never touch, so each is one region.
    return (abs(a.cx - b.cx) >= (a.size + b.size) / 2 + gap) or (abs(a.cy - b.cy) >= (a.size + b.size) / 2 + gap)


def _place_pair(rng: np.random.Generator, a: WorldObject, b: WorldObject, relation: str, size: int) -> None:
    """Put `a` in `relation` to `b`, side by side (or one over the other) around the middle of the image.

    A relation then fixes the layout, as "a circle left of a square" does in a drawing. With both objects
    anywhere (the first version of the world) the relation word changed so little of what a model has to
    predict from pure noise that the embedded model never learnt it (see the data card)."""
    along = 0 if relation in ("left of", "right of") else 1  # 0: x, 1: y
    sign = -1.0 if relation in ("left of", "above") else 1.0  # where `a` sits relative to `b` on that axis
    distance = (a.size + b.size) / 2 + rng.uniform(4, 10)
    middle = size / 2 + rng.uniform(-5, 5)
    across = size / 2 + rng.uniform(-8, 8)
    for obj, side in ((a, sign), (b, -sign)):
        r = obj.size / 2
        position = [0.0, 0.0]
        position[along] = middle + side * distance / 2
        position[1 - along] = across + rng.uniform(-3, 3)
        obj.cx, obj.cy = (float(np.clip(v, r + 1, size - r - 1)) for v in position)


OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def mirror_scene(scene: Scene, size: int = IMAGE_SIZE) -> Scene:
    """The same two objects with their places mirrored along the relation's axis, and the opposite relation.

    Training on a scene and its mirror twin gives the model pairs of captions that differ only in the
    relation word ("left of" / "right of") over images that differ only in which side each object is on:
    the one cue for the direction. Shapes stay upright (only centres move), so no upside-down hearts."""
    if scene.relation is None:
        raise ValueError("mirror_scene needs a two-object scene with a relation")
    along = "cx" if scene.relation in ("left of", "right of") else "cy"
    objects = [dataclasses.replace(o, **{along: size - getattr(o, along)}) for o in scene.objects]
    return Scene(objects, scene.background, OPPOSITE_RELATION[scene.relation], scene.seed)


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Does object at centre a stand in `relation` to object at centre b? Dominant-axis rule."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if relation in ("left of", "right of"):
        return abs(dx) > abs(dy) and (dx < 0) == (relation == "left of")
    if relation in ("above", "below"):
        return abs(dy) > abs(dx) and (dy < 0) == (relation == "above")
    raise ValueError(f"unknown relation {relation!r}; TinyWorld relations are {RELATIONS}")


def sample_scene(seed: int, n_objects: int | None = None, size: int = IMAGE_SIZE, **attributes) -> Scene:
    """A random scene. `n_objects` in 1..3 (random 1:2:1-ish if None). Extra keyword arguments
    (shape, color, size_label, texture, background, relation) fix those attributes of the first object
    / the scene, which is how prompt sets with known content are built."""
    rng = np.random.default_rng(seed)
    if n_objects is None:
        n_objects = int(rng.choice([1, 2, 3], p=[0.4, 0.45, 0.15]))
    background = attributes.pop("background", None) or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    relation = attributes.pop("relation", None)
    if n_objects == 2 and relation is None:
        relation = RELATIONS[rng.integers(len(RELATIONS))]
    if n_objects != 2:
        relation = None
    first_attrs = {k: attributes.pop(k) for k in ("shape", "color", "size_label", "texture") if k in attributes}
    second_attrs = {k[len("second_") :]: attributes.pop(k) for k in list(attributes) if k.startswith("second_")}
    if attributes:
        raise TypeError(f"unknown scene attributes {sorted(attributes)}")
    for attempt in range(2000):
        objs = [_sample_object(rng, **first_attrs)] + [
            _sample_object(rng, **(second_attrs if i == 1 else {})) for i in range(1, n_objects)
        ]
        if attempt >= 100:  # crowded: shrink toward the bottom of each object's size range
            for o in objs:
                o.size = SIZE_RANGES[o.size_label][0] + (o.size - SIZE_RANGES[o.size_label][0]) * 0.5
        if n_objects > 1 and first_attrs.get("shape") is None and second_attrs.get("shape") is None:
            # Two objects of one class and colour would make the caption ambiguous.
            if objs[0].shape == objs[1].shape and objs[0].color == objs[1].color:
                continue
        # Keep three-object scenes small enough to fit.
        if n_objects == 3:
            for o in objs:
                o.size = min(o.size, 24.0)
        if relation is not None:
            _place_pair(rng, objs[0], objs[1], relation, size)
        else:
            for o in objs:
                r = o.size / 2
                o.cx = float(rng.uniform(r + 1, size - r - 1))
                o.cy = float(rng.uniform(r + 1, size - r - 1))
        if relation is not None and not relation_holds(relation, (objs[0].cx, objs[0].cy), (objs[1].cx, objs[1].cy)):
            continue
        if relation is not None:
            dx, dy = abs(objs[0].cx - objs[1].cx), abs(objs[0].cy - objs[1].cy)
            if max(dx, dy) < 1.6 * min(dx, dy) + 4:  # keep relations unambiguous (clearly one axis)
                continue
        if all(_apart(objs[i], objs[j]) for i in range(n_objects) for j in range(i + 1, n_objects)):
            return Scene(objs, background, relation, seed)
    raise RuntimeError(f"could not place {n_objects} objects for seed {seed}")


# ----------------------------------------------------------------------------- captions

_REL_PHRASES = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_BG_PHRASES = {
    "plain": ("on a plain background", "on a white background"),
    "sky": ("in the sky", "on a sky background", "against the sky"),
    "grass": ("on the grass", "on a grass background", "in a field of grass"),
}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big")}


def describe(obj: WorldObject, rng: np.random.Generator, p_size=0.6, p_texture=0.7, p_color=0.95) -> str:
    """Noun phrase for one object, attributes sometimes omitted or reordered."""
    words = []
    if rng.random() < p_size:
        opts = SIZE_WORDS[obj.size_label]
        words.append(opts[rng.integers(len(opts))])
    texture = obj.texture if (obj.texture != "plain" or rng.random() < 0.3) else None
    texture = texture if rng.random() < p_texture else None
    colour = obj.color if rng.random() < p_color else None
    middle = [w for w in (texture, colour) if w]
    if len(middle) == 2 and rng.random() < 0.3:
        middle.reverse()
    return " ".join(words + middle + [obj.shape])


def caption(scene: Scene, rng: np.random.Generator | int | None = None) -> str:
    """A natural caption for the scene, from several templates so prompts are not one fixed form."""
    rng = np.random.default_rng(scene.seed if rng is None else rng) if not isinstance(rng, np.random.Generator) else rng
    objs = scene.objects
    phrases = [describe(o, rng) for o in objs]
    if len(objs) == 1:
        forms = ["a {0}", "{0}", "a picture of a {0}", "one {0}", "an image of a {0}"]
        text = forms[rng.integers(len(forms))].format(phrases[0])
    elif len(objs) == 2:
        rel_opts = _REL_PHRASES[scene.relation]
        rel = rel_opts[rng.integers(len(rel_opts))]
        if rng.random() < 0.15:
            text = f"a {phrases[0]} and a {phrases[1]}"
        else:
            forms = ["a {0} {r} a {1}", "{0} {r} {1}", "there is a {0} {r} a {1}", "a picture of a {0} {r} a {1}"]
            text = forms[rng.integers(len(forms))].format(phrases[0], phrases[1], r=rel)
    else:
        text = f"a {phrases[0]}, a {phrases[1]} and a {phrases[2]}"
    if rng.random() < 0.35:
        bg = _BG_PHRASES[scene.background]
        text += " " + bg[rng.integers(len(bg))]
    return _fix_articles(text)


def _fix_articles(text: str) -> str:
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = "an" if words[i + 1][:1] in "aeiou" else "a"
    return " ".join(words)


def fixed_caption(scene: Scene) -> str:
    """The full, canonical caption (every attribute named): used for evaluation prompts."""

    def np_(o: WorldObject) -> str:
        tex = "" if o.texture == "plain" else o.texture + " "
        return f"{o.size_label} {tex}{o.color} {o.shape}"

    objs = scene.objects
    if len(objs) == 1:
        text = f"a {np_(objs[0])}"
    elif len(objs) == 2:
        text = f"a {np_(objs[0])} {scene.relation} a {np_(objs[1])}"
    else:
        text = ", ".join(f"a {np_(o)}" for o in objs[:-1]) + f" and a {np_(objs[-1])}"
    return _fix_articles(text)
