"""A procedural world for the miniature models: scenes, captions, edits with exact ground truth, subjects.

Scenes are a few flat-coloured objects (shape, colour, size, texture) on a grey background, each
object in its own cell of a 3x3 grid (with a small jitter), so objects never overlap and stay off the
borders, and every edit (recolour, reshape, remove, add; also move, resize) is well defined. Because the
world is procedural, the exact result of every edit is known; ``oracle.py`` scores editors against it.

Scenes are resolution free (positions and sizes are fractions of the canvas); ``render(scene, size)`` draws
one at any size, anti-aliased by ``ss x ss`` supersampling (deterministic: a box average of a finer grid).
Everything is numpy and seeded: item ``i`` of a dataset depends only on ``(seed, i)`` (and the kinds asked
for), never on how many items are drawn (same numpy version; ``Generator`` streams may change across numpy).
Images are ``uint8 [H, W, 3]``; masks are coverage ``float32 [K, H, W] in [0, 1]`` (object k's share of each pixel).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from tdae_jax.miniature import vocab

# Object colours: saturated, hues 0/57/128/186/237/295 degrees (51+ apart), chroma >= 131; textures paint the
# same hue at SHADE x brightness. Backgrounds are near-grey (chroma < 25), so hue alone names an object's pixels.
PALETTE = {"red": (220, 40, 40), "yellow": (225, 215, 30), "green": (40, 180, 60),
           "cyan": (30, 190, 210), "blue": (50, 60, 230), "purple": (185, 50, 200)}
SHADE = 0.55
WHITE = (248, 248, 248)
GRID = 3
MARGIN = 2 / 64                        # canvas border left free of grid cells
CELL = (1 - 2 * MARGIN) / GRID         # 20 px at 64x64
HALF = {"small": 0.085, "large": 0.125}  # object half-extent (5.4 px / 8 px at 64x64)
GAP = 1.5 / 64                         # least free space between two objects' bounding boxes
TEXTURE_PERIOD = 4 / 64
MAX_OBJECTS = 4                        # after an "add"; sampled scenes hold 1..3
EDIT_KINDS = ("recolour", "reshape", "remove", "add", "move", "resize")
CORE_KINDS = EDIT_KINDS[:4]
_PAIRS_STREAM, _SUBJECT_STREAM = 1, 2


def jitter_limit(size: str) -> float:
    """Largest |dx|, |dy| an object of this size may take inside its cell (keeps GAP to every neighbour)."""
    return CELL / 2 - HALF[size] - GAP / 2


def cell_center(cell: int) -> tuple[float, float]:
    row, col = divmod(int(cell), GRID)
    return MARGIN + CELL * (col + 0.5), MARGIN + CELL * (row + 0.5)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str                 # "small" | "large"
    cell: int                 # 0..8, row-major 3x3 grid
    dx: float = 0.0           # jitter from the cell centre, canvas fractions
    dy: float = 0.0
    texture: str = "plain"    # "plain" | "striped" | "dotted"

    @property
    def center(self) -> tuple[float, float]:
        x, y = cell_center(self.cell)
        return x + self.dx, y + self.dy

    @property
    def half(self) -> float:
        return HALF[self.size]


@dataclass(frozen=True)
class Background:
    kind: str                 # vocab.BACKGROUNDS
    c1: tuple                 # RGB floats 0..255
    c2: tuple
    period: float             # stripes / checks, canvas fractions
    angle: float              # degrees


@dataclass(frozen=True)
class Scene:
    background: Background
    objects: tuple            # tuple[Obj, ...]


@dataclass(frozen=True)
class Edit:
    """One edit. ``index`` is the edited object's index in ``source.objects`` (in ``target.objects`` for "add");
    other kinds keep the object at the same index in the target (it is absent from the target for "remove")."""
    kind: str
    instruction: str
    source: Scene
    target: Scene
    index: int
    caption: str
    edited_caption: str

    @property
    def before(self):
        return None if self.kind == "add" else self.source.objects[self.index]

    @property
    def after(self):
        return None if self.kind == "remove" else self.target.objects[self.index]


# ----------------------------------------------------------------------------------------- drawing
def _in_polygon(u, v, verts):
    inside = np.zeros(u.shape, bool)
    for (x1, y1), (x2, y2) in zip(verts, np.roll(verts, 1, axis=0)):
        crosses = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            xi = (x2 - x1) * (v - y1) / (y2 - y1) + x1
        inside ^= crosses & (u < xi)
    return inside


_ang = np.pi * (np.arange(10) / 5 - 0.5)   # five-pointed star, point up, centred vertically in [-1, 1]
_STAR = np.stack([np.cos(_ang), np.sin(_ang)], 1) * np.where(np.arange(10) % 2, 0.45, 1.0)[:, None] + [0, 0.0955]


def inside_shape(shape: str, u, v):
    """Shape test in the object's frame: u right, v down, both in units of the half-extent (all within [-1, 1])."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "triangle":
        return (v <= 0.8) & (1.75 * np.abs(u) <= v + 0.95)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "star":
        return _in_polygon(u, v, _STAR)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.33) & (av <= 0.95)) | ((av <= 0.33) & (au <= 0.95))
    raise ValueError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=16)
