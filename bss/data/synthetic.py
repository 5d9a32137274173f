"""A procedural sewer-CCTV dataset: the project's embedded default, with exact ground truth.

Each frame looks down a circular pipe in perspective: a dark vanishing hole, a textured wall
(concrete or clay, stains, radial streaks), water on the invert, joint rings at perspective
spacing, lamp fall-off with depth, vignetting, blurred text burn-ins, blur, sensor noise and
JPEG softness. One defect class per dataset is painted in as polygons:

* ``obstacle``    1-3 shaded, textured blobs lying on the floor,
* ``deposition``  an irregular sediment band along the invert,
* ``deformation`` a patch of wall pushed inwards (the rings bend, the bulge is shaded),
* ``disconnect``  a displaced joint: a dark crescent gap at a joint ring.

A defect's colours are drawn from the wall's own palette, so only shading, texture and edges
tell it apart. The folder written (see :mod:`bss.data.layout`) holds ``images/``, ``masks/``
(filled boxes of each instance), ``labels.csv`` (exact polygons for a hand-labelled subset),
``truth/`` (the exact mask of every image) and ``generator.json``.

Pipe geometry: the wall ring at depth ``z`` (``z = 1`` is the reference ring) projects to a
circle of centre ``v + e / z`` and radius ``r0 / z``; ``v`` is the vanishing point. Every pixel
is solved for its wall depth ``z`` and angle ``theta`` (0 = right, pi/2 = floor) and the wall
texture is looked up in (theta, log z).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from bss.data.io import (
    atomic_folder,
    parse_size,  # noqa: F401 - the drivers' --size
    write_mask,
)
from bss.data.via import write_via_csv
from bss.errors import BSSError

DEFECTS = ("obstacle", "deposition", "deformation", "disconnect")
VERSION = 1
EMPTY_FRACTION = 0.07  # share of images without any defect
AREA_RANGE = (0.03, 0.20)  # a defect image's total defect area, as a share of the image
MAX_AREA_SCALE = 2.0  # SynthConfig.area_scale's upper bound: 2 x 20 % of a frame is already most of the pipe
MIN_SIDE = 32
_LOG_Z = (math.log(0.3), math.log(60.0))  # the depth range the wall texture covers
_BOTTOM = math.pi / 2


# --------------------------------------------------------------------------- geometry


@dataclass
class Camera:
    """Where the pipe sits in the frame; maps pixels to wall (z, theta) and back."""

    width: int
    height: int
    v: np.ndarray  # vanishing point (x, y)
    e: np.ndarray  # offset of the z = 1 ring's centre from v
    r0: float  # radius of the z = 1 ring, in pixels

    def wall_coords(self, px: np.ndarray, py: np.ndarray, e: np.ndarray | None = None):
        """Depth z and angle theta of the wall point seen at pixel (px, py)."""
        e = self.e if e is None else e
        dx, dy = px - self.v[0], py - self.v[1]
        a = float(e @ e) - self.r0**2  # negative: v lies inside every ring
        b = dx * e[0] + dy * e[1]
        t = (b - np.sqrt(b * b - a * (dx * dx + dy * dy))) / a
        t = np.maximum(t, 1e-4)
        theta = np.arctan2(dy - t * e[1], dx - t * e[0])
        return (1.0 / t).astype(np.float32), theta.astype(np.float32)

    def point(self, theta, z, e: np.ndarray | None = None) -> np.ndarray:
        """Pixel (x, y) of wall point(s) at angle theta and depth z; shape (..., 2)."""
        e = self.e if e is None else e
        t = 1.0 / np.asarray(z, dtype=np.float64)
        theta = np.asarray(theta, dtype=np.float64)
        x = self.v[0] + t * (e[0] + self.r0 * np.cos(theta))
        y = self.v[1] + t * (e[1] + self.r0 * np.sin(theta))
        return np.stack([x, y], axis=-1)

    def ring_px(self, z) -> np.ndarray:
        """How many pixels one unit of depth spans, radially, at depth z."""
        return self.r0 / np.maximum(z, 1e-3) ** 2


def _camera(rng: np.random.Generator, w: int, h: int) -> Camera:
    centre = np.array([w / 2, h / 2]) + rng.uniform(-0.04, 0.04, 2) * (w, h)
    v = np.array([w / 2 + rng.uniform(-0.13, 0.13) * w, h / 2 + rng.uniform(-0.16, 0.06) * h])
    r0 = math.hypot(w, h) / 2 * rng.uniform(0.85, 1.2)
    return Camera(w, h, v, centre - v, r0)


# --------------------------------------------------------------------------- noise


def _grid_noise(rng, shape, cells, periodic_x=False) -> np.ndarray:
    """Smooth value noise of ``shape`` (h, w) with ``cells`` (cy, cx) random knots, unit std."""
    (h, w), (cy, cx) = shape, (max(1, int(cells[0])), max(1, int(cells[1])))
    if periodic_x:  # whole cells around, so the noise wraps seamlessly (w is a power of two)
        cx = min(w, 2 ** round(math.log2(cx)))
    knots = rng.standard_normal((cy + 4, cx + 4)).astype(np.float32)
    if periodic_x:
        knots[:, :2] = knots[:, cx : cx + 2]
        knots[:, cx + 2 : cx + 4] = knots[:, 2:4]
    sy, sx = h / cy, w / cx
    big = cv2.resize(knots, (int(round((cx + 4) * sx)), int(round((cy + 4) * sy))), interpolation=cv2.INTER_CUBIC)
    oy, ox = int(round(2 * sy)), int(round(2 * sx))
    out = big[oy : oy + h, ox : ox + w]
    return out / (out[::3, ::3].std() + 1e-6)  # a sample is enough for the scale


def _fbm(rng, shape, cells, octaves=4, gain=0.55, periodic_x=False) -> np.ndarray:
    """Fractal noise: octaves of :func:`_grid_noise`, each with twice the knots."""
    total = np.zeros(shape, np.float32)
    amp = 1.0
    for k in range(octaves):
        c = (min(cells[0] << k, shape[0]), min(cells[1] << k, shape[1]))
        total += amp * _grid_noise(rng, shape, c, periodic_x)
        amp *= gain
    return total / (total[::3, ::3].std() + 1e-6)


def _noise_image(rng, h, w, cell) -> np.ndarray:
    """Isotropic value noise over an (h, w) image with blobs about ``cell`` pixels wide."""
    return _grid_noise(rng, (h, w), (max(1, round(h / cell)), max(1, round(w / cell))))


# --------------------------------------------------------------------------- the pipe


@dataclass
class Palette:
    wall: np.ndarray  # main wall colour (RGB, 0..1)
    alt: np.ndarray  # second wall colour, mixed in by low-frequency noise
    stain: np.ndarray  # brown water-line stain
    grime: np.ndarray  # dark sediment / grime
    water: np.ndarray

    def colours(self) -> list[np.ndarray]:
        return [self.wall, self.alt, self.stain, self.grime]


def _palette(rng) -> Palette:
    families = [(0.70, 0.64, 0.55), (0.63, 0.62, 0.59), (0.67, 0.54, 0.42), (0.62, 0.53, 0.41), (0.68, 0.60, 0.50)]
    wall = np.array(families[rng.choice(len(families), p=[0.3, 0.06, 0.22, 0.17, 0.25])]) * rng.uniform(0.85, 1.12) + rng.normal(0, 0.012, 3)
    alt = wall * rng.uniform(0.72, 1.05) + rng.normal(0, 0.02, 3)
    stain = np.array([0.46, 0.32, 0.17]) * rng.uniform(0.7, 1.15) + rng.normal(0, 0.015, 3)
    grime = np.array([0.20, 0.17, 0.13]) * rng.uniform(0.7, 1.3)
    water = np.array([0.27, 0.23, 0.17]) * rng.uniform(0.6, 1.2) + rng.normal(0, 0.012, 3)
    clip = lambda c: np.clip(c, 0.03, 0.95).astype(np.float32)  # noqa: E731
    return Palette(clip(wall), clip(alt), clip(stain), clip(grime), clip(water))


@dataclass
class Scene:
    """One frame's pipe: camera, palette and the layout of water, stains and joints."""

    camera: Camera
    palette: Palette
    water_halfwidth: float  # half-angle of the water wedge around the floor (radians)
    stain_top: float  # angle from the floor up to which the brown stain band reaches
    joint_spacing: float  # depth between joints, in units of the reference depth
    joint_phase: float
    tex_size: tuple[int, int]  # (log z rows, theta columns) of the unrolled wall texture
    area_scale: float = 1.0  # the defects' area as a share of AREA_RANGE's (SynthConfig.area_scale)
    light: np.ndarray | None = field(default=None, repr=False)  # per-pixel lamp light, set by _render_pipe


