"""geo_twins' photos: each landmark archetype drawn with PIL in a randomly varied scene.

A photo of a class (an archetype in a city) is a sky and ground, background clutter, the landmark
seen from a random viewpoint in a random material and light, foreground clutter that may hide part
of it, and a camera's exposure and sensor noise; all of that variation comes from the photo's RNG.
The class's city shows only in a small cue — proportions, one detail, a colour tint — smaller than
that within-class variation, so twins (one archetype in different cities) are hard to tell apart
from the photo alone while different archetypes are easy (the paper's Fig. 1 problem).

A landmark is drawn in its own frame — x to the right, y up, base centre at (0, 0), height about
1 — and a `_Pen` maps that frame to the canvas with the photo's viewpoint (scale, position, tilt,
horizontal squash). Parts are drawn into a colour layer and a mask, so openings (arches, windows)
show the sky behind them.
"""

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

from m2net_jax.data.geo_twins_classes import ARCHETYPES, LandmarkClass


class _Pen:
    """Draws landmark parts in the landmark frame onto a colour layer and its mask."""

    def __init__(self, size: int, *, origin, height: float, squash: float, tilt: float, colour):
        self.layer = Image.new("RGB", (size, size))
        self.mask = Image.new("L", (size, size))
        self._colour_draw = ImageDraw.Draw(self.layer)
        self._mask_draw = ImageDraw.Draw(self.mask)
        cos, sin = math.cos(tilt), math.sin(tilt)
        # Canvas y grows downwards; the landmark frame's y grows upwards.
        self._matrix = height * np.array([[cos * squash, -sin], [-sin * squash, -cos]])
        self._origin = np.asarray(origin, np.float64)
        self.colour = np.asarray(colour, np.float64)

    def _points(self, points) -> list[tuple[float, float]]:
        xy = np.asarray(points, np.float64) @ self._matrix.T + self._origin
        return [tuple(p) for p in xy]

    def polygon(self, points, shade: float = 1.0, colour=None) -> None:
        base = self.colour if colour is None else np.asarray(colour, np.float64)
        fill = tuple(int(c) for c in np.clip(base * shade, 0, 255))
        xy = self._points(points)
        self._colour_draw.polygon(xy, fill=fill)
        self._mask_draw.polygon(xy, fill=255)

    def cut(self, points) -> None:
        """Removes a region (an opening): the background shows through."""
        self._mask_draw.polygon(self._points(points), fill=0)

    def rect(self, x0, y0, x1, y1, shade: float = 1.0, colour=None) -> None:
        self.polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], shade, colour)

    def ellipse(self, cx, cy, rx, ry, shade: float = 1.0, start=0.0, stop=360.0, colour=None):
        self.polygon(_arc(cx, cy, rx, ry, start, stop), shade, colour)

    def line(self, p0, p1, width: float, shade: float = 1.0) -> None:
        (x0, y0), (x1, y1) = p0, p1
        dx, dy = x1 - x0, y1 - y0
        norm = math.hypot(dx, dy) or 1.0
        nx, ny = -dy / norm * width / 2, dx / norm * width / 2
        self.polygon(
            [(x0 + nx, y0 + ny), (x1 + nx, y1 + ny), (x1 - nx, y1 - ny), (x0 - nx, y0 - ny)], shade
        )


def _arc(cx, cy, rx, ry, start=0.0, stop=360.0, n=24) -> list[tuple[float, float]]:
    angles = np.radians(np.linspace(start, stop, n))
    return list(zip(cx + rx * np.cos(angles), cy + ry * np.sin(angles), strict=True))


def _arch_opening(cx, half_width, height) -> list[tuple[float, float]]:
    """A round-topped opening standing on y=0 (door, arcade): rectangle plus half ellipse."""
    spring = height - half_width
    top = _arc(cx, spring, half_width, half_width, 0.0, 180.0, n=12)
    return [(cx + half_width, 0.0), *top, (cx - half_width, 0.0)]


# Each archetype: draw(pen, cue, rng). `cue` in [-cue_strength, cue_strength] sets this city's
# detail; `rng` draws the within-class structural variation. Proportions are scaled by the
# caller. Details are chosen to survive a horizontal flip (photos are flipped in training).