def _hi_coords(size: int, ss: int) -> np.ndarray:
    """Centres of the ``size*ss`` supersampled pixels along one axis, in canvas fractions."""
    t = (np.arange(size * ss) + 0.5) / (size * ss)
    t.setflags(write=False)
    return t


def _down(a, ss):
    h, w = a.shape[0] // ss, a.shape[1] // ss
    return a.reshape(h, ss, w, ss, *a.shape[2:]).mean(axis=(1, 3))


def _object_colour(obj: Obj):
    base = np.asarray(PALETTE[obj.colour], np.float64)

    def fn(u, v, xs, ys):
        if obj.texture == "striped":
            on = np.mod((xs + ys) / (np.sqrt(2) * TEXTURE_PERIOD), 1.0) < 0.5
        elif obj.texture == "dotted":
            gx, gy = np.mod(xs / TEXTURE_PERIOD, 1.0) - 0.5, np.mod(ys / TEXTURE_PERIOD, 1.0) - 0.5
            on = gx * gx + gy * gy < 0.3 ** 2
        else:
            on = np.zeros(u.shape, bool)
        return np.where(on[..., None], SHADE * base, base)
    return fn


def _bg_weight(bg: Background, xs, ys):
    """Weight of ``c2`` in the background at points ``xs [1,w]``, ``ys [h,1]``; None for a plain background."""
    if bg.kind == "plain":
        return None
    if bg.kind == "checkered":
        return np.mod(np.floor(xs / bg.period) + np.floor(ys / bg.period), 2.0)
    a = np.deg2rad(bg.angle)
    t = (xs - 0.5) * np.cos(a) + (ys - 0.5) * np.sin(a)
    if bg.kind == "striped":
        return (np.mod(t / bg.period, 1.0) < 0.5).astype(np.float64)
    if bg.kind == "gradient":
        return np.clip(t / 0.71 + 0.5, 0.0, 1.0)
    raise ValueError(f"unknown background {bg.kind!r}")


@functools.lru_cache(maxsize=32)
def _background_layer(bg: Background, size: int, ss: int):
    """(downsampled background float64 [size,size,3], supersampled c2-weight [S,S] or None), read-only; cached
    because an edit's source and target (and the oracle's templates) share their background."""
    t = _hi_coords(size, ss)
    c1, c2 = np.asarray(bg.c1, np.float64), np.asarray(bg.c2, np.float64)
    w = _bg_weight(bg, t[None, :], t[:, None])
    low = np.broadcast_to(c1, (size, size, 3)).copy() if w is None else c1 + (c2 - c1) * _down(w, ss)[..., None]
    for a in (low, w):
        if a is not None:
            a.setflags(write=False)
    return low, w


