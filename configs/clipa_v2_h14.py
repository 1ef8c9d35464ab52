r"""CLIPA-v2 H/14 (Li, Wang, Xie 2023, "CLIPA-v2: Scaling CLIP Training with 81.1% Zero-shot
ImageNet Accuracy within a $10,000 Budget"): few tokens first, then a short full-token tune.

Three stages, each a config of its own that starts from the previous stage's checkpoint:

  python -m basic.train --config=configs/clipa_v2_h14.py:stage=pretrain84 --workdir=W84
  python -m basic.train --config=configs/clipa_v2_h14.py:stage=tune224 --workdir=W224 \
      --config.init_from=W84
  python -m basic.train --config=configs/clipa_v2_h14.py:stage=tune336 --workdir=W336 \
      --config.init_from=W224

(`:stage=tune224,init_from=W84` sets it from the argument string as well). Append `,runlocal` (or
`:runlocal=True`) for the small twin that trains on the embedded synthetic data here; its
pretrain84 stage uses 16 px images and 4-word captions, its tune stages 32 px and 16 tokens.

Numbers cite CLIPA's public JAX code, UCSC-VLAA/CLIPA `clipa_jax/configs/model_h/`:
`84_8_pre_training.py` [P], `unmask_tuning_224_scheduleX4.py` [T224] and
`unmask_tuning_336_scheduleX1.py` [T336]. Its image masking ('mask_ratio') is random patch
masking; its text reduction at 8 tokens is `noun_tokenize` (syntax masking), here the documented
approximation of basic/data/text_mask.py. Its text tokenizer is BERT-base WordPiece (30522 ids);
here a SentencePiece model of the same vocabulary size (point `tokenizer.model_path` at yours).
Position embeddings are fixed 2-D sin-cos for the image (nothing to resize between 84, 224 and
336 px) and learned for the text (interpolated 8 -> 32 on load, basic/models/posemb.py).
Pod (CHOICE, the plan's device count): TPU v3-256 [CLIPA-v2 reports TPU v3 pods], mesh data=-1,
FSDP for parameters of >= 2^18 elements ([P]: partition_states=True), gradient-cache
microbatches of 4096 / 1024 / 1024 per stage, chosen from a TPU compiler plan that did not
reproduce: re-planned (python -m basic.plan --topology=v3:8x16; BENCHMARKS.md "TPU compiler
plans", "Re-planned") they need 0.70 / 0.69 / 0.85 GiB per 16 GiB core (>= 94% headroom), so
larger ones fit: pretrain84 at 65536 (K = 1) needs 2.39 GiB, roofline 0.77 s against 1.33 s at
4096 (MFU bound 0.82 against 0.48); not re-chosen here (the tune stages not searched).
"""
from basic import config_defaults
from basic import models
from configs import common