def _draw_tower(pen, cue, rng):
    # Eiffel-like lattice tower: concave legs, an arch between them, platforms, a spire.
    ys = np.linspace(0.0, 0.92, 16)
    half = 0.36 * (1.0 - ys / 0.92) ** 2.4 + 0.025
    pen.polygon([*zip(half, ys, strict=True), *zip(-half[::-1], ys[::-1], strict=True)])
    pen.cut(_arc(0.0, 0.0, 0.19, 0.13, 0.0, 180.0, n=12))
    for y, w in ((0.14, 0.22), (0.42, 0.1)):
        pen.rect(-w, y, w, y + 0.03, shade=0.75)
    spire = 0.08 + 0.06 * cue
    pen.rect(-0.012, 0.9, 0.012, 0.92 + spire, shade=0.9)


def _draw_arch(pen, cue, rng):
    # Triumphal arch: block, central arch, cornice, attic whose height is the city's detail.
    pen.rect(-0.5, 0.0, 0.5, 0.74)
    pen.rect(-0.54, 0.72, 0.54, 0.78, shade=0.85)
    attic = 0.16 + 0.08 * cue
    pen.rect(-0.46, 0.78, 0.46, 0.78 + attic, shade=1.08)
    pen.cut(_arch_opening(0.0, 0.15, 0.52))
    for x in (-0.33, 0.33):
        pen.rect(x - 0.04, 0.1, x + 0.04, 0.6, shade=0.82)


def _draw_dome(pen, cue, rng):
    # Capitol-style: base block, colonnaded drum, dome (its rise is the detail), lantern.
    pen.rect(-0.62, 0.0, 0.62, 0.3, shade=0.95)
    for x in np.linspace(-0.5, 0.5, 7):
        pen.rect(x - 0.02, 0.04, x + 0.02, 0.26, shade=0.7)
    pen.rect(-0.3, 0.3, 0.3, 0.5)
    for x in np.linspace(-0.24, 0.24, 5):
        pen.rect(x - 0.015, 0.32, x + 0.015, 0.48, shade=0.75)
    rise = 0.3 + 0.07 * cue
    pen.ellipse(0.0, 0.5, 0.31, rise, shade=1.08, start=0.0, stop=180.0)
    pen.rect(-0.04, 0.48 + rise, 0.04, 0.62 + rise, shade=0.95)
    pen.ellipse(0.0, 0.62 + rise, 0.05, 0.03, shade=0.95, start=0.0, stop=180.0)


def _draw_pyramid(pen, cue, rng):
    # Two visible faces, lit differently; a capstone whose size is the detail.
    apex = rng.uniform(-0.15, 0.15)
    pen.polygon([(-0.8, 0.0), (apex * 0.5, 0.0), (0.0, 1.0)], shade=1.05)
    pen.polygon([(apex * 0.5, 0.0), (0.8, 0.0), (0.0, 1.0)], shade=0.72)
    cap = 0.12 + 0.07 * cue
    pen.polygon(
        [(-0.8 * cap, 1.0 - cap), (0.8 * cap, 1.0 - cap), (0.0, 1.0)], colour=(215, 185, 90)
    )


def _draw_bridge(pen, cue, rng):
    # Suspension bridge: deck across the frame, two towers, main cables and hangers.
    pen.rect(-1.6, 0.22, 1.6, 0.3, shade=0.85)
    top = 1.0 + 0.08 * cue
    for x in (-0.5, 0.5):
        pen.rect(x - 0.05, 0.0, x - 0.025, top)
        pen.rect(x + 0.025, 0.0, x + 0.05, top)
        for y in (0.55, top - 0.05):
            pen.rect(x - 0.05, y, x + 0.05, y + 0.03)
    sag = np.linspace(-0.5, 0.5, 9)
    cable = 0.34 + (top - 0.34) * (2 * sag) ** 2
    for i in range(len(sag) - 1):
        pen.line((sag[i], cable[i]), (sag[i + 1], cable[i + 1]), 0.015, shade=0.8)
    for x in sag[1:-1]:
        pen.line((x, 0.3), (x, 0.34 + (top - 0.34) * (2 * x) ** 2), 0.006, shade=0.8)
    for side in (-1, 1):
        pen.line((side * 0.5, top), (side * 1.6, 0.3), 0.015, shade=0.8)


def _draw_obelisk(pen, cue, rng):
    # Tall tapering shaft on a stepped pedestal; the shaft's slenderness is the detail.
    pen.rect(-0.17, 0.0, 0.17, 0.05, shade=0.8)
    pen.rect(-0.13, 0.05, 0.13, 0.11, shade=0.9)
    base, top = 0.075 + 0.02 * cue, 0.05 + 0.012 * cue
    pen.polygon([(-base, 0.11), (base, 0.11), (top, 0.9), (-top, 0.9)])
    pen.polygon([(-top, 0.9), (top, 0.9), (0.0, 1.0)], shade=1.12)