def _draw(bg: Background, prims, size: int, ss: int, image: bool = True):
    """Box-filtered rendering of ``prims`` (shape, cx, cy, half, angle_deg, colour_fn) over ``bg``.

    Exact and cheap: the box average is linear, so the image is the downsampled background plus, per object,
    the downsampled (object - background) difference inside its footprint, computed in its bounding box only.
    Returns ``(image float64 [size,size,3] in 0..255 or None, coverage float32 [K,size,size])``.
    """
    t = _hi_coords(size, ss)
    cov = np.zeros((len(prims), size, size), np.float32)
    low = w = None
    if image:
        c1, c2 = np.asarray(bg.c1, np.float64), np.asarray(bg.c2, np.float64)
        low, w = _background_layer(bg, size, ss)
        low = low.copy()
    for k, (shape, cx, cy, half, angle, colour_fn) in enumerate(prims):
        ext = half * (1.25 if angle else 1.0)
        i0, i1 = max(int(np.floor((cy - ext) * size)), 0), min(int(np.ceil((cy + ext) * size)), size)
        j0, j1 = max(int(np.floor((cx - ext) * size)), 0), min(int(np.ceil((cx + ext) * size)), size)
        ys, xs = t[i0 * ss:i1 * ss, None] - cy, t[None, j0 * ss:j1 * ss] - cx
        a = np.deg2rad(angle)
        u = (xs * np.cos(a) + ys * np.sin(a)) / half
        v = (-xs * np.sin(a) + ys * np.cos(a)) / half
        m = inside_shape(shape, u, v)
        cov[k, i0:i1, j0:j1] = _down(m.astype(np.float64), ss)
        if image:
            under = c1 if w is None else c1 + (c2 - c1) * w[i0 * ss:i1 * ss, j0 * ss:j1 * ss, None]
            low[i0:i1, j0:j1] += _down(m[..., None] * (colour_fn(u, v, xs, ys) - under), ss)
    return low, cov


def _to_uint8(img):
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _scene_prims(scene: Scene):
    return [(o.shape, *o.center, o.half, 0.0, _object_colour(o)) for o in scene.objects]


def render_with_masks(scene: Scene, size: int = 64, ss: int = 4):
    """Returns ``(image uint8 [size,size,3], coverage float32 [K,size,size])`` for K objects."""
    img, cov = _draw(scene.background, _scene_prims(scene), size, ss)
    return _to_uint8(img), cov


def render(scene: Scene, size: int = 64, ss: int = 4) -> np.ndarray:
    """``uint8 [size, size, 3]`` image of the scene."""
    return render_with_masks(scene, size, ss)[0]


def render_masks(scene: Scene, size: int = 64, ss: int = 4) -> np.ndarray:
    """``float32 [K, size, size]`` coverage in [0, 1] of each object (``>= 0.5`` for a binary mask)."""
    return _draw(scene.background, _scene_prims(scene), size, ss, image=False)[1]


# ----------------------------------------------------------------------------------------- sampling
def sample_background(rng: np.random.Generator, kinds=vocab.BACKGROUNDS) -> Background:
    """Near-greys (lightness 100..200; tint <= 11 per channel, so chroma <= 22, under the oracle's 30): never
    confused with an object colour. ``c2`` (stripes, checks, gradient end) is 25..50 lighter or darker."""
    kind = str(rng.choice(kinds))
    c1 = rng.uniform(100, 200) + rng.uniform(-8, 8, 3)
    delta = rng.uniform(25, 50) * (1 if c1.mean() < 150 else -1)
    c2 = c1 + delta + rng.uniform(-3, 3, 3)
    period = rng.uniform(8, 16) / 64
    angle = float(rng.choice([0.0, 45.0, 90.0, 135.0])) if kind != "gradient" else rng.uniform(0, 360)
    return Background(kind, tuple(round(float(v), 2) for v in c1), tuple(round(float(v), 2) for v in c2),
                      round(float(period), 5), round(float(angle), 3))


def _sample_texture(rng, p_plain):
    return "plain" if rng.uniform() < p_plain else str(rng.choice(vocab.TEXTURES[1:]))


def _fresh_look(rng, taken, colours=vocab.COLOURS, shapes=vocab.SHAPES):
    """A (colour, shape) pair not in ``taken``: every object of a scene is named by its colour and shape."""
    free = [(c, s) for c in colours for s in shapes if (c, s) not in taken]
    return free[int(rng.integers(len(free)))]


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, max_objects: int = 3,
                 p_plain: float = 0.6, colours=vocab.COLOURS, shapes=vocab.SHAPES,
                 backgrounds=vocab.BACKGROUNDS) -> Scene:
    """A random scene of ``n_objects`` (default 1..max_objects) objects with distinct (colour, shape)."""
    n = int(rng.integers(1, max_objects + 1)) if n_objects is None else int(n_objects)
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objs, taken = [], set()
    for cell in cells:
        colour, shape = _fresh_look(rng, taken, colours, shapes)
        taken.add((colour, shape))
        size = str(rng.choice(vocab.SIZES))
        j = jitter_limit(size)
        dx, dy = rng.uniform(-j, j, 2)
        objs.append(Obj(shape, colour, size, int(cell), round(float(dx), 5), round(float(dy), 5),
                        _sample_texture(rng, p_plain)))
    return Scene(sample_background(rng, backgrounds), tuple(objs))


