"""Image preprocessing inside tf.data: decoding, training augmentation, evaluation crops.

Every function maps uint8 (or encoded bytes) to uint8 [size, size, 3]: images stay uint8 until
they are on device, where the model normalises them with config.data.mean / std.

Training (`train_image`, `decode_train_image`), in this order, as `config.data.augment` says:
  1. Random resized crop (Inception-style, torchvision's RandomResizedCrop): a window whose area
     is a fraction in `crop_scale` of the image and whose aspect ratio w / h lies in
     `crop_ratio` (sampled log-uniformly by TensorFlow); if 10 attempts find no window inside
     the image, the whole image is used (torchvision falls back to a centre crop). Resized to
     size x size with `method` (antialiased when `antialias`). `crop_scale=(1, 1)` keeps the
     whole image, squashed to a square.
  2. Horizontal flip with probability 1/2 if `flip` (off by default: captions may say
     "left" / "right").
  3. Random erasing (Zhong et al. 2017; timm's RandomErasing, OpenCLIP's `re_prob`) with
     probability `erasing_prob`: a rectangle of area fraction in `erasing_scale` and aspect
     ratio h / w log-uniform in `erasing_ratio` is replaced by uniform random uint8 noise, per
     pixel and channel (timm's mode 'pixel', in uint8). Where timm retries a rectangle that does
     not fit, its sides are clipped to the image here.
Evaluation (`eval_image`): resize the shorter side to `size` (aspect ratio kept), centre crop.

Randomness is stateless: every random choice is a function of a `seed` (int64 [2], e.g. derived
from the data seed and the record's position in the stream), so the same record at the same
position is augmented the same way after a resume.
"""
import math

from basic.data import tf_setup

RESIZE_METHODS = ('bilinear', 'bicubic', 'area', 'lanczos3', 'nearest')


def _tf():
  return tf_setup.configure_tensorflow()


def decode(encoded):
  """Encoded JPEG / PNG / GIF (first frame) / BMP / WebP bytes -> uint8 [h, w, 3].

  Raises (inside tf.data: an error for that element) if the bytes do not decode, e.g. a
  truncated file.
  """
  tf = _tf()
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _resize(image, size_hw, method, antialias):
  """uint8 [h, w, 3] -> uint8 [size_hw[0], size_hw[1], 3]."""
  tf = _tf()
  if method not in RESIZE_METHODS:
    raise ValueError(f'config.data.resize_method={method!r}: must be one of {RESIZE_METHODS}.')
  resized = tf.image.resize(image, size_hw, method=method, antialias=antialias)
  if resized.dtype != tf.uint8:
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
  return resized


def crop_window(shape, augment, seed):
  """A random resized crop window of an image of `shape` (int [>=2]: h, w, ...).

  Args:
    shape: the image shape, e.g. `tf.shape(image)` or `tf.image.extract_jpeg_shape(bytes)`.
    augment: `config.data.augment` (reads crop_scale, crop_ratio).
    seed: int64 [2], the stateless seed.

  Returns:
    int32 [4]: (y, x, h, w) of the window, inside the image.
  """
  tf = _tf()
  shape = tf.cast(shape, tf.int32)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.stack([shape[0], shape[1], 3]), tf.zeros([1, 0, 4], tf.float32), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=tuple(augment.crop_ratio),
      area_range=tuple(augment.crop_scale), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def _seeds(seed, n):
  tf = _tf()
  return tf.unstack(tf.random.split(tf.cast(seed, tf.int64), n))


def flip(image, seed):
  """Left-right flip of uint8 [h, w, 3] with probability 1/2."""
  tf = _tf()
  coin = tf.random.stateless_uniform([], seed=seed) < 0.5
  return tf.cond(coin, lambda: tf.reverse(image, axis=[1]), lambda: image)


def random_erasing(image, probability, scale, ratio, seed):
  """With `probability`, replaces a random rectangle of uint8 [H, W, 3] by uniform noise.

  Args:
    image: uint8 [H, W, 3] with static H, W.
    probability: chance of erasing.
    scale: (lo, hi), the rectangle's area as a fraction of the image's.
    ratio: (lo, hi), its aspect ratio h / w, sampled log-uniformly.
    seed: int64 [2].

  Returns:
    uint8 [H, W, 3].
  """
  tf = _tf()
  if probability <= 0:
    return image
  height, width = image.shape[0], image.shape[1]
  s_apply, s_area, s_ratio, s_y, s_x, s_noise = _seeds(seed, 6)
  apply = tf.random.stateless_uniform([], seed=s_apply) < probability
  area = float(height * width) * tf.random.stateless_uniform(
      [], seed=s_area, minval=float(scale[0]), maxval=float(scale[1]))
  aspect = tf.exp(tf.random.stateless_uniform(
      [], seed=s_ratio, minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  h = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32), 1, height)
  w = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32), 1, width)
  y = tf.random.stateless_uniform([], seed=s_y, minval=0, maxval=height - h + 1, dtype=tf.int32)
  x = tf.random.stateless_uniform([], seed=s_x, minval=0, maxval=width - w + 1, dtype=tf.int32)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  mask = (rows >= y) & (rows < y + h) & (cols >= x) & (cols < x + w) & apply   # [H, W]
  noise = tf.cast(tf.random.stateless_uniform([height, width, 3], seed=s_noise, minval=0,
                                              maxval=256, dtype=tf.int32), tf.uint8)
  return tf.where(mask[:, :, None], noise, image)


