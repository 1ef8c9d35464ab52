"""The embedded default: a 0.43M-parameter dual encoder trained on CPU in about 7 minutes.

Trains on the built-in synthetic shapes dataset (no download), evaluates zero-shot on colour x
shape combinations that never occur in training, among all combinations. Every field not set
here has the default of the schema, basic/config_defaults.py (documented there).

  python -m basic.train --config=configs/tiny.py --workdir=/tmp/basic_tiny
  python -m basic.train --config=configs/tiny.py --workdir=/tmp/x --config.total_steps=50

Your own data: --config.data.source=tfrecord --config.data.tfrecord_pattern='/data/*.tfrecord'
(img2dataset's schema, or `python -m basic.data.write_tfrecords`), or --config.data.source=tfds
--config.data.tfds_name=NAME --config.data.data_dir=DIR, plus a tokenizer
(python -m basic.tokenizer train --config=...).
"""
from basic import config_defaults
from basic import models


def get_config(arg=None):
  del arg  # The tiny config takes no argument string.
  config = config_defaults.get_config()

  config.batch_size = 256          # N: 256 pairs per step,
  config.microbatch_size = 256     # in one microbatch.
  config.loss = 'softmax'
  config.total_steps = 1500
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500

  # The synthetic shapes at 32 px and 16 tokens (the schema's data defaults).
  config.data.source = 'synthetic'
  config.data.image_size = 32
  config.data.text_length = 16

  config.model.embed_dim = 64
  config.model.dtype = 'float32'
  config.model.image = config_defaults.tower(
      'vit',
      patch_size=8,       # 16 tokens of 8x8 px at 32 px.
      width=96,
      depth=3,
      num_heads=4,        # 24-dim heads; 4 heads split over a model axis of 2 or 4.
      mlp_dim=192,
      pool='gap')         # 'gap' | 'cls'
  config.model.text = config_defaults.tower(
      'transformer', kind='text',
      vocab_size=256,     # SentencePiece pieces trained on the synthetic captions.
      width=96,
      depth=2,
      num_heads=4,
      mlp_dim=192,
      causal=False,
      pool='mean')        # 'mean' (over non-pad) | 'eos' (last non-pad) | 'first' | 'argmax'

  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 0.05

  # Megatron-style tensor parallelism over 'model' (attention heads, MLP hidden units,
  # vocabulary): the towers' rules, no-ops while config.mesh.model == 1.
  config.mesh.data = -1   # -1: all remaining devices.
  config.mesh.model = 1
  config.sharding.rules = models.sharding_rules(config.model)
  config.sharding.fsdp = False
  return config