# Per stage: [P], [T224], [T336].
STAGES = {
    'pretrain84': dict(
        image_size=84,            # [P] res=84.
        text_length=8,            # [P] token_len=8,
        text_mask='syntax',       # [P] noun_tokenize: "syntax sampling".
        mask_ratio=0.0,           # [P] mask_ratio = 0.0.
        batch_size=65536,         # [P] batchsize=65536.
        # (CHOICE) TPU compiler plan on v3:8x16 (BENCHMARKS.md "TPU compiler plans"): 0.70 GiB
        # per 16 GiB core; 6.07e13 FLOPs per core, 1.55 x the model FLOPs; MFU bound 0.48.
        microbatch_size=4096,
        # [P] total_steps = 1281167 * 10000 // 65536: 10,000 "virtual ImageNet epochs",
        # ~12.8B samples.
        total_steps=1281167 * 10000 // 65536,
        learning_rate=8e-6 * (65536 // 256),   # [P] lr = 8e-6 * batch / 256 = 2.048e-3.
        warmup_steps=3200,        # [P] warmup_steps = 3200.
    ),
    'tune224': dict(
        image_size=224,           # [T224] res=224.
        text_length=32,           # [T224] token_len=32, plain (truncating) tokenisation.
        text_mask='none',
        mask_ratio=0.3,           # [T224] mask_ratio = 0.3 (masking kept in fine-tuning).
        batch_size=32768,         # [T224] batchsize=32768.
        microbatch_size=1024,     # (CHOICE) 0.69 GiB per core (plan); MFU bound 0.56.
        total_steps=131072000 * 4 // 32768,    # [T224] 4 x 131M samples: 16,000 steps.
        learning_rate=4e-7 * (32768 // 256),   # [T224] lr = 4e-7 * batch / 256 = 5.12e-5.
        warmup_steps=26214400 // 32768,        # [T224] 26.2M samples of warmup: 800 steps.
    ),
    'tune336': dict(
        image_size=336,           # [T336] res=336.
        text_length=32,           # [T336] token_len=32.
        text_mask='none',
        mask_ratio=0.4,           # [T336] mask_ratio = 0.4.
        batch_size=16384,         # [T336] batchsize=16384.
        microbatch_size=1024,     # (CHOICE) 0.85 GiB per core (plan); MFU bound 0.64.
        total_steps=131072000 // 16384,        # [T336] 131M samples: 8,000 steps.
        learning_rate=1e-7 * (16384 // 256),   # [T336] lr = 1e-7 * batch / 256 = 6.4e-6.
        warmup_steps=26214400 // 16384,        # [T336] 26.2M samples of warmup: 1,600 steps.
    ),
}

# The small twin (runlocal): reduced tokens in pretrain84, full tokens (32 px, 16) after.
LOCAL_STAGES = {
    'pretrain84': dict(image_size=16, text_length=8, text_mask='syntax', text_words=4,
                       mask_ratio=0.0),
    'tune224': dict(image_size=32, text_length=16, text_mask='none', text_words=0,
                    mask_ratio=0.3),
    'tune336': dict(image_size=32, text_length=16, text_mask='none', text_words=0,
                    mask_ratio=0.0),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, stage='pretrain84', runlocal=False, init_from='')
  if arg.stage not in STAGES:
    raise ValueError(f'Unknown config argument stage={arg.stage!r}; one of {sorted(STAGES)}.')
  stage = STAGES[arg.stage]
  config = common.base_config()

  config.batch_size = stage['batch_size']
  config.microbatch_size = stage['microbatch_size']   # (CHOICE) gradient-cache microbatches.
  config.loss = 'softmax'          # [P] contrastive softmax loss (big_vision two_towers).
  config.loss_chunk_size = 1024    # (CHOICE) bounds the loss memory at 1024 x N logits.
  config.total_steps = stage['total_steps']
  config.log_every_steps = 50      # [P] log_training_steps = 50.
  config.eval_every_steps = 1000   # [P] evals log_steps = 1000.
  config.checkpoint_every_steps = 1000   # [P] ckpt_steps = 1000.
  config.keep_checkpoints = 3
  config.init_from = arg.init_from  # Previous stage's workdir (or --config.init_from=...).

  common.paper_data(config, image_size=stage['image_size'], text_length=stage['text_length'])
  # [P] inception_crop(area_min=40): random resized crop of 40-100% of the area.
  config.data.augment.crop_scale = (0.4, 1.0)
  # [P] vgg_value_range: ImageNet mean / std (paper_data's default).
  config.data.text_mask.kind = stage['text_mask']
  config.data.text_mask.length = 0  # Words kept = data.text_length.

  config.model.embed_dim = 1024          # [P] out_dim 1024 for 'H' (image and text heads).
  config.model.dtype = 'bfloat16'        # (CHOICE) big_vision's default activations on TPU.
  config.model.temperature_init = 0.07   # [P] temperature_init = 1 / 0.07 (logit scale).
  config.model.temperature_min = 0.01

  config.model.image = config_defaults.tower('vit')
  config.model.image.variant = 'H/14'   # [P] img='H/14': big_vision ViT 'H' (width 1280, 32
                                         # layers, 16 heads, MLP 5120), patches of 14.
  config.model.image.pool = 'gap'        # [P] pool_type 'gap'.
  config.model.image.posemb = 'sincos2d'  # [P] posemb 'sincos2d'.
  config.model.image.dropout = 0.0
  config.model.image.remat = 'full'      # [P] remat_policy 'actcp' (gradient checkpointing).
  config.model.image.scan_layers = True   # (CHOICE) one nn.scan over identical blocks.
  config.model.image.mask.kind = 'random' if stage['mask_ratio'] else 'none'   # [T224/T336].
  config.model.image.mask.ratio = stage['mask_ratio']
  config.model.image.mask.cell = 2

  config.model.text = config_defaults.tower('transformer', kind='text')
  config.model.text.vocab_size = 30522   # [P] txt='bert_base': BERT-base WordPiece vocabulary.
  config.model.text.width = 1024         # [P] text variant = img 'H'; big_vision text 'H':
  config.model.text.depth = 24           # width 1024, 24 layers,
  config.model.text.num_heads = 16       # 16 heads,
  config.model.text.mlp_dim = 4096       # MLP 4096.
  config.model.text.causal = False       # big_vision text_transformer: bidirectional.
  config.model.text.pool = 'eos'         # [P] pool_type 'last' (here: the last non-pad token).
  config.model.text.dropout = 0.0
  config.model.text.remat = 'full'       # [T224] remat_policy 'actcp'.
  config.model.text.scan_layers = True   # (CHOICE) one nn.scan over identical blocks.

  config.optimizer.name = 'adamw'        # [P] scale_by_adam + decoupled weight decay.
  config.optimizer.learning_rate = stage['learning_rate']
  config.optimizer.warmup_steps = stage['warmup_steps']
  config.optimizer.schedule = 'cosine'   # [P] decay_type 'cosine',
  config.optimizer.end_lr_ratio = 0.0    # min_lr = 0.
  config.optimizer.b1 = 0.9              # [P] b1 = 0.9,
  config.optimizer.b2 = 0.95             # b2 = 0.95.
  config.optimizer.eps = 1e-8            # optax scale_by_adam's default eps.
  config.optimizer.weight_decay = 0.2    # [P] wd = 0.2.
  config.optimizer.grad_clip_norm = 0.0  # [P] no gradient clipping set.

  config.mesh.data = -1
  config.mesh.model = 1                  # [P] num_partitions = 1.
  config.sharding.rules = models.sharding_rules(config.model)
  config.sharding.fsdp = True            # [P] partition_states = True.
  config.sharding.fsdp_min_size = 2**18

  if arg.runlocal:
    local = LOCAL_STAGES[arg.stage]
    common.runlocal(
        config,
        image=dict(patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128, remat='none'),
        text=dict(width=64, depth=2, num_heads=4, mlp_dim=128, remat='none'))
    config.data.image_size = local['image_size']
    config.data.text_length = local['text_length']
    config.data.text_mask.kind = local['text_mask']
    config.data.text_mask.length = local['text_words']
    config.model.image.mask.kind = 'random' if local['mask_ratio'] else 'none'
    config.model.image.mask.ratio = local['mask_ratio']
    config.optimizer.grad_clip_norm = 1.0
  return config