def _draw_pagoda(pen, cue, rng):
    # Stacked tiers with upturned roofs; roof overhang is the detail.
    tiers = 5
    overhang = 0.1 + 0.05 * cue
    y = 0.0
    for i in range(tiers):
        w = 0.34 - 0.05 * i
        h = 0.11
        pen.rect(-w, y, w, y + h, shade=0.9)
        pen.rect(-w * 0.35, y, w * 0.35, y + h * 0.7, shade=0.55)
        r = w + overhang
        pen.polygon(
            [(-r, y + h + 0.04), (-w, y + h), (w, y + h), (r, y + h + 0.04), (0.0, y + h + 0.1)],
            shade=0.6,
        )
        y += h + 0.06
    pen.rect(-0.015, y, 0.015, y + 0.12, shade=0.7)


def _draw_lighthouse(pen, cue, rng):
    # Banded tapering tower, gallery, lantern room, cap. Band width is the detail.
    pen.polygon([(-0.2, 0.0), (0.2, 0.0), (0.12, 0.75), (-0.12, 0.75)])
    band = 0.07 + 0.03 * cue
    for y0 in np.arange(0.1, 0.7, 0.22):
        w0, w1 = 0.2 - 0.08 * y0 / 0.75, 0.2 - 0.08 * (y0 + band) / 0.75
        pen.polygon([(-w0, y0), (w0, y0), (w1, y0 + band), (-w1, y0 + band)], colour=(170, 40, 35))
    pen.rect(-0.17, 0.75, 0.17, 0.79, shade=0.6)
    pen.rect(-0.09, 0.79, 0.09, 0.9, colour=(245, 230, 150))
    pen.polygon([(-0.11, 0.9), (0.11, 0.9), (0.0, 1.0)], shade=0.55)


def _draw_windmill(pen, cue, rng):
    # Tapering body, cap, four sails at a random angle; sail width is the detail.
    pen.polygon([(-0.2, 0.0), (0.2, 0.0), (0.13, 0.62), (-0.13, 0.62)])
    pen.rect(-0.05, 0.0, 0.05, 0.14, shade=0.45)
    pen.ellipse(0.0, 0.62, 0.15, 0.1, shade=0.75, start=0.0, stop=180.0)
    angle = rng.uniform(0.0, 90.0)
    width = 0.09 + 0.035 * cue
    for k in range(4):
        a = math.radians(angle + 90.0 * k)
        tip = (0.52 * math.cos(a), 0.66 + 0.52 * math.sin(a))
        pen.line((0.0, 0.66), tip, width, shade=0.9)
    pen.ellipse(0.0, 0.66, 0.03, 0.03, shade=0.5)


def _draw_amphitheatre(pen, cue, rng):
    # Colosseum-like wall with arcades; the arches' height is the detail.
    pen.rect(-0.95, 0.0, 0.95, 0.62)
    pen.rect(-0.95, 0.62, 0.95, 0.7, shade=1.08)
    rise = 0.13 + 0.03 * cue
    for level in range(3):
        y0 = 0.03 + level * 0.2
        for x in np.linspace(-0.82, 0.82, 8):
            arch = _arch_opening(x, 0.07, rise)
            pen.cut([(px, py + y0) for px, py in arch])


_DRAW = {
    "tower": _draw_tower,
    "arch": _draw_arch,
    "dome": _draw_dome,
    "pyramid": _draw_pyramid,
    "bridge": _draw_bridge,
    "obelisk": _draw_obelisk,
    "pagoda": _draw_pagoda,
    "lighthouse": _draw_lighthouse,
    "windmill": _draw_windmill,
    "amphitheatre": _draw_amphitheatre,
}

# Typical height of each archetype as a fraction of the photo (before the random scale).
_HEIGHT = {
    "tower": 0.8,
    "arch": 0.55,
    "dome": 0.55,
    "pyramid": 0.5,
    "bridge": 0.45,
    "obelisk": 0.8,
    "pagoda": 0.75,
    "lighthouse": 0.8,
    "windmill": 0.7,
    "amphitheatre": 0.4,
}

_MATERIALS = np.array(
    [
        (205, 195, 175),  # limestone
        (215, 180, 130),  # sandstone
        (165, 85, 65),  # brick
        (235, 235, 228),  # marble
        (95, 80, 70),  # dark iron
        (150, 150, 155),  # concrete
        (95, 135, 115),  # weathered bronze
        (190, 160, 95),  # ochre
    ],
    np.float64,
)

