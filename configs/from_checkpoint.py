r"""Continue training from a checkpoint, with the config saved inside it: a converted OpenCLIP /
OpenAI CLIP model (python -m basic.convert.open_clip), a soup, or another run's checkpoint.

  python -m basic.train --config=configs/from_checkpoint.py:path=runs/clip_b32 \
      --workdir=runs/clip_b32_ft --config.data.tfrecord_pattern='shards/*.tfrecord' \
      --config.total_steps=10000

`path` is a checkpoint as `config.init_from` takes it (a workdir, a checkpoints directory or one
step directory; local or gs://). The config is the checkpoint's own (its latest step's, or the
step directory's) with `init_from = path`: the run starts from the checkpoint's parameters and,
while `tokenizer.model_path` is empty, uses the tokenizer saved in it (basic.tokenizer
.ensure_tokenizer). Override any field on the command line as usual; the model fields must keep
matching the checkpoint's parameters (position embeddings excepted: they are resized).
"""
from basic import checkpoint as checkpoint_lib
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, path='')
  if not arg.path:
    raise ValueError('configs/from_checkpoint.py needs the checkpoint: '
                     '--config=configs/from_checkpoint.py:path=DIR.')
  with checkpoint_lib.open_step(arg.path, field='configs/from_checkpoint.py:path') as (ckpt, step):
    config = ckpt.restore_config(step)   # Filled: fields added since at their defaults.
  config.init_from = arg.path
  return config
