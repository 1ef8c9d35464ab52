r"""LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning"): a new text
tower trained from scratch against the locked image tower of a checkpoint.

  python -m basic.convert.open_clip --model=ViT-B-16 \
      --checkpoint=open_clip_model.safetensors --output=runs/clip_b16
  python -m basic.train --config=configs/lit.py:init_from=runs/clip_b16 --workdir=runs/lit_b16 \
      --config.data.tfrecord_pattern='gs://BUCKET/shards/*.tfrecord'

`init_from` is any basic checkpoint (a converted OpenCLIP model, another run's workdir, a soup;
local or gs://). Only its image tower and the image projection are taken
(`config.init_from_params`, LIT_PARAMS) and locked (`config.lock_image`: no update, no optimiser
state, no gradient pass through the tower); the text tower and the temperature start from a
fresh initialisation. The image tower's config, the joint embedding size and the image
preprocessing (size, mean / std, resize) are read from the checkpoint's config, so that they
match its parameters. The checkpoint's tokenizer is not used (no text parameter is taken, see
basic.tokenizer.ensure_tokenizer): the run trains a SentencePiece model on its own captions
(`config.tokenizer.train_sentences`), or uses `--config.tokenizer.model_path`.

Numbers from the LiT authors' public config, big_vision/configs/proj/image_text/lit_coco.py
("lit_coco" below), where they apply; (CHOICE) otherwise.

`:runlocal` is the small twin on this CPU: configs/tiny.py unchanged (its towers, synthetic data,
1500 steps, optimiser), with its image tower and projection taken from a tiny run's checkpoint
(`init_from`, default runs/tiny) and locked, so that it compares with that run step for step:

  python -m basic.train --config=configs/tiny.py --workdir=runs/tiny
  python -m basic.train --config=configs/lit.py:runlocal --workdir=runs/tiny_lit
  python -m basic.train --config=configs/lit.py:runlocal,init_from=/tmp/other --workdir=...
"""
import ml_collections

from basic import checkpoint as checkpoint_lib
from basic import config_defaults
from basic import models
from configs import common
from configs import tiny

# The parameters taken from the checkpoint: the image tower and its projection to the joint
# embedding (DualEncoder's 'image_proj', outside 'image/'); not the temperature.
LIT_PARAMS = ('image/.*', 'image_proj/.*')
LOCAL_INIT_FROM = 'runs/tiny'


def _lit(config, init_from: str):
  config.init_from = init_from
  config.init_from_params = LIT_PARAMS
  config.lock_image = True
  return config


def get_config(arg=None):
  arg = common.parse_arg(arg, init_from='', runlocal=False)
  if arg.runlocal:
    return _lit(tiny.get_config(), arg.init_from or LOCAL_INIT_FROM)
  if not arg.init_from:
    raise ValueError('configs/lit.py needs the checkpoint of the image tower: '
                     '--config=configs/lit.py:init_from=DIR (or :runlocal).')
  with checkpoint_lib.open_step(arg.init_from, field='configs/lit.py:init_from') as (ckpt, step):
    source = ckpt.restore_config(step)
  config = _lit(common.base_config(), arg.init_from)

  config.batch_size = 4096         # lit_coco: batch_size 4096.
  config.microbatch_size = 1024    # (CHOICE) K = 4 gradient-cache passes.
  config.loss = 'softmax'          # LiT: CLIP's symmetric contrastive loss.
  config.loss_chunk_size = 1024    # (CHOICE)
  config.total_steps = 60_000      # big_vision README_lit.md: LiT-B16B_2 trained 60k steps.
  config.log_every_steps = 100
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 1_000   # lit_coco: checkpoint_steps 1000.
  config.keep_checkpoints = 3

  # The checkpoint's preprocessing (its image tower was trained with it); captions cut to 16
  # tokens (lit_coco: token_len 16).
  common.paper_data(config, image_size=source.data.image_size, text_length=16)
  config.data.mean = tuple(source.data.mean)
  config.data.std = tuple(source.data.std)
  config.data.resize_method = source.data.resize_method
  config.tokenizer.kind = 'sentencepiece'
  config.tokenizer.model_path = ''   # Trained by the run on its captions (or give yours).

  config.model.embed_dim = source.model.embed_dim   # The locked projection's output.
  config.model.image = ml_collections.ConfigDict(source.model.image.to_dict())
  config.model.dtype = 'bfloat16'    # (CHOICE)
  config.model.temperature_init = 0.1   # lit_coco: temperature_init 10 (a logit scale).
  config.model.text = config_defaults.tower('transformer', kind='text')
  config.model.text.vocab_size = 32_000   # (CHOICE) SentencePiece pieces.
  config.model.text.width = 768      # lit_coco: txt='bert_base', BERT-base's sizes:
  config.model.text.depth = 12       # 12 layers,
  config.model.text.num_heads = 12   # 12 heads,
  config.model.text.mlp_dim = 3072   # MLP 3072;
  config.model.text.causal = False   # bidirectional (BERT).
  config.model.text.pool = 'mean'    # (CHOICE; BERT pools its [CLS] token.)
  config.model.text.scan_layers = True   # (CHOICE)

  config.optimizer.name = 'adamw'    # lit_coco: optax scale_by_adam (text tower bert_base),
  config.optimizer.b1 = 0.9          # optax's defaults,
  config.optimizer.b2 = 0.999
  config.optimizer.learning_rate = 1e-3   # lit_coco: lr 0.001,
  config.optimizer.schedule = 'cosine'    # cosine decay
  config.optimizer.end_lr_ratio = 0.0
  config.optimizer.warmup_steps = 1_800   # after max(3% of the steps, 100) warm-up steps,
  config.optimizer.grad_clip_norm = 1.0   # global-norm clipping at 1.0,
  # lit_coco: wd 0.01, which big_vision adds after the learning-rate scaling (big_vision/optax.py:
  # decay wd * schedule(t) * param per step); optax.adamw's decay is lr * weight_decay * param,
  # so the same decay is 0.01 / 1e-3.
  config.optimizer.weight_decay = 10.0

  config.mesh.data = -1
  config.mesh.model = 1
  config.sharding.rules = models.sharding_rules(config.model)
  config.sharding.fsdp = True        # (CHOICE) parameters of >= 2^18 elements over 'data'.
  config.sharding.fsdp_min_size = 2**18
  return config
