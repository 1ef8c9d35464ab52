r"""BASIC-L (Pham et al. 2021, "Combined Scaling for Zero-shot Transfer Learning"): ~3.1B weights.

Image tower CoAtNet-7 (2.44B), text tower a 12-layer, 2048-wide Transformer (670M), batch 65536,
AdaFactorW. Pod recipe, and with `:runlocal=True` its small twin on the synthetic default:

  python -m basic.train --config=configs/basic_l.py:runlocal=True --workdir=runs/basic_l_local

CITATIONS AND WHAT WAS CHECKED. [BASIC-abs] = the BASIC abstract (arXiv 2111.10050 v1,
https://www.arxiv-vanity.com/papers/2111.10050/, and v3, http://www.arxiv.org/abs/2111.10050):
batch 65536, 6.6B image-text pairs, "largest model has 3B weights", the CLIP/ALIGN contrastive
framework, and (v1) online gradient caching / (v3) gradient checkpointing + model parallelism
against the memory limit. [CoAtNet] = Dai et al. 2021 (arXiv 2106.04803) for the image tower
sizes; its stage specs for CoAtNet-0..5 agree with timm's paper configs (timm/models/maxxvit.py).
(UNVERIFIED) marks numbers quoted from memory of the body of the BASIC paper (its model-size
table and training details): the body was not reachable with the look-up tools of this
repository's development (only the abstract and the first section of the stored copies), so
they are neither confirmed nor corrected; check them against the paper. Third-party notes on
the paper also name the "AdaFactorW" optimiser and rematerialisation:
https://michal.io/notes/ml/papers/2023-04-14---Combined-Scaling-for-Zero-shot-Transfer-Learning
(CHOICE) marks what is ours.

DATA. `data.source='tfrecord'`: img2dataset-style shards ('jpg', 'txt') at
`data.tfrecord_pattern` (configs/common.py `paper_data`); set it and `tokenizer.model_path` to
your bucket. Tests build the full model from `config.model` with `jax.eval_shape` only.

PLANNED FOR A POD (CHOICE): a TPU v5p-1024 slice (512 chips, 95 GiB HBM each):
- mesh: `data=-1` (128) x `model=4`: tensor parallelism over 4 chips (heads, MLP and MBConv
  hidden channels, vocabulary; `config.sharding.rules`), plus FSDP over 'data' for every
  parameter of >= 2^18 elements, so the 3.1B f32 parameters (12.4 GB) and the factored
  Adafactor state shard over all chips.
- microbatch 8192 (K = 8 gradient-cache passes): 64 images per 4-chip model group per pass;
  remat 'full' in both towers (each block recomputed in the backward pass).
- loss_chunk_size 1024: at most a 1024 x 65536 logit block (256 MiB f32) in the loss. The
  loss is sharded over the 512 chips (basic/contrastive_sharded.py): each computes its
  128 rows against all 65536 columns, so its block is 128 x 65536 (32 MiB).
MEASURED with the TPU compiler (`python -m basic.plan --topology=v5p:8x8x8`, layers scanned, loss
sharded; BENCHMARKS.md "TPU compiler plans"): 5.08 GiB per chip of v5p's 95 (95% headroom);
6.00e14 FLOPs per chip per step, 1.55 x the model FLOPs (gradient cache and full remat), a
roofline step of 1.31 s (FLOPs-bound) and an MFU bound of 0.64. (An earlier plan's 45.52 GiB
did not reproduce.) The XLA:CPU estimate (`--devices=512`, unscanned; BENCHMARKS.md "BASIC-L
plan") was 58.3 GiB per device, and XLA:CPU does not realise remat. Before the
text tower constrained its token-embedding output to the data axis (basic/models/text.py,
`sharding.constrain_batch`) the same plan was 170.0 GiB: FSDP shards the embedding table's width
over 'data', the lookup's output inherited that, and every device ran the whole text microbatch.
Other slices (v4, v5e) with this mesh and microbatch: not planned.
"""
from basic import config_defaults
from basic import models
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  config = common.base_config()

  config.batch_size = 65536        # [BASIC-abs]: contrastive batch size 65536.
  config.microbatch_size = 8192    # (CHOICE) K = 8 microbatches on the pod above.
  config.loss = 'softmax'          # [BASIC-abs]: the CLIP/ALIGN contrastive (InfoNCE) loss.
  config.loss_chunk_size = 1024    # (CHOICE) memory of the loss, see above.
  config.total_steps = 500_000     # (UNVERIFIED) BASIC training details.
  config.log_every_steps = 100
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 2_000
  config.keep_checkpoints = 3

  common.paper_data(config,
                    image_size=224,   # (UNVERIFIED) BASIC: pre-training resolution 224.
                    text_length=64)   # (UNVERIFIED) BASIC: 64 tokens, as ALIGN.

  config.model.embed_dim = 1024        # (CHOICE) not in the parts of the paper checked.
  config.model.dtype = 'bfloat16'      # (CHOICE) bf16 activations on TPU, f32 parameters.
  config.model.temperature_init = 0.07  # (CHOICE) CLIP's init; BASIC learns the temperature.
  config.model.temperature_min = 0.01

  config.model.image = config_defaults.tower('coatnet')
  config.model.image.variant = 'coatnet-7'  # (UNVERIFIED) BASIC model-size table: CoAtNet-7.
  config.model.image.drop_path = 0.0        # (CHOICE) no stochastic depth for 6.6B pairs.
  config.model.image.remat = 'full'         # [BASIC-abs] v3: gradient checkpointing.
  config.model.image.scan_layers = True   # (CHOICE) one nn.scan over identical blocks.

  config.model.text = config_defaults.tower('transformer', kind='text')
  config.model.text.vocab_size = 32_000  # (UNVERIFIED) BASIC: 32K SentencePiece vocabulary.
  config.model.text.width = 2048         # (UNVERIFIED) BASIC model-size table: hidden 2048,
  config.model.text.depth = 12           # 12 layers,
  config.model.text.num_heads = 16       # 16 heads: 670M text parameters.
  config.model.text.mlp_dim = 8192       # (CHOICE) the usual 4 x width.
  config.model.text.causal = False       # (CHOICE) bidirectional, as ALIGN's BERT.
  config.model.text.pool = 'mean'        # (CHOICE) mean over non-padding tokens.
  config.model.text.dropout = 0.0
  config.model.text.remat = 'full'       # [BASIC-abs] v3: gradient checkpointing.
  config.model.text.scan_layers = True   # (CHOICE) one nn.scan over identical blocks.

  config.optimizer.name = 'adafactorw'   # (UNVERIFIED) BASIC: AdaFactor + decoupled weight decay.
  config.optimizer.learning_rate = 1e-3  # (UNVERIFIED) peak learning rate.
  config.optimizer.warmup_steps = 10_000  # (UNVERIFIED) linear warmup,
  config.optimizer.schedule = 'cosine'   # then cosine decay (UNVERIFIED)
  config.optimizer.end_lr_ratio = 0.0    # to zero.
  config.optimizer.weight_decay = 0.005  # (UNVERIFIED) decoupled, lr-scaled, on kernels only.
  config.optimizer.factored = True       # Adafactor (Shazeer & Stern 2018): factored moments.
  config.optimizer.decay_rate = 0.8      # Adafactor default: beta2_t = 1 - t^-0.8.
  config.optimizer.b1 = 0.9              # (CHOICE) momentum, as AdamW (None = none).
  config.optimizer.clipping_threshold = 1.0  # Adafactor default update clipping.
  config.optimizer.eps = 1e-30           # Adafactor default epsilon1.
  config.optimizer.min_dim_size_to_factor = 128  # optax default.
  config.optimizer.grad_clip_norm = 1.0  # (CHOICE) global-norm clipping before Adafactor.

  config.mesh.data = -1
  config.mesh.model = 4                  # (CHOICE) see the module docstring.
  config.sharding.rules = models.sharding_rules(config.model)
  config.sharding.fsdp = True
  config.sharding.fsdp_min_size = 2**18

  if arg.runlocal:
    common.runlocal(
        config,
        image=dict(variant='', stem_dim=16, depths=(1, 1, 1, 1), dims=(16, 32, 64, 96),
                   block_types='CCTT', strides=(2, 2, 2, 2), head_dim=16, drop_path=0.1,
                   remat='none'),
        text=dict(width=64, depth=2, num_heads=4, mlp_dim=128, remat='none'))
  return config
