"""Coloured shapes with captions: the embedded default data set (no download, deterministic).

Each example is an `image_size` x `image_size` RGB uint8 image of one coloured shape on a muted,
textured background, and an English caption describing it in varied words.

Classes. 8 colours x 6 shapes = 48 classes, class = colour * NUM_SHAPES + shape, named by the
canonical words ("red circle", ..., "cyan ring"). An image also has a size (small / medium /
large), a position on a 3 x 3 grid (with jitter; the shape always lies fully inside the image)
and a background (noise, stripes, checkerboard or gradient in dark, low-saturation tones).

Captions are phrased from templates with synonyms for colours ("red", "crimson", "scarlet"),
shapes ("circle", "disk", "round dot"), sizes, positions ("in the top left", "near the upper left
corner") and backgrounds (often omitted). The canonical colour and shape words are used half of
the time each, so zero-shot prompts built from `class_names` and `ZEROSHOT_TEMPLATES` are in
distribution. A caption names exactly one colour and one shape.

Held-out combinations. The 48 combinations are ranked along wrapped diagonals of the colour x
shape table: (c, (c + d) % NUM_SHAPES) for d = 0, 1, ... and c = 0..7 within each d. The first
`num_heldout` of them never occur in training. Each diagonal takes one shape per colour and every
shape at least once, so up to MAX_HELDOUT = 40 (five diagonals) leaves every colour and every
shape in training with other partners. With num_heldout = 10 the held-out classes are:
red circle, green square, blue triangle, yellow cross, purple diamond, orange ring,
white circle, cyan square, red square, green triangle.

Determinism. Example i of a stream is a pure function of (seed, stream, i): its random numbers
come from a Philox generator keyed by (seed, stream) with counter i, so any slice of the training
stream can be regenerated without iterator state (exact resume). Training examples use stream
TRAIN_STREAM over indices 0, 1, ...; evaluation examples use EVAL_STREAM, disjoint from training.
"""
import math
import re
from typing import Any, Sequence

import numpy as np

# --- The vocabulary of the data set. -------------------------------------------------------------

COLOURS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange', 'white', 'cyan')
COLOUR_RGB = np.array([
    (220, 30, 30),    # red
    (30, 185, 45),    # green
    (40, 80, 235),    # blue
    (245, 220, 25),   # yellow
    (155, 45, 205),   # purple
    (255, 135, 0),    # orange
    (245, 245, 245),  # white
    (25, 225, 225),   # cyan
], dtype=np.float32)
# Synonyms: the canonical word first.
COLOUR_SYNONYMS = {
    'red': ('red', 'crimson', 'scarlet'),
    'green': ('green', 'emerald', 'lime'),
    'blue': ('blue', 'azure', 'cobalt'),
    'yellow': ('yellow', 'golden', 'lemon'),
    'purple': ('purple', 'violet', 'plum'),
    'orange': ('orange', 'amber', 'tangerine'),
    'white': ('white', 'ivory', 'snowy'),
    'cyan': ('cyan', 'turquoise', 'aqua'),
}
SHAPES = ('circle', 'square', 'triangle', 'cross', 'diamond', 'ring')
SHAPE_SYNONYMS = {
    'circle': ('circle', 'disk', 'disc', 'round dot'),
    'square': ('square', 'box', 'block'),
    'triangle': ('triangle', 'wedge', 'arrowhead'),
    'cross': ('cross', 'plus', 'plus sign'),
    'diamond': ('diamond', 'rhombus', 'lozenge'),
    'ring': ('ring', 'donut', 'hoop'),
}
SIZES = ('small', 'medium', 'large')
SIZE_SYNONYMS = {
    'small': ('small', 'tiny', 'little'),
    'medium': ('medium', 'medium-sized', 'mid-sized'),
    'large': ('large', 'big', 'huge'),
}
BACKGROUNDS = ('noise', 'stripes', 'checkerboard', 'gradient')
BACKGROUND_SYNONYMS = {
    'noise': ('noisy', 'speckled', 'grainy'),
    'stripes': ('striped', 'stripy', 'lined'),
    'checkerboard': ('checkered', 'checkerboard', 'chequered'),
    'gradient': ('gradient', 'shaded', 'fading'),
}
_BACKGROUND_PHRASES = (' on a {} background', ' against a {} backdrop', ' over a {} pattern')


