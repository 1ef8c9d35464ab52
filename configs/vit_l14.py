r"""CLIP ViT-L/14 (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"): a CLIP-compatible dual encoder, ~427.6M parameters.

  python -m basic.train --config=configs/vit_l14.py:runlocal=True --workdir=runs/vit_l14_local

"CLIP Table N" refers to the CLIP paper's appendix (Table 19: hyper-parameters common to all
models; Table 20: ViT hyper-parameters). Differences from CLIP's module: no `ln_pre` LayerNorm
before the image Transformer (2 x 1024 parameters fewer), attention biases as flax's
MultiHeadDotProductAttention (same count as CLIP's in_proj/out_proj biases). Data as in
basic_*.py: `data.source='tfrecord'`, img2dataset-style shards at `data.tfrecord_pattern`.
Pod (CHOICE, not measured): TPU v4-512, mesh data=-1 x model=2, microbatch 8192 (K = 4),
remat 'full', FSDP for parameters of >= 2^18 elements.
"""
import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
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

  config.model.embed_dim = 768          # CLIP ViT-L/14: joint embedding 768.
  config.model.dtype = 'bfloat16'       # (CHOICE) CLIP trained in fp16 mixed precision.
  config.model.temperature_init = 0.07  # CLIP Sec. 2.5: temperature init 0.07,
  config.model.temperature_min = 0.01   # logit scale clipped at 100.

  config.model.image = ml_collections.ConfigDict()
  config.model.image.name = 'vit'
  config.model.image.patch_size = 14    # CLIP Table 20: ViT-L/14,
  config.model.image.width = 1024       # width 1024,
  config.model.image.depth = 24         # 24 layers,
  config.model.image.num_heads = 16     # 16 heads,
  config.model.image.mlp_dim = 4096     # MLP 4 x width.
  config.model.image.pool = 'cls'       # CLIP: class-token embedding.
  config.model.image.posemb = 'learn'   # CLIP: learned position embedding.
  config.model.image.dropout = 0.0
  config.model.image.remat = 'full'  # (CHOICE)
  config.model.image.scan_layers = True   # (CHOICE) one nn.scan over identical blocks.

  config.model.text = ml_collections.ConfigDict()
  config.model.text.name = 'transformer'
  config.model.text.vocab_size = 49408  # CLIP Sec. 2.4: BPE vocabulary 49152 + specials.
  config.model.text.width = 768         # CLIP Table 20: text width 768,
  config.model.text.depth = 12          # 12 layers,
  config.model.text.num_heads = 12      # 12 heads,
  config.model.text.mlp_dim = 3072      # MLP 4 x width.
  config.model.text.causal = True       # CLIP Sec. 2.4: masked self-attention,
  config.model.text.pool = 'eos'        # features at the [EOS] token.
  config.model.text.dropout = 0.0
  config.model.text.remat = 'dots_with_no_batch_dims_saveable'  # (CHOICE)
  config.model.text.scan_layers = True   # (CHOICE) one nn.scan over identical blocks.

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adamw'       # CLIP Sec. 2.5: Adam with decoupled weight decay.
  config.optimizer.learning_rate = 4e-4  # CLIP Table 20: ViT-L/14 learning rate 4e-4.
  config.optimizer.warmup_steps = 2000  # CLIP Table 19: warm-up iterations 2000,
  config.optimizer.schedule = 'cosine'  # cosine schedule.
  config.optimizer.end_lr_ratio = 0.0
  config.optimizer.b1 = 0.9             # CLIP Table 19: Adam beta1 0.9,
  config.optimizer.b2 = 0.98            # beta2 0.98 (ViT),
  config.optimizer.eps = 1e-6           # epsilon 1e-6 (ViT).
  config.optimizer.weight_decay = 0.2   # CLIP Table 19: weight decay 0.2.
  config.optimizer.grad_clip_norm = 0.0  # CLIP: no gradient clipping stated.

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.model = 2                 # (CHOICE) heads / MLP over 2 chips.
  config.sharding = ml_collections.ConfigDict()
  config.sharding.rules = common.TRANSFORMER_RULES
  config.sharding.fsdp = True
  config.sharding.fsdp_min_size = 2**18

  if arg.runlocal:
    common.runlocal(
        config,
        image=dict(patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128, remat='none'),
        text=dict(width=64, depth=2, num_heads=4, mlp_dim=128, remat='none'))
  return config