# ----------------------------------------------------------------------------------------- text
def object_phrase(obj: Obj) -> str:
    tex = "" if obj.texture == "plain" else obj.texture + " "
    return f"a {obj.size} {obj.colour} {tex}{obj.shape}"


def caption(scene: Scene, positions: bool = False) -> str:
    """E.g. "a small red circle and a large blue striped square on a checkered background"."""
    if not scene.objects:
        return vocab.CAPTION_EMPTY.format(bg=scene.background.kind)
    phrases = [object_phrase(o) if not positions else
               vocab.CAPTION_POSITION.format(obj=object_phrase(o), pos=vocab.POSITIONS[o.cell])
               for o in scene.objects]
    return vocab.CAPTION.format(objects=vocab.CAPTION_JOIN.join(phrases), bg=scene.background.kind)


def reference(rng, scene: Scene, index: int) -> str:
    """Words naming object ``index`` unambiguously: its shape if no other object has it, else colour + shape."""
    obj = scene.objects[index]
    unique_shape = sum(o.shape == obj.shape for o in scene.objects) == 1
    if unique_shape and rng.uniform() < 0.5:
        return obj.shape
    return f"{obj.colour} {obj.shape}"


def _pick(rng, templates) -> str:
    return templates[int(rng.integers(len(templates)))]


# ----------------------------------------------------------------------------------------- edits
def sample_edit(rng: np.random.Generator, scene: Scene, kind: str | None = None,
                kinds=CORE_KINDS) -> Edit:
    """A random edit of ``scene`` (``kind`` drawn from ``kinds`` when not given) with its exact result."""
    kind = str(rng.choice(kinds)) if kind is None else kind
    objs = list(scene.objects)
    looks = {(o.colour, o.shape) for o in objs}
    free_cells = [c for c in range(GRID * GRID) if c not in {o.cell for o in objs}]
    if kind in ("add", "move") and not free_cells or kind == "add" and len(objs) >= MAX_OBJECTS:
        raise ValueError(f"no room to {kind} in this scene")
    if kind != "add" and not objs:
        raise ValueError(f"nothing to {kind} in an empty scene")
    idx = int(rng.integers(len(objs))) if objs else 0
    ref = reference(rng, scene, idx) if objs else ""
    if kind == "recolour":
        o = objs[idx]
        choices = [c for c in vocab.COLOURS if c != o.colour and (c, o.shape) not in looks]
        colour = choices[int(rng.integers(len(choices)))]
        objs[idx] = dataclasses.replace(o, colour=colour)
        text = _pick(rng, vocab.RECOLOUR).format(ref=ref, colour=colour)
    elif kind == "reshape":
        o = objs[idx]
        choices = [s for s in vocab.SHAPES if s != o.shape and (o.colour, s) not in looks]
        shape = choices[int(rng.integers(len(choices)))]
        objs[idx] = dataclasses.replace(o, shape=shape)
        text = _pick(rng, vocab.RESHAPE).format(ref=ref, shape=shape)
    elif kind == "remove":
        del objs[idx]
        text = _pick(rng, vocab.REMOVE).format(ref=ref)
    elif kind == "add":
        colour, shape = _fresh_look(rng, looks)
        cell = free_cells[int(rng.integers(len(free_cells)))]
        new = Obj(shape, colour, str(rng.choice(vocab.SIZES)), cell, 0.0, 0.0, _sample_texture(rng, 0.7))
        objs.append(new)
        idx = len(objs) - 1
        text = _pick(rng, vocab.ADD).format(obj=object_phrase(new), pos=vocab.POSITIONS[cell])
    elif kind == "move":
        cell = free_cells[int(rng.integers(len(free_cells)))]
        objs[idx] = dataclasses.replace(objs[idx], cell=cell, dx=0.0, dy=0.0)
        text = _pick(rng, vocab.MOVE).format(ref=ref, pos=vocab.POSITIONS[cell])
    elif kind == "resize":
        o = objs[idx]
        size = "large" if o.size == "small" else "small"
        j = jitter_limit(size)
        objs[idx] = dataclasses.replace(o, size=size, dx=float(np.clip(o.dx, -j, j)), dy=float(np.clip(o.dy, -j, j)))
        text = _pick(rng, vocab.RESIZE[size]).format(ref=ref)
    else:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    target = Scene(scene.background, tuple(objs))
    return Edit(kind, text, scene, target, idx, caption(scene), caption(target))