def _position_phrases():
  """Phrases for the 9 grid cells, row-major from the top left: tuple of 9 tuples of str."""
  vertical = {0: ('top', 'upper'), 2: ('bottom', 'lower')}
  horizontal = {0: 'left', 2: 'right'}
  phrases = []
  for row in range(3):
    for col in range(3):
      if row != 1 and col != 1:
        h = horizontal[col]
        cell = tuple(p.format(v=v, h=h) for v in vertical[row] for p in (
            'in the {v} {h}', 'in the {v} {h} corner', 'near the {v} {h} corner', 'at the {v} {h}'))
      elif row != 1:
        v = vertical[row][0]
        cell = (f'at the {v}', f'near the {v} edge', f'in the {v} middle', f'along the {v}')
      elif col != 1:
        h = horizontal[col]
        cell = (f'on the {h}', f'at the {h} side', f'near the {h} edge', f'in the middle {h}')
      else:
        cell = ('in the centre', 'in the center', 'in the middle', 'at the centre')
      phrases.append(cell)
  return tuple(phrases)


POSITION_PHRASES = _position_phrases()

_CAPTION_TEMPLATES = (
    'a {size} {colour} {shape} {position}',
    'there is a {size} {colour} {shape} {position}{bg}',
    '{position}, a {size} {colour} {shape}',
    'a picture of a {colour} {shape}',
    'a photo of the {size} {colour} {shape}{bg}',
    'a {colour} {shape}{bg}',
    '{size} {colour} {shape}, {position}',
    'an image showing a {size} {colour} {shape} {position}{bg}',
    'the {shape} is {colour} and sits {position}',
    'a {colour} {shape} {position}{bg}',
    '{colour} {shape}',
    'the {colour} {shape} shape{bg}',
)

# Prompt templates for zero-shot classification, formatted with `class_names` ("red circle").
# They use "the" rather than "a", which would be ungrammatical before vowels ("orange").
ZEROSHOT_TEMPLATES = [
    'a photo of the {}.',
    'a picture of the {}.',
    'the {} shape.',
    'the {}.',
    '{}',
    'an image showing the {}.',
]

NUM_COLOURS = len(COLOURS)
NUM_SHAPES = len(SHAPES)
NUM_CLASSES = NUM_COLOURS * NUM_SHAPES
MAX_HELDOUT = (NUM_SHAPES - 1) * NUM_COLOURS

TRAIN_STREAM = 0
EVAL_STREAM = 1
# Eval example k of class c has index c * _EVAL_CLASS_STRIDE + k in EVAL_STREAM, so the first
# `per_class` examples of a class do not depend on `per_class`.
_EVAL_CLASS_STRIDE = 2**32

# --- Geometry and appearance, as fractions of the image size or of 255. ---------------------------

_SIZE_RADIUS = (0.16, 0.23, 0.30)   # Half-extent of small / medium / large shapes.
_POSITION_JITTER = 0.06             # Max displacement of the centre from its grid cell's centre.
_COLOUR_JITTER = 18.0               # Max per-channel RGB jitter of the shape colour (of 255).
_BG_LEVEL = (0.08, 0.30)            # Range of the darker background tone (grey level).
_BG_CONTRAST = (0.08, 0.20)         # Range of the difference between the two background tones.
_BG_TINT = 0.05                     # Max per-channel tint of the background tones.
_BG_GRAIN = 0.15                    # Weight of pixel noise mixed into non-noise backgrounds.
_STRIPE_PERIOD = (0.15, 0.30)       # Range of the stripe period.
_CHECKER_CELL = (0.10, 0.22)        # Range of the checkerboard cell size.

# Per-example uniform random numbers, one column each, drawn in this order.
_PARAMS = (
    'label', 'size', 'position', 'jitter_x', 'jitter_y', 'red', 'green', 'blue',
    'bg_kind', 'bg_level', 'bg_contrast', 'bg_tint_r', 'bg_tint_g', 'bg_tint_b', 'bg_angle',
    'bg_scale', 'bg_phase_x', 'bg_phase_y', 'cap_template', 'cap_colour', 'cap_shape',
    'cap_size', 'cap_size_omit', 'cap_position', 'cap_bg', 'cap_bg_phrase', 'cap_bg_omit',
    'cap_case', 'cap_period')