def _augment_crop(crop, size, augment, flip_seed, erase_seed, method, antialias):
  """Resized crop -> flip -> erasing, uint8 [size, size, 3]."""
  image = _resize(crop, [size, size], method, antialias)
  image.set_shape([size, size, 3])
  if augment.flip:
    image = flip(image, flip_seed)
  return random_erasing(image, augment.erasing_prob, augment.erasing_scale,
                        augment.erasing_ratio, erase_seed)


def train_image(image, size: int, augment, seed, *, method: str = 'bilinear',
                antialias: bool = True):
  """Training augmentation of a decoded image (see the module docstring).

  Args:
    image: uint8 [h, w, 3].
    size: output height = width (config.data.image_size).
    augment: `config.data.augment`.
    seed: int64 [2]; the output is a function of (image, seed).
    method: resize method, one of RESIZE_METHODS (config.data.resize_method).
    antialias: antialias when downsampling (config.data.antialias).

  Returns:
    uint8 [size, size, 3].
  """
  tf = _tf()
  crop_seed, flip_seed, erase_seed = _seeds(seed, 3)
  y, x, h, w = tf.unstack(crop_window(tf.shape(image), augment, crop_seed))
  crop = image[y:y + h, x:x + w]
  return _augment_crop(crop, size, augment, flip_seed, erase_seed, method, antialias)


def _decode_jpeg_window(encoded, window, size: int):
  """The crop `window` (int32 [4]: y, x, h, w) of complete JPEG bytes, uint8 [h', w', 3].

  When the window's shorter side is at least r * size for r in (2, 4, 8), the JPEG is decoded
  at 1/r scale (libjpeg's DCT-domain downscaling, much faster than a full decode) with the
  largest such r and the window cut from that (h' ~ h / r, w' ~ w / r, both >= size); else
  only the window is decoded at full scale.
  """
  tf = _tf()
  y, x, h, w = tf.unstack(window)

  def full():
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

  def scaled(r):
    def decode_scaled():
      image = tf.io.decode_jpeg(encoded, channels=3, ratio=r)
      bottom = tf.minimum((y + h + r - 1) // r, tf.shape(image)[0])
      right = tf.minimum((x + w + r - 1) // r, tf.shape(image)[1])
      return image[y // r:bottom, x // r:right]
    return decode_scaled

  ratios = (2, 4, 8)
  shortest = tf.minimum(h, w)
  index = tf.add_n([tf.cast(shortest >= r * size, tf.int32) for r in ratios])
  crop = tf.switch_case(index, [full] + [scaled(r) for r in ratios])
  crop.set_shape([None, None, 3])
  return crop


def decode_train_image(encoded, size: int, augment, seed, *, method: str = 'bilinear',
                       antialias: bool = True):
  """`train_image(decode(encoded), ...)`, decoding complete JPEGs only as far as needed.

  The crop window is the same as `train_image`'s (it depends on the image shape and the seed
  only). For a JPEG that ends with its end-of-image marker, only the window is decoded
  (`tf.image.decode_and_crop_jpeg`), or, when the window is at least twice the output size, the
  image is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (see `_decode_jpeg_window`), which is
  several times faster for large photos and small outputs; pixels then differ by a few levels
  from `train_image(decode(encoded))`. Any other input (PNG, ..., or a JPEG without its end
  marker, i.e. likely truncated) is decoded in full, so a truncated image always fails to
  decode (an error for this element) even when the window would lie in its intact part.

  Args: as `train_image`, with `encoded` a scalar string of image bytes.

  Returns:
    uint8 [size, size, 3].
  """
  tf = _tf()
  crop_seed, flip_seed, erase_seed = _seeds(seed, 3)
  length = tf.strings.length(encoded)
  tail = tf.strings.substr(encoded, tf.maximum(length - 2, 0), tf.minimum(length, 2))
  complete_jpeg = tf.io.is_jpeg(encoded) & tf.equal(tail, b'\xff\xd9')

  def jpeg_window():
    window = crop_window(tf.image.extract_jpeg_shape(encoded), augment, crop_seed)
    return _decode_jpeg_window(encoded, window, size)

  def full_decode():
    image = decode(encoded)
    y, x, h, w = tf.unstack(crop_window(tf.shape(image), augment, crop_seed))
    return image[y:y + h, x:x + w]

  crop = tf.cond(complete_jpeg, jpeg_window, full_decode)
  return _augment_crop(crop, size, augment, flip_seed, erase_seed, method, antialias)


def eval_image(image, size: int, *, method: str = 'bilinear', antialias: bool = True):
  """Evaluation preprocessing: shorter side resized to `size`, then the centre size x size crop.

  Args:
    image: uint8 [h, w, 3].
    size: output height = width.
    method, antialias: as `train_image`.

  Returns:
    uint8 [size, size, 3].
  """
  tf = _tf()
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = float(size) / tf.reduce_min(shape)
  new_hw = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  resized = _resize(image, new_hw, method, antialias)
  top = (new_hw[0] - size) // 2
  left = (new_hw[1] - size) // 2
  crop = resized[top:top + size, left:left + size]
  crop.set_shape([size, size, 3])
  return crop
