"""Tests for basic/data/preprocess.py: crops, flips, erasing and decoding, uint8 in and out."""
import ml_collections
import numpy as np
import pytest

from basic.data import preprocess
from basic.data import tf_setup

tf = tf_setup.configure_tensorflow()


def _augment(**overrides):
  augment = ml_collections.ConfigDict(dict(
      crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=False, erasing_prob=0.0,
      erasing_scale=(0.02, 1 / 3), erasing_ratio=(0.3, 3.3)))
  augment.update(overrides)
  return augment


def _seed(i):
  return tf.constant([7, i], tf.int64)


def _image(height, width, seed=0):
  """A smooth, non-symmetric uint8 test image [height, width, 3]."""
  y, x = np.mgrid[0:height, 0:width]
  rng = np.random.default_rng(seed)
  image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                    (x * y) % 256], -1) + rng.integers(0, 8, (height, width, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def test_eval_image_resizes_the_shorter_side_and_centre_crops():
  # Value = column (landscape) or row (portrait) index. Nearest resizing by 1/2 samples pixel
  # centres: output j is input 2j + 1; the centre crop keeps outputs 5..24.
  landscape = np.broadcast_to(np.arange(60, dtype=np.uint8)[None, :, None], (40, 60, 3))
  out = preprocess.eval_image(landscape, 20, method='nearest', antialias=False).numpy()
  assert out.shape == (20, 20, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, :, 0], np.arange(11, 50, 2))
  portrait = np.ascontiguousarray(landscape.transpose(1, 0, 2))
  out = preprocess.eval_image(portrait, 20, method='nearest', antialias=False).numpy()
  np.testing.assert_array_equal(out[:, 0, 0], np.arange(11, 50, 2))
  square = _image(24, 24)
  np.testing.assert_array_equal(preprocess.eval_image(square, 24).numpy(), square)


def test_crop_window_respects_scale_ratio_and_bounds():
  augment = _augment(crop_scale=(0.25, 0.5), crop_ratio=(0.5, 2.0))
  areas, ratios = [], []
  for i in range(60):
    y, x, h, w = preprocess.crop_window([120, 160, 3], augment, _seed(i)).numpy()
    assert 0 <= y and 0 <= x and y + h <= 120 and x + w <= 160
    areas.append(h * w / (120 * 160))
    ratios.append(w / h)
  assert 0.24 <= min(areas) and max(areas) <= 0.51     # Rounding to whole pixels.
  assert 0.48 <= min(ratios) and max(ratios) <= 2.05
  assert max(areas) - min(areas) > 0.15 and len(set(ratios)) > 30


def test_train_image_is_deterministic_per_seed():
  image = _image(48, 64)
  augment = _augment(crop_scale=(0.3, 1.0), flip=True, erasing_prob=0.5)
  a = preprocess.train_image(image, 32, augment, _seed(1)).numpy()
  b = preprocess.train_image(image, 32, augment, _seed(1)).numpy()
  c = preprocess.train_image(image, 32, augment, _seed(2)).numpy()
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_whole_image_crop_and_flip():
  """crop_scale (1, 1) on a square image at its own size is the identity; flip mirrors it in
  about half the seeds."""
  image = _image(32, 32)
  same = _augment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
  for i in range(5):
    np.testing.assert_array_equal(preprocess.train_image(image, 32, same, _seed(i)).numpy(),
                                  image)
  flips = _augment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=True)
  outs = [preprocess.train_image(image, 32, flips, _seed(i)).numpy() for i in range(20)]
  mirrored = [np.array_equal(o, image[:, ::-1]) for o in outs]
  assert all(m or np.array_equal(o, image) for m, o in zip(mirrored, outs))
  assert 5 <= sum(mirrored) <= 15


def test_random_erasing_replaces_one_rectangle_with_noise():
  image = np.zeros((40, 40, 3), np.uint8)
  for i in range(10):
    out = preprocess.random_erasing(tf.constant(image), 1.0, (0.1, 0.2), (0.5, 2.0),
                                    _seed(i)).numpy()
    rows, cols = np.nonzero(out.any(-1))
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert 0.09 <= h * w / 1600 <= 0.21 and 0.45 <= h / w <= 2.2
    assert out[rows.min():rows.max() + 1, cols.min():cols.max() + 1].any(-1).mean() > 0.95
    assert np.unique(out).size > 200   # Uniform noise, not a constant fill.
  np.testing.assert_array_equal(
      preprocess.random_erasing(tf.constant(image), 0.0, (0.1, 0.2), (0.5, 2.0), _seed(0)),
      image)


def test_decode_train_image_matches_train_image():
  image = _image(48, 64)
  augment = _augment(crop_scale=(0.2, 0.6), flip=True)
  png = tf.io.encode_png(image)
  jpeg = tf.io.encode_jpeg(image, quality=95)
  for i in range(4):
    seed = _seed(i)
    np.testing.assert_array_equal(   # PNG: decoded in full, then the same crop: identical.
        preprocess.decode_train_image(png, 32, augment, seed).numpy(),
        preprocess.train_image(image, 32, augment, seed).numpy())
    # JPEG: only the window is decoded; same window, pixels within JPEG rounding.
    fast = preprocess.decode_train_image(jpeg, 32, augment, seed).numpy().astype(int)
    full = preprocess.train_image(preprocess.decode(jpeg), 32, augment, seed).numpy()
    assert np.abs(fast - full).mean() < 2.0


def test_large_jpegs_are_decoded_at_reduced_scale_with_the_same_result():
  """A 256 x 320 JPEG to 32 px: decoded at 1/4 or 1/8 scale, close to the full-scale result."""
  image = _image(256, 320)
  jpeg = tf.io.encode_jpeg(image, quality=95)
  augment = _augment(crop_scale=(0.5, 1.0))
  for i in range(4):
    window = preprocess.crop_window([256, 320], augment, _seed(i)).numpy()
    assert min(window[2:]) >= 4 * 32             # So the reduced-scale path is taken.
    fast = preprocess.decode_train_image(jpeg, 32, augment, _seed(i)).numpy().astype(int)
    full = preprocess.train_image(image, 32, augment, _seed(i)).numpy()
    assert np.abs(fast - full).mean() < 3.0
    assert np.abs(fast - np.roll(full, 2, axis=1)).mean() > 3 * np.abs(fast - full).mean()


def test_undecodable_and_truncated_images_raise():
  jpeg = tf.io.encode_jpeg(_image(48, 64), quality=95).numpy()
  png = tf.io.encode_png(_image(48, 64)).numpy()
  # Windows in the top rows would decode from the intact part: truncation must still fail.
  small = _augment(crop_scale=(0.04, 0.08), crop_ratio=(3.0, 5.0))
  top = [i for i in range(40)
         if sum(preprocess.crop_window([48, 64], small, _seed(i)).numpy()[[0, 2]]) <= 24]
  assert len(top) >= 3
  for bad in (jpeg[:len(jpeg) * 9 // 10], png[:len(png) // 2], b'not an image', b''):
    for i in top[:3]:
      with pytest.raises(tf.errors.InvalidArgumentError):
        preprocess.decode_train_image(bad, 32, small, _seed(i)).numpy()
  gray = tf.io.encode_png(_image(20, 30)[:, :, :1])
  assert preprocess.decode(gray).shape == (20, 30, 3)