# The per-city tint: twins shift their material colour along one fixed direction per
# archetype (warm/cool, greener/redder, ...), by less than the material colour varies.
_TINT_DIRECTIONS = np.array(
    [(1, 0, -1), (0, 1, -1), (1, -1, 0), (-1, 0, 1), (0, -1, 1), (-1, 1, 0)], np.float64
) / math.sqrt(2)

_SKIES = {
    # (top colour, horizon colour) ranges per time of day.
    "day": ((60, 120, 200), (170, 205, 235)),
    "dusk": ((70, 60, 120), (240, 150, 90)),
    "overcast": ((140, 145, 155), (200, 200, 205)),
    "night": ((10, 15, 40), (50, 60, 90)),
}
_GROUNDS = np.array(
    [(90, 130, 70), (170, 160, 130), (120, 120, 120), (60, 90, 130), (200, 190, 160)], np.float64
)


@dataclasses.dataclass(frozen=True)
class RenderOptions:
    """What a photo looks like: size and how strong the twin cue is.

    Attributes:
      image_size: side S of the square photo in pixels.
      twin_cue: strength of the per-city cue, 1.0 the tuned default (see BUILD_NOTES.md); 0
        makes twins indistinguishable from their photos.
    """

    image_size: int = 32
    twin_cue: float = 1.0


# Cue constants at twin_cue=1: relative width change, tint in RGB units, detail amplitude.
_WIDTH_CUE = 0.12
_TINT_CUE = 21.0
_DETAIL_CUE = 1.35


def render(cls: LandmarkClass, rng: np.random.Generator, options: RenderOptions) -> np.ndarray:
    """Draws one photo of `cls`; all within-class variation comes from `rng`.

    The scene is drawn in layers, back to front, each drawing from `rng` in turn (their order is
    part of the dataset: changing it changes every photo).

    Returns:
      (S, S, 3) uint8 image.
    """
    size = options.image_size
    # Draw at >= 128 px and downsample: PIL polygons are not anti-aliased.
    supersample = max(1, math.ceil(128 / size)) if size < 112 else 2
    canvas = size * supersample
    scene = _sky_and_ground(canvas, rng)
    _background_clutter(scene, rng)
    _paste_landmark(scene, cls, rng, cue=cls.twin_cue * options.twin_cue)
    _foreground_clutter(scene, rng)
    return _camera(scene.image, rng, size=size)


@dataclasses.dataclass
class _Scene:
    """The canvas being drawn and the facts about it that later layers need."""

    image: Image.Image
    canvas: int  # side in pixels (supersampled)
    horizon: float  # y of the horizon in pixels
    horizon_colour: np.ndarray  # (3,) float64 RGB of the sky at the horizon
    time_of_day: str  # a key of _SKIES


def _sky_and_ground(canvas: int, rng: np.random.Generator) -> _Scene:
    """Sky: a vertical gradient whose colours depend on the time of day; ground below it."""
    time_of_day = rng.choice(list(_SKIES), p=[0.55, 0.2, 0.17, 0.08])
    top_range, horizon_range = (np.asarray(c, np.float64) for c in _SKIES[time_of_day])
    top = top_range + rng.normal(0, 18, 3)
    horizon_colour = horizon_range + rng.normal(0, 18, 3)
    horizon = rng.uniform(0.68, 0.9) * canvas
    ramp = np.clip(np.arange(canvas) / horizon, 0, 1)[:, None, None] ** rng.uniform(0.6, 1.6)
    sky = top * (1 - ramp) + horizon_colour * ramp
    photo = np.broadcast_to(sky, (canvas, canvas, 3)).copy()
    ground = _GROUNDS[rng.integers(len(_GROUNDS))] + rng.normal(0, 15, 3)
    photo[int(horizon) :] = ground * rng.uniform(0.6, 1.1)
    image = Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8))
    return _Scene(image, canvas, horizon, horizon_colour, str(time_of_day))


