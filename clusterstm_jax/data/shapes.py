"""The procedural "shapes" video-text generator (pure numpy, deterministic from a seed).

Owns: what a synthetic clip is (1-3 coloured shapes moving over a textured background; in
the distractor variant 1-2 transient shapes that no text mentions; in the transient variant 1-2
transient "stains", patches of the background a little brighter or darker), how it
is rendered (frames + per-frame object label maps, vectorised numpy, ~0.5 ms a clip), the text
that goes with it (caption, question-answer pairs), the splits (eval captions unique, motion-only
pairs) and the stored bytes of a clip (`render_encoded`). The TFDS builder in
`builders/shapes.py` only serialises what this makes.

A clip is sampled as a `Scene` (all random draws) and then rendered deterministically, so the
text of a split can be made without rendering (the tokenizer is trained that way) and a
motion-only partner is the same scene with other motions.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator

import numpy as np

from clusterstm_jax.data import video_io

COLOURS = {
    "red": (220, 38, 38), "orange": (245, 140, 20), "yellow": (240, 222, 40),
    "green": (40, 190, 60), "cyan": (40, 215, 225), "blue": (45, 95, 245),
    "purple": (155, 60, 225), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Half-extent in pixels for a 64-pixel frame; scaled with the frame size.
SIZES = {"small": 5.0, "medium": 8.0, "large": 11.5}
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
_FINITE = {"left": "moves left", "right": "moves right", "up": "moves up", "down": "moves down",
           "still": "stays still"}
_GERUND = {"left": "moving left", "right": "moving right", "up": "moving up",
           "down": "moving down", "still": "staying still"}
COUNT_WORDS = ("zero", "one", "two", "three")
# Every answer a question can have: a QA head can rank this fixed list.
ANSWER_VOCAB = tuple(COLOURS) + SHAPES + tuple(SIZES) + tuple(MOTIONS) + COUNT_WORDS
BACKGROUNDS = ("noise", "stripes", "checker")
NUM_TEMPLATES = 4
EVAL_SPLITS = ("val", "validation", "test")
_COLOUR_NAMES, _SIZE_NAMES, _MOTION_NAMES = list(COLOURS), list(SIZES), list(MOTIONS)
_RADII = list(SIZES.values())
_RAMP = np.linspace(0, 1, 256, dtype=np.float32)
_SPLIT_CODES = {"train": 0, "val": 1, "validation": 1, "test": 2}
# Label-map value of distractor pixels: above any object id, so object statistics ignore them.
DISTRACTOR_LABEL = 255
MAX_DISTRACTOR_FRAMES = 2
# Stains (the transient variant): the background inside a circle of radius STAIN_RADII (pixels
# at 64 px) is scaled in brightness by 1 +- STAIN_SHADE for 1-2 frames. Modest on purpose: the
# stain should look like background to the teacher (join a background cluster) yet not match
# any token of the other frames (low temporal density). Measured, it does neither enough to
# test the pick (docs/results.md, "Transient stains").
STAIN_SHADE = (0.25, 0.35)
STAIN_RADII = (6.0, 10.0)


@dataclasses.dataclass(frozen=True)
class Obj:
  colour: str
  size: str
  shape: str
  motion: str
  cx: float  # centre at mid-clip; trajectories are symmetric around it
  cy: float
  tint: tuple[int, int, int]  # small colour jitter so colours are not exact constants


@dataclasses.dataclass(frozen=True)
class Distractor:
  """A static shape on screen in frames first..first+frames-1 only (1 or 2), in no text."""
  colour: str
  size: str
  shape: str
  cx: float
  cy: float
  first: int
  frames: int


@dataclasses.dataclass(frozen=True)
class Stain:
  """The background inside a circle, times `gain`, in frames first..first+frames-1 only (1 or
  2); in no text, labelled DISTRACTOR_LABEL."""
  radius: float  # pixels at 64 px, scaled with the frame size
  cx: float
  cy: float
  gain: float
  first: int
  frames: int


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[Obj, ...]  # draw order: later objects occlude earlier ones
  travel: float  # pixels covered by a moving object over the whole clip
  bg_kind: str
  bg_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
  bg_param: tuple[float, float, float]  # kind-specific: period/angle/phase, cell/offsets
  bg_noise: np.ndarray  # low-res noise grid, used by the "noise" kind
  template: int
  order: tuple[int, ...]  # object order in the caption (not draw order)
  num_frames: int
  size: int
  distractors: tuple[Distractor, ...] = ()  # drawn under the objects; captions ignore them
  stains: tuple[Stain, ...] = ()  # on the background, under everything; captions ignore them

  def key(self) -> tuple:
    """What the caption says, order-free: two scenes with one key are indistinguishable in text."""
    return tuple(sorted((o.size, o.colour, o.shape, o.motion) for o in self.objects))


def _muted_colour(h: float, s: float, v: float) -> tuple[int, int, int]:
  """HSV in [0, 1) -> RGB with low saturation and value, so bright shapes always stand out."""
  s, v = 0.05 + 0.3 * s, 0.18 + 0.27 * v
  i, f = int(h * 6) % 6, h * 6 - int(h * 6)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
  return tuple(int(round(c * 255)) for c in rgb)


def _layout(rng: np.random.Generator, radii: list[float], margins: list[float], size: int):
  """Mid-clip centres: the first of 32 random layouts whose objects stand apart, else the best.

  Apart = centre distance >= 0.8 * (r_a + r_b), so every object is mostly visible mid-clip.
  """
  n = len(radii)
  best, best_slack = None, -math.inf
  for cand in rng.random((32, n, 2)).tolist():
    pos = [(m + (size - 2 * m) * u, m + (size - 2 * m) * w) for m, (u, w) in zip(margins, cand)]
    slack = min((math.dist(pos[a], pos[b]) - 0.8 * (radii[a] + radii[b])
                 for a in range(n) for b in range(a + 1, n)), default=0.0)
    if slack >= 0:
      return pos
    if slack > best_slack:
      best, best_slack = pos, slack
  return best


def sample_scene(rng: np.random.Generator, num_frames: int = 8, size: int = 64,
                 num_objects: int | None = None) -> Scene:
  """Draws every random choice of one clip (few generator calls: this runs 22k times a build)."""
  if num_frames < 2 or size < 32:
    raise ValueError(f"need num_frames >= 2 and size >= 32, got {num_frames}, {size}")
  # u: object count, travel, background kind, 2 muted HSV colours, template.
  u = rng.random(10).tolist()
  n = num_objects or (1 if u[0] < 0.2 else 2 if u[0] < 0.6 else 3)
  colours = rng.permutation(len(_COLOUR_NAMES))[:n].tolist()  # distinct: a colour names one object
  attrs = rng.integers(0, [len(SIZES), len(SHAPES), len(MOTIONS)], size=(n, 3)).tolist()
  travel = (0.26 + 0.1 * u[1]) * size
  radii = [_RADII[a[0]] * size / 64.0 for a in attrs]
  # Any motion must keep the object inside the frame (motion-only partners reuse positions).
  pos = _layout(rng, radii, [r + travel / 2 + 1 for r in radii], size)
  tints = rng.integers(-12, 13, size=(n, 3)).tolist()
  objects = tuple(
      Obj(_COLOUR_NAMES[c], _SIZE_NAMES[a[0]], SHAPES[a[1]], _MOTION_NAMES[a[2]], x, y, tuple(t))
      for c, a, (x, y), t in zip(colours, attrs, pos, tints))
  return Scene(
      objects, travel, BACKGROUNDS[int(u[2] * len(BACKGROUNDS))],
      (_muted_colour(*u[3:6]), _muted_colour(*u[6:9])), tuple(rng.random(3).tolist()),
      rng.random((6, 6), dtype=np.float32), int(u[9] * NUM_TEMPLATES),
      tuple(rng.permutation(n).tolist()), num_frames, size)


def add_distractors(scene: Scene, rng: np.random.Generator, max_count: int) -> Scene:
  """`scene` with 1..max_count distractors: colours that no object of the clip has (so the text
  stays unambiguous), any shape and size, anywhere, in 1-2 consecutive frames."""
  n = int(rng.integers(1, max_count + 1))
  used = {o.colour for o in scene.objects}
  free = [c for c in _COLOUR_NAMES if c not in used]
  colours = rng.permutation(len(free))[:n].tolist()
  attrs = rng.integers(0, [len(SIZES), len(SHAPES), MAX_DISTRACTOR_FRAMES], size=(n, 3)).tolist()
  u = rng.random((n, 3)).tolist()
  out = []
  for c, (size_i, shape_i, extra), (ux, uy, ut) in zip(colours, attrs, u):
    frames = 1 + extra
    r = _RADII[size_i] * scene.size / 64.0
    span = scene.size - 2 * (r + 1)
    out.append(Distractor(free[c], _SIZE_NAMES[size_i], SHAPES[shape_i], r + 1 + span * ux,
                          r + 1 + span * uy, int(ut * (scene.num_frames - frames + 1)), frames))
  return dataclasses.replace(scene, distractors=tuple(out))


def add_stains(scene: Scene, rng: np.random.Generator, max_count: int,
               shade: tuple[float, float] = STAIN_SHADE) -> Scene:
  """`scene` with 1..max_count stains: circles of the background, anywhere, brighter or darker by
  a factor 1 +- shade (uniform in the range, either sign), in 1-2 consecutive frames."""
  if max_count < 1:
    raise ValueError(f"stains per clip must be >= 1, got {max_count}")
  if not 0 < shade[0] <= shade[1] < 1:
    raise ValueError(f"stain shade must be a range 0 < lo <= hi < 1, got {shade}")
  n = int(rng.integers(1, max_count + 1))
  u = rng.random((n, 6)).tolist()
  lo_r, hi_r = STAIN_RADII
  out = []
  for ur, ux, uy, us, ug, ut in u:
    frames = 1 + int(us * MAX_DISTRACTOR_FRAMES)
    r = lo_r + (hi_r - lo_r) * ur
    span = scene.size - 2 * (r * scene.size / 64.0 + 1)
    off = r * scene.size / 64.0 + 1
    m = shade[0] + (shade[1] - shade[0]) * (2 * ug % 1.0)  # ug < 0.5: darker, else brighter
    out.append(Stain(r, off + span * ux, off + span * uy, 1 - m if ug < 0.5 else 1 + m,
                     int(ut * (scene.num_frames - frames + 1)), frames))
  return dataclasses.replace(scene, stains=tuple(out))


@functools.lru_cache(maxsize=None)
def _time_grid(num_frames: int) -> np.ndarray:
  return np.linspace(-0.5, 0.5, num_frames, dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _interp_grid(cells: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  u = np.linspace(0, cells - 1, size, dtype=np.float32)
  i0 = np.minimum(u.astype(np.int32), cells - 2)
  return i0, u - i0


def _background(scene: Scene) -> np.ndarray:
  """Static textured background, uint8 [H, W, 3]."""
  s = scene.size
  coords = np.arange(s, dtype=np.float32)
  x, y = coords[None, :], coords[:, None]
  a, b, c = scene.bg_param
  if scene.bg_kind == "stripes":
    period, angle = 5 + 11 * a, np.pi * b
    phase = (x * np.cos(angle) + y * np.sin(angle)) * (2 * np.pi / period) + 6.28 * c
    w = 0.5 + 0.5 * np.sin(phase)
  elif scene.bg_kind == "checker":
    cell = int(4 + 9 * a)
    ix, iy = np.arange(s) + int(cell * b), np.arange(s) + int(cell * c)
    w = ((ix[None, :] // cell + iy[:, None] // cell) % 2).astype(np.float32)
  else:  # smooth value noise: bilinear upsampling of a coarse grid (compresses well as JPEG)
    g = scene.bg_noise
    i0, f = _interp_grid(g.shape[0], s)
    rows = g[i0] * (1 - f)[:, None] + g[i0 + 1] * f[:, None]
    w = rows[:, i0] * (1 - f)[None] + rows[:, i0 + 1] * f[None]
  # Mix the two colours through a 256-entry table of packed RGBX words: casting or gathering
  # [H, W, 3] arrays directly is several times slower.
  c0, c1 = (np.asarray(col, np.float32) for col in scene.bg_colours)
  lut = np.zeros((256, 4), np.uint8)
  lut[:, :3] = c0 + (c1 - c0) * _RAMP[:, None]
  rgbx = lut.view(np.uint32)[:, 0].take((w * 255 + 0.5).astype(np.intp))  # C-ordered [H, W]
  return np.ascontiguousarray(rgbx.view(np.uint8).reshape(s, s, 4)[..., :3])


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """Pixels inside `shape` of half-extent r, for offsets dx/dy from the centre."""
  ax, ay = np.abs(dx), np.abs(dy)
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    return np.maximum(ax, ay) <= 0.85 * r
  if shape == "diamond":
    return ax + ay <= 1.15 * r
  if shape == "cross":
    arm = 0.36 * r
    return ((ax <= r) & (ay <= arm)) | ((ay <= r) & (ax <= arm))
  if shape == "triangle":  # pointing up, apex at -r, base at +0.8r
    return (dy <= 0.8 * r) & (ax <= 0.6 * (dy + r))
  raise ValueError(f"unknown shape {shape!r}")


def trajectory(scene: Scene, obj: Obj) -> tuple[np.ndarray, np.ndarray]:
  """Centre (x, y) per frame: linear motion, symmetric around the mid-clip centre."""
  t = _time_grid(scene.num_frames)
  mx, my = MOTIONS[obj.motion]
  return obj.cx + mx * scene.travel * t, obj.cy + my * scene.travel * t


def _inside(s: int, t: np.ndarray, cx: np.ndarray, cy: np.ndarray, shape: str,
            r: float) -> np.ndarray:
  """Flat pixel indices (into [T*H*W]) of `shape` (half-extent r) centred at (cx[i], cy[i]) in
  frame t[i], for every i."""
  # Only a small window around the object in each frame is tested, not the whole frame.
  win = int(np.ceil(2 * r)) + 2
  x0 = np.minimum(np.maximum((cx - r).astype(np.intp) - 1, 0), s - win)  # cx - r > 0
  y0 = np.minimum(np.maximum((cy - r).astype(np.intp) - 1, 0), s - win)
  u = np.arange(win, dtype=np.intp)
  xs, ys = x0[:, None] + u, y0[:, None] + u  # [T, win] pixel columns / rows
  m = _shape_mask(shape, (xs + 0.5 - cx[:, None])[:, None, :],
                  (ys + 0.5 - cy[:, None])[:, :, None], r)  # [T, win, win]
  return ((t * (s * s))[:, None, None] + ys[:, :, None] * s + xs[:, None, :])[m]


def _paint(pixels: np.ndarray, labels: np.ndarray, s: int, t: np.ndarray, cx: np.ndarray,
           cy: np.ndarray, shape: str, r: float, rgb: list[int], label: int) -> None:
  """Draws `shape` (half-extent r) centred at (cx[i], cy[i]) into frame t[i], for every i."""
  flat = _inside(s, t, cx, cy, shape, r)
  labels[flat] = label  # later objects overwrite earlier ones: occlusion
  pixels[flat] = rgb


def render_scene(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
  """Frames uint8 [T, H, W, 3] and label maps uint8 [T, H, W] (0 = background, k = k-th drawn
  object, DISTRACTOR_LABEL = a distractor or a stain; stains change the background first,
  then distractors are drawn, then the objects over both)."""
  s, n_t = scene.size, scene.num_frames
  labels = np.zeros(n_t * s * s, np.uint8)
  frames = np.broadcast_to(_background(scene), (n_t, s, s, 3)).copy()
  pixels = frames.reshape(-1, 3)  # a view: scattering into it draws into frames
  for st in scene.stains:
    t = np.arange(st.first, st.first + st.frames, dtype=np.intp)
    pos = np.full(st.frames, st.cx, np.float32), np.full(st.frames, st.cy, np.float32)
    flat = _inside(s, t, *pos, "circle", st.radius * s / 64.0)
    pixels[flat] = np.clip(pixels[flat] * np.float32(st.gain) + 0.5, 0, 255).astype(np.uint8)
    labels[flat] = DISTRACTOR_LABEL
  for d in scene.distractors:
    t = np.arange(d.first, d.first + d.frames, dtype=np.intp)
    pos = np.full(d.frames, d.cx, np.float32), np.full(d.frames, d.cy, np.float32)
    _paint(pixels, labels, s, t, *pos, d.shape, SIZES[d.size] * s / 64.0, list(COLOURS[d.colour]),
           DISTRACTOR_LABEL)
  t_all = np.arange(n_t, dtype=np.intp)
  for k, obj in enumerate(scene.objects):
    cx, cy = trajectory(scene, obj)
    _paint(pixels, labels, s, t_all, cx, cy, obj.shape, SIZES[obj.size] * s / 64.0,
           [min(255, max(0, c + d)) for c, d in zip(COLOURS[obj.colour], obj.tint)], k + 1)
  return frames, labels.reshape(n_t, s, s)


def _join(parts: list[str]) -> str:
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
  """English caption naming size, colour, shape and motion of every object."""
  objs = [scene.objects[i] for i in scene.order]
  finite = [f"a {o.size} {o.colour} {o.shape} {_FINITE[o.motion]}" for o in objs]
  gerund = [f"a {o.size} {o.colour} {o.shape} {_GERUND[o.motion]}" for o in objs]
  n = len(objs)
  if scene.template == 0:
    return _join(finite)
  if scene.template == 1:
    return f"{COUNT_WORDS[n]} object{'s' if n > 1 else ''}: " + _join(gerund)
  if scene.template == 2:
    return "we see " + _join(gerund)
  return "a video of " + _join(gerund)


def questions(scene: Scene) -> list[tuple[str, str]]:
  """Unambiguous question-answer pairs about colour, shape, size, direction and count."""
  objs = scene.objects
  qa = [("how many shapes are there?", COUNT_WORDS[len(objs)]),
        ("how many shapes are moving?", COUNT_WORDS[sum(o.motion != "still" for o in objs)])]
  for o in objs:  # colours are distinct within a clip, so a colour names one object
    qa.append((f"what shape is the {o.colour} object?", o.shape))
    qa.append((f"what size is the {o.colour} {o.shape}?", o.size))
    qa.append((f"which way is the {o.colour} {o.shape} moving?", o.motion))
  for o in objs:
    if sum(p.motion == o.motion for p in objs) == 1:
      what = "that stays still" if o.motion == "still" else f"moving {o.motion}"
      qa.append((f"what colour is the shape {what}?", o.colour))
    if sum(p.shape == o.shape for p in objs) == 1:
      qa.append((f"what colour is the {o.shape}?", o.colour))
  return qa


def describe(scene: Scene) -> dict:
  """The text and metadata of a scene (no pixels)."""
  qa = questions(scene)
  objs = scene.objects  # draw order: objects[k] has label k + 1
  return {
      "caption": caption(scene),
      "questions": [q for q, _ in qa],
      "answers": [a for _, a in qa],
      "objects": {"colour": [o.colour for o in objs], "size": [o.size for o in objs],
                  "shape": [o.shape for o in objs], "motion": [o.motion for o in objs]},
  }


def generate_clip(rng: np.random.Generator, num_frames: int = 8, size: int = 64) -> dict:
  """One clip: frames, labels, caption, questions/answers and object metadata."""
  scene = sample_scene(rng, num_frames, size)
  frames, labels = render_scene(scene)
  return {"frames": frames, "labels": labels, **describe(scene)}


def _motion_partner(scene: Scene, rng: np.random.Generator) -> Scene:
  """Same objects, positions, background and caption template; other motions."""
  while True:
    motions = rng.integers(0, len(MOTIONS), size=len(scene.objects))
    objs = tuple(dataclasses.replace(o, motion=_MOTION_NAMES[m])
                 for o, m in zip(scene.objects, motions))
    if any(a.motion != b.motion for a, b in zip(objs, scene.objects)):
      return dataclasses.replace(scene, objects=objs)


def split_rng(split: str, seed: int) -> np.random.Generator:
  """Independent streams per split (SeedSequence entropy [seed, split code])."""
  if split not in _SPLIT_CODES:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_CODES)}")
  return np.random.default_rng([seed, _SPLIT_CODES[split]])


def split_scenes(split: str, num_examples: int, seed: int, *, num_frames: int = 8, size: int = 64,
                 pair_fraction: float = 0.5, distractors: int = 0,
                 stains: int = 0) -> Iterator[tuple[int, int, Scene]]:
  """Yields (id, pair, scene) for ids 0..n-1; `pair` is the id of the motion-only partner or -1.

  Eval splits have unique content keys, hence unique captions: no two clips fit one text.
  Partners have consecutive ids. With distractors > 0, every clip gets 1..distractors transient
  distractors from a stream of their own: the scenes, texts and ids are those of
  distractors = 0, which stays exactly as it was. With stains > 0, likewise 1..stains transient
  stains (add_stains), from a third stream.
  """
  if distractors < 0 or stains < 0:
    raise ValueError(f"distractors and stains per clip must be >= 0, got {distractors}, {stains}")
  rng = split_rng(split, seed)
  distractor_rng = np.random.default_rng([seed, _SPLIT_CODES[split], 1]) if distractors else None
  stain_rng = np.random.default_rng([seed, _SPLIT_CODES[split], 2]) if stains else None
  unique = split in EVAL_SPLITS
  seen_keys, seen_caps = set(), set()
  i = 0
  while i < num_examples:
    scene = sample_scene(rng, num_frames, size)
    group = [scene]
    if i + 1 < num_examples and rng.uniform() < pair_fraction:
      for _ in range(20):  # a partner whose key is new; give up (unpaired) if none comes
        partner = _motion_partner(scene, rng)
        if partner.key() != scene.key() and not (unique and partner.key() in seen_keys):
          group.append(partner)
          break
    if unique and scene.key() in seen_keys:
      continue
    for j, sc in enumerate(group):
      if unique:
        cap = caption(sc)
        assert sc.key() not in seen_keys and cap not in seen_caps, cap
        seen_keys.add(sc.key())
        seen_caps.add(cap)
      if distractor_rng is not None:
        sc = add_distractors(sc, distractor_rng, distractors)
      if stain_rng is not None:
        sc = add_stains(sc, stain_rng, stains)
      yield i + j, ((i + 1 - j) if len(group) == 2 else -1), sc
    i += len(group)


def generate_split(split: str, num_examples: int, seed: int, *, num_frames: int = 8,
                   size: int = 64, pair_fraction: float = 0.5, distractors: int = 0,
                   stains: int = 0, render: bool = True) -> Iterator[dict]:
  """Clips of a split as dicts (see split_scenes) with `id` and `pair` added.

  With render=False only text and metadata are made, from the same random stream.
  """
  for i, pair, scene in split_scenes(split, num_examples, seed, num_frames=num_frames, size=size,
                                     pair_fraction=pair_fraction, distractors=distractors,
                                     stains=stains):
    ex = describe(scene)
    if render:
      ex["frames"], ex["labels"] = render_scene(scene)
    ex["id"], ex["pair"] = i, pair
    yield ex


def render_encoded(scene: Scene, jpeg_quality: int = 90) -> tuple[list[bytes], bytes]:
  """Stored form of a clip: one JPEG per frame and the PNG strip of its label maps."""
  frames, labels = render_scene(scene)
  return ([video_io.encode_jpeg(f, jpeg_quality) for f in frames],
          video_io.encode_label_strip(labels))
