"""Helpers shared by the paper configs (basic_*.py, vit_*.py), big_vision-style.

`parse_arg('runlocal=True', runlocal=False)` turns a config argument string
(`--config=configs/basic_l.py:runlocal=True`) into a ConfigDict of typed fields.
"""
import ml_collections

from basic import config_defaults


def parse_arg(arg, **defaults):
  """'a=1,b=True' -> ConfigDict(a=1, b=True); keys must be in `defaults`, values take their type.

  A bare word `key` means `key=True`.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}.')
    kind = type(defaults[key])
    if kind is bool:
      value = value.lower() in ('', '1', 'true', 'yes')
    out[key] = kind(value)
  return out


def base_config():
  """The schema (basic/config_defaults.py) every paper config starts from."""
  return config_defaults.get_config()


def paper_data(config, *, image_size, text_length):
  """The pod data fields: TFRecord shards in img2dataset's schema ('jpg', 'txt') on GCS.

  Point `data.tfrecord_pattern` (and `tokenizer.model_path`) at your bucket; the pipeline
  checks the pattern and the feature keys when training starts.
  """
  config.data.source = 'tfrecord'
  config.data.tfrecord_pattern = 'gs://YOUR_BUCKET/image_text/*.tfrecord'
  config.data.image_key = 'jpg'
  config.data.text_key = 'txt'
  config.data.image_size = image_size
  config.data.text_length = text_length
  # Per host (CHOICE): big_vision's image-text configs shuffle 250k records; 64 files read at a
  # time; all of the host's CPU cores for decoding and augmentation.
  config.data.shuffle_buffer = 250_000
  config.data.cycle_length = 64
  config.data.threads = 0
  config.data.prefetch = 4
  # Augmentation (CHOICE; the BASIC paper does not state it): OpenCLIP's random resized crop
  # scale (0.9, 1.0), no flip (captions may say left / right), no random erasing.
  config.data.augment.crop_scale = (0.9, 1.0)
  config.data.augment.flip = False
  config.data.augment.erasing_prob = 0.0
  # ImageNet mean/std (CLIP / big_vision); the BASIC paper does not state its normalisation.
  config.data.mean = (0.485, 0.456, 0.406)
  config.data.std = (0.229, 0.224, 0.225)
  config.tokenizer.model_path = 'gs://YOUR_BUCKET/tokenizer/spm.model'
  config.eval.zeroshot = False  # Zero-shot ImageNet evaluation comes with the eval issue.
  return config


# The small twins' text vocabulary: SentencePiece pieces trained on the synthetic captions (as
# configs/tiny.py).
LOCAL_VOCAB_SIZE = 256


def runlocal(config, *, image, text):
  """Turns a paper config into its small twin that trains on the synthetic default on a CPU.

  Keeps the paper config's kind of towers, loss, optimiser and schedule shape; replaces the data
  by the embedded synthetic shapes (32 px, 16 tokens: the schema's data), the towers' sizes by
  `image` / `text` (dicts of tiny sizes; a named variant is dropped for them), the batch by 64
  in 2 microbatches (so the gradient-cached path runs), and the step counts by a few.
  """
  local = config_defaults.get_config()
  config.data = local.data
  config.tokenizer = local.tokenizer
  config.eval = local.eval
  if 'variant' in config.model.image:
    config.model.image.variant = ''
  config.model.image.update(image)
  config.model.text.update(text)
  config.model.text.vocab_size = LOCAL_VOCAB_SIZE
  config.model.embed_dim = 64
  config.model.dtype = 'float32'
  config.batch_size = 64
  config.microbatch_size = 32
  config.loss_chunk_size = 0
  config.total_steps = 30
  config.log_every_steps = 10
  config.eval_every_steps = 30
  config.checkpoint_every_steps = 30
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 5
  config.mesh = local.mesh
  return config