def item_rng(seed: int, stream: int, *index: int) -> np.random.Generator:
    """Per-item generator: depends only on (seed, stream, index...), never on how many items are drawn."""
    return np.random.default_rng([int(seed), int(stream), *map(int, index)])


def make_edit(seed: int, i: int, kinds=CORE_KINDS) -> Edit:
    """Item ``i`` of the edit dataset: kinds cycle (``kinds[i % len(kinds)]``), so every kind is equally common."""
    rng = item_rng(seed, _PAIRS_STREAM, i)
    scene = sample_scene(rng)
    return sample_edit(rng, scene, kinds[i % len(kinds)])


def make_pairs(seed: int, n: int, size: int = 64, kinds=CORE_KINDS, start: int = 0, ss: int = 4) -> dict:
    """Edit pairs ``start .. start+n-1``; item i depends only on (seed, i, kinds).

    Returns a dict: ``source``/``target`` uint8 [n,H,W,3]; ``mask`` bool [n,H,W] (pixels the edit may touch:
    any coverage of the edited object, before or after); ``instruction``, ``caption``, ``edited_caption``,
    ``kind`` lists of str; ``index`` int [n]; ``edits`` list of ``Edit`` (what the oracle reads).
    """
    kinds = tuple(kinds)
    src, tgt, mask, edits = [], [], [], []
    for i in range(start, start + n):
        e = make_edit(seed, i, kinds)
        s_img, s_cov = render_with_masks(e.source, size, ss)
        t_img, t_cov = render_with_masks(e.target, size, ss)
        m = np.zeros((size, size), bool)
        if e.before is not None:
            m |= s_cov[e.index] > 0
        if e.after is not None:
            m |= t_cov[e.index] > 0
        src.append(s_img), tgt.append(t_img), mask.append(m), edits.append(e)
    return {"source": np.stack(src), "target": np.stack(tgt), "mask": np.stack(mask),
            "instruction": [e.instruction for e in edits], "caption": [e.caption for e in edits],
            "edited_caption": [e.edited_caption for e in edits], "kind": [e.kind for e in edits],
            "index": np.arange(start, start + n), "edits": edits, "size": size, "ss": ss}


def make_scenes(seed: int, n: int, size: int = 64, start: int = 0, ss: int = 4) -> dict:
    """Plain captioned scenes (for text-to-image / autoencoder training): the source side of ``make_pairs``."""
    scenes = [sample_scene(item_rng(seed, _PAIRS_STREAM, i)) for i in range(start, start + n)]
    return {"image": np.stack([render(s, size, ss) for s in scenes]), "caption": [caption(s) for s in scenes],
            "scenes": scenes, "index": np.arange(start, start + n)}


# ----------------------------------------------------------------------------------------- subjects
@dataclass(frozen=True)
class Subject:
    """A distinctive object for customization tests: a shape in two colours laid out by a pattern, plus a mark."""
    token: str
    shape: str
    colour: str
    colour2: str
    pattern: str              # vocab.SUBJECT_PATTERNS
    marking: str              # vocab.SUBJECT_MARKINGS


def _subject_colour(sub: Subject):
    c1, c2 = np.asarray(PALETTE[sub.colour], float), np.asarray(PALETTE[sub.colour2], float)
    white = np.asarray(WHITE, float)

    def fn(u, v, xs, ys):
        second = {"split": u < 0, "ring": u * u + v * v < 0.45 ** 2,
                  "bands": np.mod(np.floor((v + 1) * 2.5), 2) == 1, "quarters": (u < 0) ^ (v < 0)}[sub.pattern]
        if sub.marking == "dot":
            mark = u * u + (v + 0.45) ** 2 < 0.16 ** 2
        elif sub.marking == "eyes":
            mark = (np.abs(u) - 0.3) ** 2 + (v + 0.15) ** 2 < 0.12 ** 2
        else:
            mark = (np.abs(u) < 0.4) & (np.abs(v - 0.35) < 0.08)
        out = np.where(second[..., None], c2, c1)
        return np.where(mark[..., None], white, out)
    return fn