def _background_clutter(scene: _Scene, rng: np.random.Generator) -> None:
    """Clouds or a sun/moon, distant buildings on the horizon."""
    canvas, horizon, horizon_colour = scene.canvas, scene.horizon, scene.horizon_colour
    draw = ImageDraw.Draw(scene.image)
    for _ in range(rng.integers(0, 4)):
        cx, cy = rng.uniform(0, canvas), rng.uniform(0, horizon * 0.6)
        rx, ry = rng.uniform(0.05, 0.2) * canvas, rng.uniform(0.02, 0.06) * canvas
        shade = tuple(int(v) for v in np.clip(horizon_colour + rng.uniform(10, 60), 0, 255))
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=shade)
    if rng.random() < 0.3:
        cx, cy, r = rng.uniform(0, canvas), rng.uniform(0, horizon * 0.5), 0.05 * canvas
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 240, 200))
    for _ in range(rng.integers(0, 7)):
        w, h = rng.uniform(0.04, 0.14) * canvas, rng.uniform(0.05, 0.3) * canvas
        x = rng.uniform(-w, canvas)
        tone = tuple(int(v) for v in np.clip(0.6 * horizon_colour + rng.normal(40, 25, 3), 0, 255))
        draw.rectangle([x, horizon - h, x + w, horizon + 1], fill=tone)


def _paste_landmark(scene: _Scene, cls: LandmarkClass, rng: np.random.Generator, *, cue: float):
    """The landmark, seen from a random viewpoint, in a random material and light."""
    canvas, horizon = scene.canvas, scene.horizon
    height = _HEIGHT[cls.archetype] * rng.uniform(0.65, 1.15) * canvas
    # The viewpoint squashes the width by up to ±22%; the city cue changes it by a few %.
    squash = rng.uniform(0.78, 1.22) * (1.0 + _WIDTH_CUE * cue)
    origin = (rng.uniform(0.3, 0.7) * canvas, horizon + rng.uniform(-0.02, 0.05) * canvas)
    material = _MATERIALS[rng.integers(len(_MATERIALS))] + rng.normal(0, 14, 3)
    tint = _TINT_DIRECTIONS[ARCHETYPES.index(cls.archetype) % len(_TINT_DIRECTIONS)]
    material = material + _TINT_CUE * cue * tint
    pen = _Pen(
        canvas,
        origin=origin,
        height=height,
        squash=squash,
        tilt=math.radians(rng.normal(0, 3.0)),
        colour=material,
    )
    _DRAW[cls.archetype](pen, _DETAIL_CUE * cue, rng)
    # Lighting: overall exposure and a sideways gradient from the sun's direction.
    layer = np.asarray(pen.layer, np.float64)
    xs = (np.arange(canvas) - origin[0]) / canvas
    light = rng.uniform(0.6, 1.2) * (1.0 + rng.uniform(-0.9, 0.9) * xs)[None, :, None]
    if scene.time_of_day == "night":
        light = light * 0.6
    layer = Image.fromarray(np.clip(layer * light, 0, 255).astype(np.uint8))
    scene.image.paste(layer, mask=pen.mask)


def _foreground_clutter(scene: _Scene, rng: np.random.Generator) -> None:
    """Trees, people, lamp posts; they may hide part of the landmark."""
    canvas, horizon = scene.canvas, scene.horizon
    draw = ImageDraw.Draw(scene.image)
    for _ in range(rng.integers(0, 6)):
        x = rng.uniform(0, canvas)
        y = horizon + rng.uniform(0.0, 1.0) * (canvas - horizon)
        kind = rng.integers(3)
        if kind == 0:  # tree
            r = rng.uniform(0.03, 0.09) * canvas
            green = tuple(int(v) for v in np.clip(rng.normal((50, 100, 45), 20), 0, 255))
            draw.rectangle([x - r * 0.15, y - r, x + r * 0.15, y], fill=(70, 50, 35))
            draw.ellipse([x - r, y - 2.6 * r, x + r, y - 0.8 * r], fill=green)
        elif kind == 1:  # person
            h = rng.uniform(0.04, 0.1) * canvas
            tone = tuple(int(v) for v in rng.integers(10, 200, 3))
            draw.rectangle([x - h * 0.15, y - h, x + h * 0.15, y], fill=tone)
            draw.ellipse([x - h * 0.12, y - h * 1.25, x + h * 0.12, y - h * 0.98], fill=tone)
        else:  # lamp post
            h = rng.uniform(0.1, 0.3) * canvas
            draw.rectangle([x - 0.006 * canvas, y - h, x + 0.006 * canvas, y], fill=(40, 40, 45))


def _camera(image: Image.Image, rng: np.random.Generator, *, size: int) -> np.ndarray:
    """Downsample to (size, size), exposure and contrast, sensor noise; uint8."""
    image = image.resize((size, size), Image.Resampling.BOX)
    pixels = np.asarray(image, np.float64)
    mean = pixels.mean()
    pixels = (pixels - mean) * rng.uniform(0.75, 1.2) + mean * rng.uniform(0.85, 1.15)
    pixels += rng.normal(0, rng.uniform(1.0, 8.0), pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