_P = {name: i for i, name in enumerate(_PARAMS)}
_SIZE_OMIT_PROB = 0.3
_BG_OMIT_PROB = 0.4


def heldout_combinations(num_heldout: int) -> np.ndarray:
  """The held-out classes: int64 [num_heldout], class = colour * NUM_SHAPES + shape."""
  if not 0 <= num_heldout <= MAX_HELDOUT:
    raise ValueError(f'num_heldout must be in [0, {MAX_HELDOUT}] so that every colour and shape '
                     f'keeps a training partner, got {num_heldout}.')
  ranked = [c * NUM_SHAPES + (c + d) % NUM_SHAPES
            for d in range(NUM_SHAPES) for c in range(NUM_COLOURS)]
  return np.array(ranked[:num_heldout], dtype=np.int64)


def _pick(options: Sequence[Any], u: float) -> Any:
  """options[floor(u * len)] for u in [0, 1)."""
  return options[min(int(u * len(options)), len(options) - 1)]


def _pick_word(synonyms: Sequence[str], u: float) -> str:
  """The canonical synonyms[0] half of the time, else one of the others uniformly."""
  if u < 0.5 or len(synonyms) == 1:
    return synonyms[0]
  return _pick(synonyms[1:], 2.0 * u - 1.0)


def _caption(p: np.ndarray, colour: int, shape: int, size: int, position: int, bg: int) -> str:
  """One caption from one row `p` of per-example uniforms [len(_PARAMS)]."""
  template = _pick(_CAPTION_TEMPLATES, p[_P['cap_template']])
  size_word = ''
  if p[_P['cap_size_omit']] >= _SIZE_OMIT_PROB:
    size_word = _pick(SIZE_SYNONYMS[SIZES[size]], p[_P['cap_size']])
  bg_phrase = ''
  if p[_P['cap_bg_omit']] >= _BG_OMIT_PROB:
    bg_word = _pick(BACKGROUND_SYNONYMS[BACKGROUNDS[bg]], p[_P['cap_bg']])
    bg_phrase = _pick(_BACKGROUND_PHRASES, p[_P['cap_bg_phrase']]).format(bg_word)
  text = template.format(
      size=size_word,
      colour=_pick_word(COLOUR_SYNONYMS[COLOURS[colour]], p[_P['cap_colour']]),
      shape=_pick_word(SHAPE_SYNONYMS[SHAPES[shape]], p[_P['cap_shape']]),
      position=_pick(POSITION_PHRASES[position], p[_P['cap_position']]),
      bg=bg_phrase)
  text = ' '.join(text.split())
  text = re.sub(r'\ba (?=[aeiou])', 'an ', text)
  if p[_P['cap_case']] < 0.5:
    text = text[0].upper() + text[1:]
  if p[_P['cap_period']] < 0.5:
    text += '.'
  return text