def subject_look(seed: int, i: int) -> Subject:
    """Subject ``i`` of a seed. Looks are visited in a seeded order and subject i takes the first look that
    differs from subjects 0..i-1 in at least 3 of (shape, colour, colour2, pattern, marking); subject i depends
    on (seed, i) only, never on how many subjects are drawn."""
    if not 0 <= i < len(vocab.SUBJECT_TOKENS):
        raise ValueError(f"at most {len(vocab.SUBJECT_TOKENS)} subjects (one rare token each)")
    looks = [(s, c, c2, p, m) for s in vocab.SHAPES for c in vocab.COLOURS for c2 in vocab.COLOURS if c2 != c
             for p in vocab.SUBJECT_PATTERNS for m in vocab.SUBJECT_MARKINGS]
    chosen = []
    for j in np.random.default_rng([int(seed), _SUBJECT_STREAM]).permutation(len(looks)):
        if all(sum(a != b for a, b in zip(looks[j], c)) >= 3 for c in chosen):
            chosen.append(looks[j])
            if len(chosen) > i:
                break
    return Subject(vocab.SUBJECT_TOKENS[i], *chosen[i])


def render_subject(sub: Subject, view: dict, size: int = 64, ss: int = 4):
    """One view (keys cx, cy, half, angle, background) -> (uint8 [H,W,3], coverage float32 [H,W])."""
    prim = (sub.shape, view["cx"], view["cy"], view["half"], view["angle"], _subject_colour(sub))
    img, cov = _draw(view["background"], [prim], size, ss)
    return _to_uint8(img), cov[0]


def subjects(seed: int, n_subjects: int, n_views: int, size: int = 64, ss: int = 4) -> dict:
    """Customization set: ``n_subjects`` distinctive subjects, each in ``n_views`` views.

    A view varies the position, scale (half-extent 0.2..0.3 of the canvas), rotation (+-25 deg) and background.
    Returns ``images`` uint8 [S,V,H,W,3], ``masks`` bool [S,V,H,W], ``tokens``, ``class_words`` (shape nouns),
    ``instance_prompts`` ("a photo of sks star"), ``class_prompts`` ("a photo of a star"), ``prompts`` [S][V]
    (per-view, naming the background), ``subjects`` (``Subject`` list) and ``views`` [S][V] dicts.
    """
    imgs, masks, views, subs = [], [], [], []
    for i in range(n_subjects):
        sub = subject_look(seed, i)
        row_i, row_m, row_v = [], [], []
        for v in range(n_views):
            rng = item_rng(seed, _SUBJECT_STREAM, i, v)
            half = float(rng.uniform(0.2, 0.3))
            lo = 1.25 * half + 2 / 64
            view = {"cx": float(rng.uniform(lo, 1 - lo)), "cy": float(rng.uniform(lo, 1 - lo)), "half": half,
                    "angle": float(rng.uniform(-25, 25)), "background": sample_background(rng)}
            im, cov = render_subject(sub, view, size, ss)
            row_i.append(im), row_m.append(cov >= 0.5), row_v.append(view)
        imgs.append(np.stack(row_i)), masks.append(np.stack(row_m)), views.append(row_v), subs.append(sub)
    prompts = [[vocab.SUBJECT_PROMPTS[2].format(token=s.token, cls=s.shape, bg=vw["background"].kind)
                for vw in row] for s, row in zip(subs, views)]
    return {"images": np.stack(imgs) if imgs else np.zeros((0, n_views, size, size, 3), np.uint8),
            "masks": np.stack(masks) if masks else np.zeros((0, n_views, size, size), bool),
            "tokens": [s.token for s in subs], "class_words": [s.shape for s in subs],
            "instance_prompts": [vocab.SUBJECT_PROMPTS[0].format(token=s.token, cls=s.shape) for s in subs],
            "class_prompts": [vocab.CLASS_PROMPT.format(cls=s.shape) for s in subs],
            "prompts": prompts, "subjects": subs, "views": views}
