r"""BASIC-M (Pham et al. 2021, "Combined Scaling for Zero-shot Transfer Learning").

Image tower CoAtNet-3 (168M), text tower a 12-layer, 1024-wide Transformer, batch 65536,
AdaFactorW. Pod recipe, and with `:runlocal=True` its small twin on the synthetic default:

  python -m basic.train --config=configs/basic_m.py:runlocal=True --workdir=runs/basic_m_local

CITATIONS. "BASIC Sec. N / Table N" refers to the BASIC paper, "CoAtNet Table N" to Dai et al.
2021. Numbers marked (UNVERIFIED) are quoted from memory of the BASIC paper's model-size table
and training details, which were not available offline when this file was written; check them
against the paper. Numbers marked (CHOICE) are not given by the paper.

DATA. `data.source='tfrecord'` (img2dataset-style shards) is what the data issue adds; until it
lands `basic.config_lib.validate` rejects this config (only 'synthetic' exists), so tests build the
full model from `config.model` with `jax.eval_shape` only.

PLANNED FOR A POD (CHOICE, not measured): a TPU v4-256 slice (128 chips) or v5e-256:
- mesh: `data=-1` (128) x `model=1`: pure data parallelism; FSDP over 'data' for parameters of
  >= 2^18 elements (the 0.36B f32 parameters and optimiser state shard over all chips). The
  `config.sharding.rules` (tensor parallelism over 'model') are no-ops at model=1 and ready for
  model > 1.
- microbatch 16384 (K = 4 gradient-cache passes): 128 images per chip per pass; remat
  'dots_with_no_batch_dims_saveable' (matmul outputs kept, the rest recomputed).
- loss_chunk_size 1024: at most a 1024 x 65536 logit block (256 MiB f32) in the loss.
"""
import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  config = common.base_config()

  config.batch_size = 65536        # BASIC Sec. 1 / abstract: contrastive batch size 65536.
  config.microbatch_size = 16384   # (CHOICE) K = 4 microbatches on the pod above.
  config.loss = 'softmax'          # BASIC Sec. 3: the CLIP/ALIGN contrastive (InfoNCE) loss.
  config.loss_chunk_size = 1024    # (CHOICE) memory of the loss, see above.
  config.total_steps = 500_000     # (UNVERIFIED) BASIC Sec. 7 training details.
  config.log_every_steps = 100
  config.eval_every_steps = 10_000
  config.checkpoint_every_steps = 2_000
  config.keep_checkpoints = 3

  common.paper_data(config,
                    image_size=224,   # (UNVERIFIED) BASIC Sec. 7: pre-training resolution 224.
                    text_length=64)   # (UNVERIFIED) BASIC Sec. 7: 64 tokens, as ALIGN.

  config.model.embed_dim = 1024        # (CHOICE) the paper does not state it here.
  config.model.dtype = 'bfloat16'      # (CHOICE) bf16 activations on TPU, f32 parameters.
  config.model.temperature_init = 0.07  # (CHOICE) CLIP's init; BASIC learns the temperature.
  config.model.temperature_min = 0.01

  config.model.image = ml_collections.ConfigDict()
  config.model.image.name = 'coatnet'
  config.model.image.variant = 'coatnet-3'  # BASIC Table (model sizes): CoAtNet-3 image tower.
  config.model.image.drop_path = 0.0        # (CHOICE) no stochastic depth for 6.6B pairs.
  config.model.image.remat = 'dots_with_no_batch_dims_saveable'         # BASIC Sec. 4: rematerialisation of activations.

  config.model.text = ml_collections.ConfigDict()
  config.model.text.name = 'transformer'
  config.model.text.vocab_size = 32_000  # (UNVERIFIED) BASIC Sec. 7: 32K SentencePiece vocab.
  config.model.text.width = 1024         # (UNVERIFIED) BASIC Table (model sizes): hidden 1024,
  config.model.text.depth = 12           # 12 layers,
  config.model.text.num_heads = 16       # 16 heads.
  config.model.text.mlp_dim = 4096       # (CHOICE) the usual 4 x width.
  config.model.text.causal = False       # (CHOICE) bidirectional, as ALIGN's BERT.
  config.model.text.pool = 'mean'        # (CHOICE) mean over non-padding tokens.
  config.model.text.dropout = 0.0
  config.model.text.remat = 'dots_with_no_batch_dims_saveable'  # BASIC Sec. 4.

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'adafactorw'   # BASIC Sec. 7: AdaFactor with decoupled weight decay.
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

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.model = 1                  # (CHOICE) see the module docstring.
  config.sharding = ml_collections.ConfigDict()
  config.sharding.rules = common.COATNET_RULES + common.TRANSFORMER_RULES
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