def _scene(rng, w: int, h: int) -> Scene:
    tu = int(min(1024, max(128, 2 ** math.ceil(math.log2(w)))))
    water = rng.uniform(0.3, 0.8)
    return Scene(
        camera=_camera(rng, w, h),
        palette=_palette(rng),
        water_halfwidth=water,
        stain_top=water + rng.uniform(0.3, 1.2),
        joint_spacing=rng.uniform(1.0, 2.4),
        joint_phase=rng.uniform(0, 2.4),
        tex_size=(tu // 4, tu),
    )


def _angle_from_bottom(theta):
    return np.abs((theta - _BOTTOM + np.pi) % (2 * np.pi) - np.pi)


def _wall_texture(rng, scene: Scene) -> np.ndarray:
    """Albedo of the unrolled wall, (log z rows, theta columns, RGB), periodic in theta."""
    pal, (tv, tu) = scene.palette, scene.tex_size
    shape = (tv, tu)
    theta = (np.arange(tu, dtype=np.float32) + 0.5) / tu * 2 * np.pi - np.pi
    from_bottom = _angle_from_bottom(theta)[None, :]
    mix = np.clip(0.5 + 0.4 * _fbm(rng, shape, (2, 4), 3, periodic_x=True), 0, 1)
    lowness = np.clip(1 - from_bottom / 2.2, 0, 1)
    tone = 1 + 0.12 * _fbm(rng, shape, (tv // 8, tu // 16), 3, periodic_x=True)
    tone += 0.12 * lowness * _grid_noise(rng, shape, (int(rng.integers(3, 7)), tu // 8), periodic_x=True)
    grime = np.clip(_fbm(rng, shape, (8, 32), 3, periodic_x=True) - 0.8, 0, 1) * rng.uniform(0.15, 0.45)
    # brown stain band above the water line, streaky along the pipe, fading upwards
    reach = np.clip((scene.stain_top - from_bottom) / 0.35, 0, 1)
    streaks = np.clip(0.6 + 0.5 * _fbm(rng, shape, (int(rng.integers(3, 7)), 32), 3, periodic_x=True), 0, 1)
    blotch = np.clip(0.6 + 0.5 * _fbm(rng, shape, (4, 32), 2, periodic_x=True), 0, 1)
    stain = reach * streaks * blotch * rng.uniform(0.6, 1.0)
    # water on the invert, flow lines along the pipe and a few glints
    wet = np.clip((scene.water_halfwidth - from_bottom) / 0.03 + 0.5, 0, 1) * np.ones((tv, 1), np.float32)
    flow = 1 + 0.3 * _fbm(rng, shape, (int(rng.integers(3, 8)), 32), 3, periodic_x=True)
    sheen = np.clip(_grid_noise(rng, shape, (int(rng.integers(4, 10)), 64), periodic_x=True) - 1.0, 0, 1) * rng.uniform(0.1, 0.3)
    glint = np.clip(_grid_noise(rng, shape, (tv // 6, tu // 4), periodic_x=True) - 2.2, 0, 1) * rng.uniform(0.1, 0.5)
    waterline = np.exp(-(((from_bottom - scene.water_halfwidth) / 0.04) ** 2)) * 0.6
    w = mix[..., None]
    albedo = (pal.wall * (1 - w) + pal.alt * w) * tone[..., None]
    albedo += (pal.grime - albedo) * grime[..., None]
    albedo += (pal.stain - albedo) * stain[..., None]
    albedo += (pal.grime - albedo) * waterline[..., None]
    water = pal.water * flow[..., None] + (sheen + glint)[..., None]
    albedo += (water - albedo) * wet[..., None]
    return np.clip(albedo, 0, 1.2).astype(np.float32)


def _sample_texture(texture: np.ndarray, z: np.ndarray, theta: np.ndarray) -> np.ndarray:
    tv, tu = texture.shape[:2]
    mu = ((theta + np.pi) / (2 * np.pi) * tu - 0.5).astype(np.float32)
    mv = ((np.log(z) - _LOG_Z[0]) / (_LOG_Z[1] - _LOG_Z[0]) * (tv - 1)).astype(np.float32)
    return cv2.remap(texture, mu, np.clip(mv, 0, tv - 1), cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)


def _aggregate(rng, z: np.ndarray) -> np.ndarray:
    """Fine concrete grain and pits in image space, strongest near the camera."""
    h, w = z.shape
    near = np.clip(2.0 / z, 0, 1)
    scale = max(1.0, w / 256)
    grain = 0.04 * _noise_image(rng, h, w, 1.2 * scale) + 0.09 * _noise_image(rng, h, w, 3.0 * scale)
    pits = np.clip(_noise_image(rng, h, w, 2.0 * scale) - 2.0, 0, 1) * 0.4
    return 1 + near * (grain * rng.uniform(0.6, 1.4) - pits)


def _joints(rng, scene: Scene, z, theta) -> np.ndarray:
    """Multiplicative factor drawing joint rings (dark gap, bright near lip) at even depths."""
    cam, step, phase = scene.camera, scene.joint_spacing, scene.joint_phase
    zj = phase + np.round((z - phase) / step) * step
    px_per_z = cam.ring_px(z)
    d = (z - zj) * px_per_z  # signed pixel distance to the nearest ring, + = deeper
    sigma = np.maximum(0.6, rng.uniform(0.006, 0.015) * px_per_z)  # the gap has a physical width
    fade = np.clip(step * px_per_z / (10 * sigma) - 0.4, 0, 1)  # rings closer than ~10 sigma blur away
    dark = np.exp(-((d / sigma) ** 2)) * rng.uniform(0.3, 0.6)
    lip = np.exp(-(((d + 2.5 * sigma) / (1.6 * sigma)) ** 2)) * rng.uniform(0.1, 0.5)
    dry = np.clip((_angle_from_bottom(theta) - scene.water_halfwidth) / 0.05, 0.2, 1)
    return 1 + fade * dry * (lip - dark)


def _lighting(rng, cam: Camera, z, theta) -> np.ndarray:
    """Camera lamp: bright near the rim, dark in the distance; a bit brighter on one side."""
    falloff = 1 / (1 + ((z - 0.45) / rng.uniform(2.8, 5.5)).clip(0) ** rng.uniform(2.5, 3.8))
    side = 1 + rng.uniform(0, 0.2) * np.cos(theta - rng.uniform(-np.pi, np.pi))
    yy, xx = np.mgrid[0 : cam.height, 0 : cam.width].astype(np.float32)
    rr = np.hypot((xx - cam.width / 2) / (cam.width / 2), (yy - cam.height / 2) / (cam.height / 2))
    vignette = 1 - rng.uniform(0.15, 0.35) * (rr / 1.42) ** 2
    return (falloff * side * vignette).astype(np.float32)


def _render_pipe(rng, scene: Scene, z, theta) -> np.ndarray:
    """Wall albedo x grain x joints x lamp light, in linear 0..1 RGB; sets ``scene.light``."""
    albedo = _sample_texture(_wall_texture(rng, scene), z, theta)
    # far away the lamp light is dim and the lens blurs: the wall's texture fades to its mean
    fade = np.clip(2.5 / z, 0.25, 1)[..., None]
    albedo = albedo * fade + albedo.mean(axis=(0, 1)) * (1 - fade)
    scene.light = _lighting(rng, scene.camera, z, theta)
    shade = _aggregate(rng, z) * _joints(rng, scene, z, theta) * scene.light
    return albedo * shade[..., None]


# --------------------------------------------------------------------------- defects


def _fill(poly: np.ndarray, h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.asarray(poly, np.int32).reshape(-1, 1, 2)], 1)
    return mask


def _to_polygon(mask: np.ndarray) -> np.ndarray | None:
    """The outline of the largest blob of ``mask`` as an int polygon (N, 2), or None."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    poly = cv2.approxPolyDP(max(contours, key=cv2.contourArea), 0.6, True).reshape(-1, 2)
    return poly if len(poly) >= 3 and cv2.contourArea(poly) >= 6 else None


def _target_area(rng, scene: Scene) -> float:
    """A defect image's total defect area in pixels: a log-uniform share of AREA_RANGE, times the scene's area_scale."""
    lo, hi = AREA_RANGE
    return math.exp(rng.uniform(math.log(lo), math.log(hi))) * scene.area_scale * scene.camera.height * scene.camera.width


def _fit_area(build, target: float, scale: float, lo: float, hi: float, power: float = 0.5):
    """Call ``build(scale) -> mask``, rescaling until the mask's area is near ``target``; (mask, scale)."""
    for _ in range(8):
        mask = build(scale)
        area = int(mask.sum())
        if 0.8 * target <= area <= 1.25 * target:
            break
        scale = float(np.clip(scale * (target / max(area, 1)) ** power, lo, hi))
    return mask, scale


def _wall_colour(rng, pal: Palette, weights=(0.35, 0.3, 0.25, 0.1)) -> np.ndarray:
    """A defect colour drawn from the wall's own palette (wall, alt, stain, grime), so colour alone does not tell."""
    a, b = rng.choice(4, 2, p=weights)
    colour = pal.colours()[a] + (pal.colours()[b] - pal.colours()[a]) * rng.uniform(0, 1)
    return (colour * rng.uniform(0.85, 1.2)).astype(np.float32)


def _shade_relief(height: np.ndarray, scale: float, light=(0.0, -0.45, 1.0)) -> np.ndarray:
    """Lambert shading of a height field lit from the camera (slightly from above)."""
    gx = cv2.Sobel(height, cv2.CV_32F, 1, 0, ksize=3) / 8 * scale
    gy = cv2.Sobel(height, cv2.CV_32F, 0, 1, ksize=3) / 8 * scale
    lx, ly, lz = np.asarray(light) / np.linalg.norm(light)
    return np.clip((-gx * lx - gy * ly + lz) / np.sqrt(gx * gx + gy * gy + 1), 0, 1)


def _paint_lump(rng, img, scene: Scene, mask, light, relief: float, roughness: float, grain: float, colours):
    """Composite a shaded, textured lump (rock, debris, sediment) over ``mask``, in its bounding box.

    ``relief`` is the height of its dome, ``roughness`` that of bumps about ``grain`` pixels wide.
    """
    x, y, bw, bh = cv2.boundingRect(mask)
    pad = 4
    x0, y0 = max(x - pad, 0), max(y - pad, 0)
    x1, y1 = min(x + bw + pad, mask.shape[1]), min(y + bh + pad, mask.shape[0])
    m, view, light = mask[y0:y1, x0:x1], img[y0:y1, x0:x1], np.broadcast_to(light, mask.shape)[y0:y1, x0:x1]
    h, w = m.shape
    dist = cv2.distanceTransform(m, cv2.DIST_L2, 3)
    size = max(float(dist.max()), 1.0)
    height = np.sqrt(dist / size) * relief + roughness * (_noise_image(rng, h, w, grain) + 0.5 * _noise_image(rng, h, w, max(1.2, grain / 3)))
    shade = 0.25 + 0.95 * _shade_relief(cv2.GaussianBlur(height, (0, 0), 0.8), size)
    mottle = 1 + 0.15 * _noise_image(rng, h, w, max(2.0, size / 2)) + 0.12 * _noise_image(rng, h, w, 1.3)
    blend = np.clip(0.5 + 0.6 * _noise_image(rng, h, w, max(2.0, size / 1.5)), 0, 1)[..., None] * rng.uniform(0.2, 0.7)
    first, second = colours
    lump = (first + (second - first) * blend) * (shade * mottle * light)[..., None]
    # a contact shadow on the floor just below and around the lump
    ring = np.zeros(m.shape, np.float32)
    ring[2:] = cv2.dilate(m, np.ones((3, 3), np.uint8))[:-2]
    view *= (1 - 0.5 * cv2.GaussianBlur(ring, (0, 0), 1.5) * (1 - m))[..., None]
    view[m.astype(bool)] = lump[m.astype(bool)]


def _blob(rng, centre, rx, ry, tilt=0.0, n=48, rough=0.3) -> np.ndarray:
    """An irregular closed outline: a tilted ellipse with random low harmonics on its radius."""
    phi = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = np.ones(n)
    for k in range(2, 7):
        radius += rng.uniform(0, rough / k**0.7) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    radius *= np.exp(rng.normal(0, 0.04, n))
    x, y = rx * radius * np.cos(phi), ry * radius * np.sin(phi)
    c, s = math.cos(tilt), math.sin(tilt)
    return np.stack([centre[0] + c * x - s * y, centre[1] + s * x + c * y], 1)


def _obstacles(rng, img, scene: Scene) -> list[np.ndarray]:
    """1-3 rocks or debris heaps lying on the floor, lit from the camera."""
    cam = scene.camera
    h, w = cam.height, cam.width
    n = int(rng.choice([1, 1, 2, 2, 3]))
    polys = []
    for area in rng.dirichlet(np.full(n, 2.0)) * _target_area(rng, scene):
        area = max(area, 0.006 * scene.area_scale * h * w)
        aspect = rng.uniform(1.0, 2.2)
        r = math.sqrt(area / (math.pi * 0.7))
        rx, ry = r * math.sqrt(aspect), r / math.sqrt(aspect)
        # farther objects look smaller: choose the depth from the size, then a spot on the floor
        z = float(np.clip(cam.r0 * rng.uniform(0.15, 0.3) / ry, 0.7, 8.0))
        x, y = cam.point(_BOTTOM + rng.uniform(-1.3, 1.3) * scene.water_halfwidth, z)
        y = float(np.clip(y - 0.5 * ry, cam.v[1] + 0.3 * ry, h - 0.4 * ry))
        x = float(np.clip(x, 0.3 * rx, w - 0.3 * rx))
        mask = np.zeros((h, w), np.uint8)
        for k in range(int(rng.integers(1, 5))):  # a heap of one to four overlapping pieces
            off, s = (rng.normal(0, 0.45, 2) * (rx, ry), rng.uniform(0.35, 0.75)) if k else (np.zeros(2), 1.0)
            tilt = rng.normal(0, 0.35)
            outline = _blob(rng, (x + off[0], y + off[1]), rx * s, ry * s, tilt, rough=rng.uniform(0.25, 0.6))
            cv2.fillPoly(mask, [np.round(outline).astype(np.int32)], 1)
        poly = _to_polygon(mask)
        if poly is None:
            continue
        mask = _fill(poly, h, w)
        ys, xs = np.nonzero(mask)
        light = float(scene.light[int(ys.max()), int(np.median(xs))]) * rng.uniform(1.0, 1.5)
        colours = _wall_colour(rng, scene.palette), _wall_colour(rng, scene.palette)
        _paint_lump(rng, img, scene, mask, light, rng.uniform(0.6, 1.2), rng.uniform(0.02, 0.06), max(1.5, r / 5), colours)
        polys.append(poly)
    return polys


def _smooth_curve(rng, x: np.ndarray, knots: int) -> np.ndarray:
    """A smooth random function of ``x`` (any range), unit amplitude."""
    values = cv2.resize(rng.standard_normal((1, knots)).astype(np.float32), (256, 1), interpolation=cv2.INTER_CUBIC)[0]
    return np.interp(x, np.linspace(float(x.min()), float(x.max()) + 1e-6, 256), values)


def _deposition(rng, img, scene: Scene, z, theta) -> list[np.ndarray]:
    """An irregular sediment band along the invert, thinning with depth."""
    cam = scene.camera
    h, w = cam.height, cam.width
    lz = np.log(z)
    near, far = math.log(rng.uniform(0.5, 1.4)), math.log(rng.uniform(3.0, 12.0))
    centre = _BOTTOM + rng.uniform(-0.5, 0.5) * scene.water_halfwidth + 0.12 * _smooth_curve(rng, lz, 4)
    edge = 1 + rng.uniform(0.1, 0.3) * _smooth_curve(rng, lz, 8) - rng.uniform(0, 0.4) * np.clip((lz - near) / (far - near), 0, 1)
    off = np.abs((theta - centre + np.pi) % (2 * np.pi) - np.pi)
    along = (lz > near) & (lz < far)
    ragged = 1 + 0.1 * _noise_image(rng, h, w, max(2.0, w / 30)) + 0.04 * _noise_image(rng, h, w, max(1.5, w / 90))

    def build(half):
        return (along & (off < np.clip(half * edge, 0.02, 1.4) * ragged)).astype(np.uint8)

    poly = _to_polygon(_fit_area(build, _target_area(rng, scene), rng.uniform(0.2, 0.5), 0.02, 1.4, 1.0)[0])
    if poly is None:
        return []
    mask = _fill(poly, h, w)
    light = scene.light * rng.uniform(1.0, 1.3)
    sediment = (0.15, 0.25, 0.35, 0.25)
    colours = _wall_colour(rng, scene.palette, sediment), _wall_colour(rng, scene.palette, sediment)
    _paint_lump(rng, img, scene, mask, light, rng.uniform(0.15, 0.4), rng.uniform(0.01, 0.03), max(1.5, w / 100), colours)
    return [poly]


def _deformation_plan(rng, scene: Scene, z, theta):
    """A wall patch pushed inwards: its polygon and a smooth bump (0..1) inside it."""
    h, w = scene.camera.height, scene.camera.width
    theta0 = _BOTTOM + math.copysign(rng.uniform(scene.water_halfwidth + 0.5, np.pi), rng.uniform(-1, 1))
    lz0, aspect = math.log(rng.uniform(1.3, 3.0)), rng.uniform(0.5, 1.5)
    dth = (theta - theta0 + np.pi) % (2 * np.pi) - np.pi
    dl = (np.log(z) - lz0) * aspect + rng.uniform(-0.7, 0.7) * dth  # a slanted patch
    ang = np.arctan2(dl, dth)
    rad = 1 + sum(rng.uniform(0, 0.22) * np.cos(k * ang + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    r2 = (dth * dth + dl * dl) / (rad * rad)

    def build(size):
        return (r2 < size * size).astype(np.uint8)

    poly = _to_polygon(_fit_area(build, _target_area(rng, scene), rng.uniform(0.3, 0.6), 0.05, 1.6)[0])
    if poly is None:
        return None, None
    mask = _fill(poly, h, w)
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    bump = np.clip(dist / (0.45 * max(float(dist.max()), 1.0)), 0, 1)
    return poly, (bump * bump * (3 - 2 * bump)).astype(np.float32)


def _push_inwards(cam: Camera, bump, xx, yy, strength: float):
    """Sample the wall from farther out inside the bump, so its content moves towards v."""
    scale = 1 + strength * bump
    return cam.v[0] + (xx - cam.v[0]) * scale, cam.v[1] + (yy - cam.v[1]) * scale


def _paint_deformation(rng, img, scene: Scene, bump):
    """Shade the bulge: its deep side faces the lamp (brighter), its near side falls into shadow."""
    cam = scene.camera
    gy, gx = np.gradient(bump)
    yy, xx = np.mgrid[0 : cam.height, 0 : cam.width].astype(np.float32)
    rx, ry = xx - cam.v[0], yy - cam.v[1]
    size = math.sqrt(max(float((bump > 0).sum()), 1.0))
    radial = (gx * rx + gy * ry) / (np.hypot(rx, ry) + 1e-3) * size * 0.5
    shade = 1 + rng.uniform(0.35, 0.65) * np.tanh(radial) + rng.uniform(0.1, 0.25) * bump
    crease = np.exp(-(((bump - 0.03) / 0.05) ** 2)) * (bump > 0) * rng.uniform(0.05, 0.2)  # buckled edge
    img *= np.clip(shade - crease, 0.4, 2.0)[..., None]


def _disconnect_plan(rng, scene: Scene, xx, yy):
    """A joint whose far pipe is shifted sideways: the crescent gap, the far-pipe mask and its offset."""
    cam = scene.camera
    target = _target_area(rng, scene)
    # a big gap needs a near joint: pick the drawn ring closest to a depth that suits the area
    step, phase = scene.joint_spacing, scene.joint_phase
    z_pref = cam.r0 / math.sqrt(target / 0.22) * rng.uniform(0.85, 1.2)
    rings = [phase + k * step for k in range(-4, 12) if 0.9 <= phase + k * step <= 3.5]
    zj = min(rings, key=lambda r: abs(r - z_pref)) if rings else float(np.clip(z_pref, 1.0, 3.0))
    scene.joint_phase = zj  # the drawn rings line up with the broken joint
    t = 1 / zj
    centre, radius = cam.v + t * cam.e, t * cam.r0
    direction = rng.uniform(-np.pi, np.pi)
    unit = np.array([math.cos(direction), math.sin(direction)])
    near = np.hypot(xx - centre[0], yy - centre[1]) <= radius
    # the far pipe's socket is a little wider, so the gap shows only over +-arc opposite the shift
    cos_arc = math.cos(rng.uniform(0.9, 1.6))

    def far_pipe(shift):
        c = centre + shift * unit
        return np.hypot(xx - c[0], yy - c[1]) <= radius + shift * cos_arc

    def build(shift):
        return (near & ~far_pipe(shift)).astype(np.uint8)

    limit = max(2.0, 0.5 * radius)
    gap, shift = _fit_area(build, target, float(np.clip(target / radius, 2.0, limit)), 2.0, limit, 1.0)
    poly = _to_polygon(gap)
    if poly is None:
        return None, None, None
    # the far pipe's rings are centred at v + (e + shift * zj * unit) / z, so they meet this one at zj
    return poly, near & far_pipe(shift), cam.e + shift * zj * unit


def _paint_disconnect(rng, img, scene: Scene, mask):
    """Fill the gap with the dim, dirty void behind the joint."""
    h, w = mask.shape
    soil = _wall_colour(rng, scene.palette) * rng.uniform(0.2, 0.5)
    tex = 1 + 0.15 * _noise_image(rng, h, w, max(2.0, w / 40)) + 0.1 * _noise_image(rng, h, w, 1.5)
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    deep = np.clip(dist / max(float(dist.max()), 1.0), 0, 1)
    void = soil * (scene.light * tex * (1 - 0.6 * deep) * rng.uniform(0.6, 1.2))[..., None]
    m = mask.astype(bool)
    img[m] = void[m]


# --------------------------------------------------------------------------- camera effects


def _burn_in(rng, img):
    """Blurred, pixelated text bars like the date/distance lines CCTV systems burn into frames."""
    h, w = img.shape[:2]
    bars = np.zeros((h, w), np.float32)
    line = max(2, round(0.035 * h))

    def bar(y, x, length):
        bars[int(y * h) : int(y * h) + line, int(x * w) : int(min(x + length, 0.97) * w)] = 1

    for k in range(int(rng.integers(1, 4))):
        bar(0.03 + 0.05 * k, 0.05, rng.uniform(0.1, 0.3))
    if rng.random() < 0.6:
        bar(0.03, rng.uniform(0.45, 0.65), rng.uniform(0.1, 0.3))
    if rng.random() < 0.6:
        bar(rng.uniform(0.86, 0.92), 0.05, rng.uniform(0.08, 0.2))
    # the glyphs, mosaicked and smeared as anonymised burn-ins are
    cells = cv2.resize(rng.uniform(0.75, 1.1, (h // line + 1, w // line + 1)).astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST)
    bars = cv2.GaussianBlur(bars * cells, (0, 0), max(0.6, line / 5))
    alpha = np.clip(bars, 0, 1)[..., None] * rng.uniform(0.7, 0.9)
    return img * (1 - alpha) + rng.uniform(0.45, 0.7) * alpha


def _camera_effects(rng, img: np.ndarray) -> np.ndarray:
    """Auto exposure, colour cast, lens blur, burn-ins, sensor noise, JPEG round trip -> uint8 RGB."""
    h, w = img.shape[:2]
    img = img * (rng.uniform(0.24, 0.34) / max(float(np.median(img[::3, ::3])), 1e-3))
    cast = 1 + rng.normal(0, 0.012, 3) + rng.uniform(-0.02, 0.14) * np.array([1.0, 0.0, -1.0])
    img = img * cast.astype(np.float32)
    if rng.random() < 0.08:  # a washed-out, greyish camera
        grey = img.mean(axis=2, keepdims=True)
        img = grey + (img - grey) * rng.uniform(0.2, 0.6)
    img = img / (1 + 0.5 * np.maximum(img - 0.65, 0))  # soft highlight roll-off
    black = rng.uniform(0.06, 0.13)
    img = black + (1 - black) * img
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), rng.uniform(0.5, 1.0) * max(1.0, w / 256))
    if rng.random() < 0.75:
        img = _burn_in(rng, img)
    grain = rng.uniform(0.008, 0.03)
    noise = (rng.random((h, w, 1), np.float32) - 0.5) * (3.5 * grain) + (rng.random((h, w, 3), np.float32) - 0.5) * grain
    img = img + noise
    rgb = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    _, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 80))])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()


# --------------------------------------------------------------------------- one frame


@dataclass
class Frame:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    polygons: list[np.ndarray]  # one (N, 2) int polygon per defect instance
    truth: np.ndarray  # (H, W) uint8 0/1, the union of the polygons
    boxes: np.ndarray  # (H, W) uint8 0/1, the union of the instances' filled bounding boxes


def render_frame(defect: str, width: int, height: int, seed: int, index: int, area_scale: float = 1.0) -> Frame:
    """Frame ``index`` of a dataset; depends only on (defect, size, seed, index, area_scale), not on the count.
    ``area_scale`` scales the defects' area (the same random draws: the same scenes, smaller defects)."""
    if defect not in DEFECTS:
        raise BSSError(f"unknown defect {defect!r}; choose one of {', '.join(DEFECTS)}.")
    rng = np.random.default_rng([int(seed), int(index), DEFECTS.index(defect)])
    scene = _scene(rng, width, height)
    scene.area_scale = float(area_scale)
    cam = scene.camera
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    z, theta = cam.wall_coords(xx, yy)
    polys: list[np.ndarray] = []
    bump = gap = None
    if rng.random() >= EMPTY_FRACTION:
        if defect == "deformation":
            poly, bump = _deformation_plan(rng, scene, z, theta)
            if poly is not None:
                polys.append(poly)
                z, theta = cam.wall_coords(*_push_inwards(cam, bump, xx, yy, rng.uniform(0.25, 0.5)))
        elif defect == "disconnect":
            poly, far, e_far = _disconnect_plan(rng, scene, xx, yy)
            if poly is not None:
                polys.append(poly)
                gap = _fill(poly, height, width)
                z_far, theta_far = cam.wall_coords(xx, yy, e_far)
                z, theta = np.where(far, z_far, z), np.where(far, theta_far, theta)
        img = _render_pipe(rng, scene, z, theta)
        if defect == "obstacle":
            polys += _obstacles(rng, img, scene)
        elif defect == "deposition":
            polys += _deposition(rng, img, scene, z, theta)
        elif bump is not None:
            _paint_deformation(rng, img, scene, bump)
        elif gap is not None:
            _paint_disconnect(rng, img, scene, gap)
    else:
        img = _render_pipe(rng, scene, z, theta)
    image = _camera_effects(rng, img)
    truth = np.zeros((height, width), np.uint8)
    boxes = np.zeros((height, width), np.uint8)
    for poly in polys:
        instance = _fill(poly, height, width)
        truth |= instance
        x, y, bw, bh = cv2.boundingRect(instance)
        boxes[y : y + bh, x : x + bw] = 1
    return Frame(image, polys, truth, boxes)


# --------------------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class SynthConfig:
    """What to generate; :func:`check_config` says what is wrong with a bad one."""

    name: str = "obstacle"
    defect: str = "obstacle"
    count: int = 1000
    hand_labelled: int = 200
    width: int = 256
    height: int = 192
    seed: int = 0
    # The defects' area as a share of the default's (AREA_RANGE: 3-20 % of a frame with defects):
    # 0.05 gives small objects in a large frame (an obstacle ~1/4.5 the side), thin crescents for
    # disconnect (its gap narrows; the box, spanning the joint's arc, stays large).
    area_scale: float = 1.0


@dataclass
class Report:
    folder: Path
    count: int
    hand_labelled: int
    empty: int
    seconds: float


def check_config(cfg: SynthConfig) -> None:
    if cfg.defect not in DEFECTS:
        raise BSSError(f"unknown defect {cfg.defect!r}; choose one of {', '.join(DEFECTS)}.")
    if not cfg.name or cfg.name != Path(cfg.name).name or cfg.name.startswith("."):
        raise BSSError(f"dataset name {cfg.name!r} must be a plain folder name (no '/', not starting with '.').")
    if cfg.count < 1:
        raise BSSError(f"--count must be at least 1, got {cfg.count}.")
    if cfg.hand_labelled < 0:
        raise BSSError(f"--hand-labelled must be 0 or more, got {cfg.hand_labelled}.")
    if cfg.hand_labelled > cfg.count:
        raise BSSError(f"--hand-labelled {cfg.hand_labelled} exceeds --count {cfg.count}; it must be at most the number of images.")
    if cfg.width <= 0 or cfg.height <= 0:
        raise BSSError(f"--size {cfg.width}x{cfg.height}: width and height must be positive, e.g. 256x192.")
    if cfg.width < MIN_SIDE or cfg.height < MIN_SIDE:
        raise BSSError(f"--size {cfg.width}x{cfg.height} is too small; width and height must each be at least {MIN_SIDE} pixels.")
    if not 0 < cfg.area_scale <= MAX_AREA_SCALE:
        raise BSSError(f"--area-scale {cfg.area_scale:g} must be above 0 and at most {MAX_AREA_SCALE:g} (1: the default defect sizes; 0.05: small defects).")
    if cfg.width > 4096 or cfg.height > 4096:
        raise BSSError(f"--size {cfg.width}x{cfg.height} is too large; keep each side at most 4096 pixels.")


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already


def _write_frame(job) -> tuple[str, list[list[list[int]]]]:
    """Render frame ``index`` and write its image, box mask and truth; return (stem, polygons)."""
    folder, defect, width, height, seed, index, area_scale = job
    frame = render_frame(defect, width, height, seed, index, area_scale)
    stem = f"syn_{index:05d}"
    folder = Path(folder)
    # PNG at zlib level 1: lossless like write_image, but several times faster than level 6
    cv2.imwrite(str(folder / "images" / f"{stem}.png"), frame.image[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
    write_mask(folder / "masks" / f"{stem}.png", frame.boxes)
    write_mask(folder / "truth" / f"{stem}.png", frame.truth)
    return stem, [p.tolist() for p in frame.polygons]


def _pick_labelled(seed: int, results, wanted: int) -> set[str]:
    """``wanted`` stems drawn by ``seed`` among the frames that have a defect (a label needs a region)."""
    with_defect = [stem for stem, polys in results if polys]
    if wanted > len(with_defect):
        raise BSSError(
            f"--hand-labelled {wanted} exceeds the {len(with_defect)} images that have a defect "
            f"(about {EMPTY_FRACTION:.0%} of images are defect-free and cannot carry a hand label); lower it or raise --count."
        )
    order = np.random.default_rng([int(seed), 2**31 - 1]).permutation(len(with_defect))
    return {with_defect[i] for i in order[:wanted]}


def generate_dataset(cfg: SynthConfig, data_root: str | Path = "datasets", overwrite: bool = False, workers: int = 2) -> Report:
    """Write dataset ``cfg.name`` under ``data_root`` atomically; raise BSSError on bad input."""
    check_config(cfg)
    start = time.perf_counter()
    target = Path(data_root) / cfg.name
    with atomic_folder(target, overwrite) as tmp:
        for sub in ("images", "masks", "truth"):
            (tmp / sub).mkdir()
        jobs = [(str(tmp), cfg.defect, cfg.width, cfg.height, cfg.seed, i, cfg.area_scale) for i in range(cfg.count)]
        if workers > 1 and cfg.count >= 8:
            with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
                results = pool.map(_write_frame, jobs, chunksize=max(1, min(32, cfg.count // (4 * workers))))
        else:
            results = [_write_frame(job) for job in jobs]
        labelled = _pick_labelled(cfg.seed, results, cfg.hand_labelled)
        rows = {}
        for stem, polys in results:
            shapes = [{"name": "polygon", "all_points_x": [p[0] for p in poly], "all_points_y": [p[1] for p in poly]} for poly in polys]
            rows[f"{stem}.png"] = shapes if stem in labelled else []
        write_via_csv(tmp / "labels.csv", rows)
        params = {
            "generator": "bss.data.synthetic",
            "name": cfg.name,
            "version": VERSION,
            "defect": cfg.defect,
            "count": cfg.count,
            "size": [cfg.width, cfg.height],
            "seed": cfg.seed,
            "hand_labelled": cfg.hand_labelled,
            **({"area_scale": cfg.area_scale} if cfg.area_scale != 1 else {}),
        }
        (tmp / "generator.json").write_text(json.dumps(params, indent=2) + "\n")
    empty = sum(1 for _, polys in results if not polys)
    return Report(target, cfg.count, len(labelled), empty, time.perf_counter() - start)