class ShapesDataset:
  """The coloured-shapes data set; every method is a pure function of its arguments.

  Attributes:
    seed: the data seed.
    image_size: H = W of the images.
    class_names: the 48 canonical class names, "red circle", ..., "cyan ring".
    heldout_classes: int64 [num_heldout], classes never drawn by `train_examples`.
    train_classes: int64 [48 - num_heldout], the other classes, sorted.
  """

  def __init__(self, seed: int, image_size: int, num_heldout: int):
    if image_size < 16:
      raise ValueError(f'image_size must be >= 16 for the shapes to stay recognisable, '
                       f'got {image_size}.')
    self.seed = int(seed)
    self.image_size = int(image_size)
    self.class_names = [f'{c} {s}' for c in COLOURS for s in SHAPES]
    self.heldout_classes = heldout_combinations(num_heldout)
    self.train_classes = np.setdiff1d(np.arange(NUM_CLASSES), self.heldout_classes)

  @classmethod
  def from_config(cls, data_config) -> 'ShapesDataset':
    """From `config.data` (fields image_size, synthetic.seed, synthetic.num_heldout)."""
    return cls(seed=data_config.synthetic.seed, image_size=data_config.image_size,
               num_heldout=data_config.synthetic.num_heldout)

  # --- Public API. -------------------------------------------------------------------------------

  def train_examples(self, indices) -> dict[str, np.ndarray]:
    """Training examples `indices` (int64 [n]) of the training stream.

    Returns:
      dict(image=uint8 [n, H, W, 3], caption=object [n] of str, label=int32 [n]); labels are
      drawn uniformly from `train_classes`.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    params, noise = self._draw(TRAIN_STREAM, indices, with_noise=True)
    labels = self.train_classes[(params[:, _P['label']] * len(self.train_classes)).astype(int)]
    return self._examples(params, noise, labels)

  def eval_examples(self, per_class: int, split: str) -> dict[str, np.ndarray]:
    """`per_class` examples of each class of a split, from a stream disjoint from training.

    Args:
      per_class: examples per class.
      split: 'heldout' (the held-out classes) or 'seen' (the training classes).

    Returns:
      dict(image=uint8 [n, H, W, 3], caption=object [n] of str, label=int32 [n]) with
      n = per_class * number of classes in the split, grouped by class in increasing order.
    """
    if split == 'heldout':
      classes = self.heldout_classes
    elif split == 'seen':
      classes = self.train_classes
    else:
      raise ValueError(f"split must be 'heldout' or 'seen', got {split!r}.")
    labels = np.repeat(classes, per_class)
    indices = labels * _EVAL_CLASS_STRIDE + np.tile(np.arange(per_class), len(classes))
    params, noise = self._draw(EVAL_STREAM, indices, with_noise=True)
    return self._examples(params, noise, labels)

  def captions(self, n: int, start: int = 0) -> list[str]:
    """Captions of training examples start .. start + n - 1 (without rendering images)."""
    indices = np.arange(start, start + n, dtype=np.int64)
    params, _ = self._draw(TRAIN_STREAM, indices, with_noise=False)
    labels = self.train_classes[(params[:, _P['label']] * len(self.train_classes)).astype(int)]
    layout = self._layout(params, labels)
    return [_caption(p, *attrs) for p, attrs in zip(params, zip(*layout))]

  # --- Internals. --------------------------------------------------------------------------------

  def _draw(self, stream: int, indices: np.ndarray, with_noise: bool):
    """Per-example uniforms: float64 [n, len(_PARAMS)] and noise float32 [n, H, W] (or None)."""
    size = self.image_size
    params = np.empty((len(indices), len(_PARAMS)))
    noise = np.empty((len(indices), size, size), np.float32) if with_noise else None
    for row, index in enumerate(indices):
      bit_gen = np.random.Philox(key=(self.seed, stream), counter=(0, int(index), 0, 0))
      rng = np.random.Generator(bit_gen)
      params[row] = rng.random(len(_PARAMS))
      if with_noise:
        noise[row] = rng.random((size, size), dtype=np.float32)
    return params, noise

  @staticmethod
  def _layout(params: np.ndarray, labels: np.ndarray):
    """Discrete attributes, each int64 [n]: colour, shape, size, position, background."""
    def choice(name, count):
      return np.minimum((params[:, _P[name]] * count).astype(np.int64), count - 1)
    labels = np.asarray(labels, dtype=np.int64)
    return (labels // NUM_SHAPES, labels % NUM_SHAPES, choice('size', len(SIZES)),
            choice('position', 9), choice('bg_kind', len(BACKGROUNDS)))

  def _examples(self, params, noise, labels) -> dict[str, np.ndarray]:
    layout = self._layout(params, labels)
    captions = np.empty(len(params), dtype=object)
    captions[:] = [_caption(p, *attrs) for p, attrs in zip(params, zip(*layout))]
    return dict(image=self._render(params, noise, *layout), caption=captions,
                label=np.asarray(labels, dtype=np.int32))

  def _render(self, params, noise, colour, shape, size, position, bg) -> np.ndarray:
    """Images uint8 [n, H, W, 3] from uniforms [n, P], noise [n, H, W] and the attributes."""
    s = float(self.image_size)
    params = params.astype(np.float32)
    lerp = lambda lo_hi, u: lo_hi[0] + (lo_hi[1] - lo_hi[0]) * u
    coords = np.arange(self.image_size, dtype=np.float32) + 0.5
    x, y = coords[None, None, :], coords[None, :, None]   # [1, 1, W], [1, H, 1]

    # Background: a pattern t in [0, 1] [n, H, W] mixing two muted tones.
    t = np.empty_like(noise)
    for kind in range(len(BACKGROUNDS)):
      rows = np.flatnonzero(bg == kind)
      if not len(rows):
        continue
      t[rows] = self._pattern(BACKGROUNDS[kind], x, y, noise[rows], params[rows])
    t = np.where((bg == BACKGROUNDS.index('noise'))[:, None, None], t,
                 (1 - _BG_GRAIN) * t + _BG_GRAIN * noise)
    tint = (2 * params[:, [_P['bg_tint_r'], _P['bg_tint_g'], _P['bg_tint_b']]] - 1) * _BG_TINT
    low = lerp(_BG_LEVEL, params[:, _P['bg_level']])[:, None] + tint              # [n, 3]
    contrast = lerp(_BG_CONTRAST, params[:, _P['bg_contrast']])[:, None]          # [n, 1]
    # Channels first [3, n, H, W] (fast in numpy); all tones lie within [0, 1] by construction.
    image = 255 * (low.T[:, :, None, None] + t[None] * contrast.T[:, :, None, None]) + 0.5
    image = image.astype(np.uint8)

    # The shape: centre on the 3 x 3 grid with jitter, kept inside the image.
    radius = np.asarray(_SIZE_RADIUS, np.float32)[size] * s                       # [n]
    jitter = _POSITION_JITTER * s
    cx = (2 * (position % 3) + 1) / 6 * s + (2 * params[:, _P['jitter_x']] - 1) * jitter
    cy = (2 * (position // 3) + 1) / 6 * s + (2 * params[:, _P['jitter_y']] - 1) * jitter
    cx = np.clip(cx, radius + 1, s - 1 - radius).astype(np.float32)
    cy = np.clip(cy, radius + 1, s - 1 - radius).astype(np.float32)
    mask = np.zeros(noise.shape, dtype=bool)
    for kind in range(NUM_SHAPES):
      rows = np.flatnonzero(shape == kind)
      if not len(rows):
        continue
      r = radius[rows, None, None]
      mask[rows] = _shape_mask(SHAPES[kind], (x - cx[rows, None, None]) / r,
                               (y - cy[rows, None, None]) / r)
    rgb = COLOUR_RGB[colour] + (
        2 * params[:, [_P['red'], _P['green'], _P['blue']]] - 1) * _COLOUR_JITTER  # [n, 3]
    rgb = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    np.copyto(image, rgb.T[:, :, None, None], where=mask[None])
    return np.ascontiguousarray(image.transpose(1, 2, 3, 0))                       # [n, H, W, 3]

  def _pattern(self, kind, x, y, noise, params) -> np.ndarray:
    """Background pattern in [0, 1]: float32 [n, H, W] for n examples of one kind."""
    s = float(self.image_size)
    u = lambda name: params[:, _P[name]].astype(np.float32)[:, None, None]
    if kind == 'noise':
      return noise
    if kind == 'stripes':
      angle = np.floor(u('bg_angle') * 4) * (math.pi / 4)     # Horizontal, vertical, diagonals.
      period = s * (_STRIPE_PERIOD[0] + (_STRIPE_PERIOD[1] - _STRIPE_PERIOD[0]) * u('bg_scale'))
      proj = x * np.cos(angle) + y * np.sin(angle)
      return (np.floor(2 * proj / period + 2 * u('bg_phase_x')) % 2).astype(np.float32)
    if kind == 'checkerboard':
      cell = s * (_CHECKER_CELL[0] + (_CHECKER_CELL[1] - _CHECKER_CELL[0]) * u('bg_scale'))
      return ((np.floor(x / cell + u('bg_phase_x')) + np.floor(y / cell + u('bg_phase_y'))) % 2
              ).astype(np.float32)
    if kind == 'gradient':
      angle = u('bg_angle') * (2 * math.pi)
      proj = (x - s / 2) * np.cos(angle) + (y - s / 2) * np.sin(angle)
      return np.clip(proj / (s / math.sqrt(2)) + 0.5, 0, 1).astype(np.float32)
    raise ValueError(f'Unknown background {kind!r}.')


def _shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
  """Boolean mask of a shape from offsets to its centre in units of its half-extent.

  Every shape lies within |dx| <= 1 and |dy| <= 1.
  """
  ax, ay = np.abs(dx), np.abs(dy)
  if kind == 'circle':
    return dx**2 + dy**2 <= 1
  if kind == 'square':
    return np.maximum(ax, ay) <= 0.85
  if kind == 'triangle':   # Apex up, base 2 wide at dy = 1.
    return (ax <= (dy + 1) / 2) & (dy <= 1)
  if kind == 'cross':
    return (np.minimum(ax, ay) <= 0.3) & (np.maximum(ax, ay) <= 1)
  if kind == 'diamond':
    return ax + ay <= 1
  if kind == 'ring':
    d2 = dx**2 + dy**2
    return (d2 <= 1) & (d2 >= 0.5**2)
  raise ValueError(f'Unknown shape {kind!r}.')


# --- Data source 'synthetic' (basic.data.SOURCES): the training stream as host batches. --------

DEFAULTS = {'synthetic': {
    'seed': 0,
    'num_heldout': 10,       # colour x shape combinations kept out of training.
    'eval_per_class': 50,    # zero-shot evaluation images per held-out class.
}}
_RENDER_CHUNK = 4096   # Examples rendered at a time (memory, not results).


def validate(config):
  from basic import config_lib  # pylint: disable=g-import-not-at-top
  for field in ('seed', 'num_heldout', 'eval_per_class'):
    config_lib.check_int(config, f'data.synthetic.{field}', 0)


def check(config, *, process_index: int = 0, process_count: int = 1):
  del config, process_index, process_count   # Nothing to reach: the data is generated.


def batches(config, handle, *, start_step: int, start_position: int, local_batch: int,
            process_index: int, process_count: int):
  """Host batches {'image', 'caption', 'position', 'dropped'} of steps start_step, ...

  The batch of step s is a pure function of (config.data.synthetic.seed, s): global examples
  s * batch_size ... (s + 1) * batch_size - 1 of the training stream, host p taking the p-th
  contiguous slice. Resuming at any step is exact and needs no stream position:
  position = (s + 1) * B_local, dropped = 0, start_position is not used.
  """
  del handle, start_position, process_count
  from basic.data import tf_setup  # pylint: disable=g-import-not-at-top
  tf = tf_setup.configure_tensorflow()
  dataset = ShapesDataset.from_config(config.data)
  batch_size, size = config.batch_size, config.data.image_size

  def generate(step):
    first = int(step) * batch_size + process_index * local_batch
    image = np.empty((local_batch, size, size, 3), np.uint8)
    captions_ = np.empty(local_batch, dtype=object)
    # Rendered _RENDER_CHUNK examples at a time: an example is a function of its index alone,
    # so the batch is the same, and the float32 temporaries of rendering stay ~50 MB instead of
    # growing with the batch (4 GB at 65536).
    for start in range(0, local_batch, _RENDER_CHUNK):
      stop = min(start + _RENDER_CHUNK, local_batch)
      examples = dataset.train_examples(np.arange(first + start, first + stop, dtype=np.int64))
      image[start:stop] = examples['image']
      captions_[start:stop] = [c.encode('utf-8') for c in examples['caption']]
    return image, captions_

  def step_batch(step):
    image, caption = tf.numpy_function(generate, [step], [tf.uint8, tf.string], stateful=False)
    image = tf.ensure_shape(image, [local_batch, size, size, 3])
    caption = tf.ensure_shape(caption, [local_batch])
    return {'image': image, 'caption': caption, 'position': (step + 1) * local_batch,
            'dropped': tf.constant(0, tf.int64)}

  steps = tf.data.Dataset.counter(start=start_step, dtype=tf.int64)
  return steps.map(tf.autograph.experimental.do_not_convert(step_batch),
                   num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def captions(config, n: int):
  """The captions of training examples 0 .. n - 1."""
  yield from ShapesDataset.from_config(config.data).captions(n)
