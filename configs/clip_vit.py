r"""CLIP ViT dual encoders (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision") by variant: `:variant=B/16` (~149.6M parameters, the default) or
`:variant=L/14` (~427.6M); configs/vit_b16.py and vit_l14.py are these two.

  python -m basic.train --config=configs/clip_vit.py:variant=L/14,runlocal --workdir=runs/l14_local

"CLIP Table N" refers to the CLIP paper's appendix (Table 19: hyper-parameters common to all
models; Table 20: ViT hyper-parameters). The image tower is the ViT variant of
basic/models/vit.py (`model.image.variant`: big_vision's sizes, which are CLIP's: B/16 width 768,
12 layers, 12 heads, MLP 3072; L/14 1024, 24, 16, 4096); the text tower, joint embedding and
learning rate are CLIP's per variant (`VARIANTS` below). Differences from CLIP's module: no
`ln_pre` LayerNorm before the image Transformer (2 x width parameters fewer), attention biases as
flax's MultiHeadDotProductAttention (same count as CLIP's in_proj/out_proj biases). Data as in
basic_*.py: `data.source='tfrecord'`, img2dataset-style shards at `data.tfrecord_pattern`.
Pod (CHOICE, not measured): B/16 on TPU v4-128, mesh data=-1 x model=1, remat
'dots_with_no_batch_dims_saveable'; L/14 on TPU v4-512, mesh data=-1 x model=2 (heads and MLP
over 2 chips), remat 'full'; both microbatch 8192 (K = 4), FSDP for parameters of >= 2^18
elements.
"""
from basic import config_defaults
from basic import models
from configs import common

# Per image variant: CLIP Table 20's text tower (12 layers, MLP 4 x width) and learning rate, the
# released models' joint embedding, and the pod choices above.
VARIANTS = {
    'B/16': dict(embed_dim=512, text_width=512, text_heads=8, learning_rate=5e-4,
                 remat='dots_with_no_batch_dims_saveable', mesh_model=1),
    'L/14': dict(embed_dim=768, text_width=768, text_heads=12, learning_rate=4e-4,
                 remat='full', mesh_model=2),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, variant='B/16', runlocal=False)
  if arg.variant not in VARIANTS:
    raise ValueError(f'configs/clip_vit.py: variant={arg.variant!r} is not one of '
                     f'{sorted(VARIANTS)}.')
  clip = VARIANTS[arg.variant]
  config = common.base_config()

  config.batch_size = 32768        # CLIP Table 19: minibatch size 32768.
  config.microbatch_size = 8192    # (CHOICE) K = 4 gradient-cache passes.
  config.loss = 'softmax'          # CLIP Sec. 2.3: symmetric cross-entropy.
  config.loss_chunk_size = 1024    # (CHOICE) bounds the loss memory at 1024 x N logits.
  config.total_steps = 390_625     # CLIP Sec. 2.5: 32 epochs of 400M pairs / 32768.
  config.log_every_steps = 100
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 2_000
  config.keep_checkpoints = 3

  common.paper_data(config, image_size=224,  # CLIP Sec. 2.5: 224 px pre-training.
                    text_length=77)          # CLIP: context length 77 (Sec. 2.4, code).
  config.data.mean = (0.48145466, 0.4578275, 0.40821073)  # CLIP's released preprocessing.
  config.data.std = (0.26862954, 0.26130258, 0.27577711)

  config.model.embed_dim = clip['embed_dim']   # CLIP: joint embedding 512 (B/16), 768 (L/14).
  config.model.dtype = 'bfloat16'       # (CHOICE) CLIP trained in fp16 mixed precision.
  config.model.temperature_init = 0.07  # CLIP Sec. 2.5: temperature init 0.07,
  config.model.temperature_min = 0.01   # logit scale clipped at 100.

  config.model.image = config_defaults.tower('vit')
  config.model.image.variant = arg.variant  # CLIP Table 20: ViT-B/16 or ViT-L/14.
  config.model.image.pool = 'cls'       # CLIP: class-token embedding.
  config.model.image.posemb = 'learn'   # CLIP: learned position embedding.
  config.model.image.dropout = 0.0
  config.model.image.remat = clip['remat']  # (CHOICE)
  config.model.image.scan_layers = True   # (CHOICE) one nn.scan over identical blocks.

  config.model.text = config_defaults.tower('transformer', kind='text')
  config.model.text.vocab_size = 49408  # CLIP Sec. 2.4: BPE vocabulary 49152 + specials.
  config.model.text.width = clip['text_width']   # CLIP Table 20: text width,
  config.model.text.depth = 12          # 12 layers,
  config.model.text.num_heads = clip['text_heads']   # heads,
  config.model.text.mlp_dim = 4 * clip['text_width']   # MLP 4 x width.
  config.model.text.causal = True       # CLIP Sec. 2.4: masked self-attention,
  config.model.text.pool = 'eos'        # features at the [EOS] token.
  config.model.text.dropout = 0.0
  config.model.text.remat = clip['remat']  # (CHOICE)
  config.model.text.scan_layers = True   # (CHOICE) one nn.scan over identical blocks.

  config.optimizer.name = 'adamw'       # CLIP Sec. 2.5: Adam with decoupled weight decay.
  config.optimizer.learning_rate = clip['learning_rate']   # CLIP Table 20.
  config.optimizer.warmup_steps = 2000  # CLIP Table 19: warm-up iterations 2000,
  config.optimizer.schedule = 'cosine'  # cosine schedule.
  config.optimizer.end_lr_ratio = 0.0
  config.optimizer.b1 = 0.9             # CLIP Table 19: Adam beta1 0.9,
  config.optimizer.b2 = 0.98            # beta2 0.98 (ViT),
  config.optimizer.eps = 1e-6           # epsilon 1e-6 (ViT).
  config.optimizer.weight_decay = 0.2   # CLIP Table 19: weight decay 0.2.
  config.optimizer.grad_clip_norm = 0.0  # CLIP: no gradient clipping stated.

  config.mesh.data = -1
  config.mesh.model = clip['mesh_model']   # (CHOICE) see the module docstring.
  config.sharding.rules = models.sharding_rules(config.model)
  config.sharding.fsdp = True
  config.sharding.fsdp_min_size = 2**18

  if arg.runlocal:
    common.runlocal(
        config,
        image=dict(patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128, remat='none'),
        text=dict(width=64, depth=2, num_heads=4, mlp_dim=128, remat='none'))
  return config
