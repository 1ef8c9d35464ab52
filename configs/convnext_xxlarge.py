r"""OpenCLIP ConvNeXt-XXLarge CLIP (`CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg`), 1.2B params.

  python -m basic.train --config=configs/convnext_xxlarge.py:runlocal=True --workdir=runs/cx_local
  python -m basic.plan --config=configs/convnext_xxlarge.py --devices=256

"Card" is the model card of `laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup`
(/work/shared/seeds/004_f35b7320e2a0f74a.txt): its tables and its `srun ... training.main`
command lines. "OpenCLIP" marks OpenCLIP's defaults where the card is silent
(`open_clip/model_configs/convnext_xxlarge.json`, `open_clip_train/params.py`, `data.py`,
`open_clip/transform.py`).

MODEL. Image tower: timm `convnext_xxlarge` (basic/models/convnext.py; depths 3-4-30-3, widths
384-768-1536-3072, LayerNorm eps 1e-5), global average pool + LayerNorm, then `image_proj`
(3072 -> 1024, no bias) = OpenCLIP's `head.proj`: 846,543,744 parameters. Text tower: 24 x 1024,
16 heads, context 77, vocabulary 49408, causal, final LayerNorm, exact GELU, LayerNorm eps 1e-5,
EOT pooling, `text_proj` (1024 -> 1024, no bias): 354,032,640. With the logit scale:
1,200,576,385, as open_clip_torch 3.3.0 / timm 1.0.31 count them (tests/test_convnext.py).

STAGES. Core run: this file. Rewind (`:rewind=True`): the card's rerun of the last ~10% (epochs
231-256) at batch 95744, lr 2e-3, stronger augmentation, starting from the core run's parameters
and optimiser state after epoch 230 (core step 230 * 1656 = 380,880). OpenCLIP resumed at its
own epoch boundary, so the rewind's schedule (length 256 * 1422 steps) continues at step
230 * 1422 = 327,060. basic.train has no "start a stage from another run's checkpoint at step S"
option yet (DESIGN.md "Stages"): until it has, restore the core checkpoint into the rewind's
workdir with `state.step = 327_060`. Soup: the released model averages the two final parameter
sets (card: "The two were averaged together in a 'soup'"), see README.

PLANNED FOR A GPU CLUSTER (CHOICE, not measured on hardware): 256 x A100 40GB (32 nodes of 8;
the card ran 1024 x A100 40GB at a local batch of 80 with gradient checkpointing). Gradient
caching replaces the 4x more GPUs: microbatch 20480 = 80 images per GPU per pass, K = 4 passes
per step of 81920. Mesh data=256 x model=1; FSDP shards every parameter of >= 2^18 elements
and its Adam moments over the 256 GPUs; `config.sharding.rules` split the ConvNeXt MLPs and the
text Transformer over 'model' when model > 1. Remat 'full' in every block of both towers (the
card's `--grad-checkpointing`). `python -m basic.plan` (BENCHMARKS.md, "ConvNeXt-XXLarge plan")
estimates the per-device memory of this step. A TPU v4-512 slice (256 chips, 32 GiB each) runs
the same mesh and microbatch: the TPU compiler's plan (`python -m basic.plan --topology=v4:8x8x4`,
layers scanned; BENCHMARKS.md "TPU compiler plans") needs 9.34 GiB per chip, 71% headroom.
"""
from basic import config_defaults
from basic import models
from configs import common

_CORE_STEPS_PER_EPOCH = 1656   # OpenCLIP data.py: ceil(ceil(135646078 / 81920) / 6 workers) * 6.
_REWIND_STEPS_PER_EPOCH = 1422  # The same at batch 95744: ceil(ceil(1416.76) / 6) * 6.
_EPOCHS = 256                  # Card: --epochs=256 "checkpoint intervals" of 135.6M samples.

def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, rewind=False)
  config = common.base_config()

  config.batch_size = 81920        # Card: "global batch size of 81920" (1024 GPUs x 80).
  config.microbatch_size = 20480   # (CHOICE) K = 4: 80 per GPU on 256 GPUs, see above.
  # OpenCLIP ClipLoss with --local-loss --gather-with-grad: the global-batch gradient.
  config.loss = 'softmax'
  config.loss_chunk_size = 1024    # (CHOICE) at most a 1024 x N logit block (320 MiB f32).
  # 423,936 steps x 81920 = 34.7B samples (card: "~34B samples seen").
  config.total_steps = _CORE_STEPS_PER_EPOCH * _EPOCHS
  config.log_every_steps = 50      # Card: --log-every-n-steps 50.
  config.eval_every_steps = _CORE_STEPS_PER_EPOCH
  config.checkpoint_every_steps = _CORE_STEPS_PER_EPOCH  # Card: --save-frequency 1 (epoch).
  config.keep_checkpoints = 3

  common.paper_data(config, image_size=256,   # Card: "trained at 256x256 image resolution".
                    text_length=77)           # OpenCLIP convnext_xxlarge.json: context 77.
  # OpenCLIP's default normalisation (OPENAI_DATASET_MEAN / _STD).
  config.data.mean = (0.48145466, 0.4578275, 0.40821073)
  config.data.std = (0.26862954, 0.26130258, 0.27577711)
  config.data.resize_method = 'bicubic'  # OpenCLIP: bicubic interpolation.
  # Card: --aug-cfg use_timm=True scale='(0.33, 1.0)' re_prob=0.35, i.e. timm's
  # create_transform with OpenCLIP's hflip=0., re_mode='pixel' and color jitter off; the ratio
  # ranges are timm's defaults (RandomResizedCrop ratio, RandomErasing min/max area and aspect).
  config.data.augment.crop_scale = (0.33, 1.0)    # Card: RRC (0.33, 1.0).
  config.data.augment.crop_ratio = (3 / 4, 4 / 3)  # timm default ratio (3/4, 4/3).
  config.data.augment.flip = False                # OpenCLIP: timm create_transform(hflip=0.).
  config.data.augment.erasing_prob = 0.35         # Card: RE (0.35).
  config.data.augment.erasing_scale = (0.02, 1 / 3)  # timm RandomErasing min/max_area.
  config.data.augment.erasing_ratio = (0.3, 1 / 0.3)  # timm: min_aspect 0.3, max 1 / min.

  config.model.embed_dim = 1024         # OpenCLIP convnext_xxlarge.json: embed_dim 1024.
  config.model.dtype = 'bfloat16'       # Card: --precision amp_bfloat16.
  config.model.temperature_init = 0.07  # OpenCLIP: logit_scale init ln(1 / 0.07),
  config.model.temperature_min = 0.01   # clamped at ln(100).

  config.model.image = config_defaults.tower('convnext')
  config.model.image.variant = 'convnext_xxlarge'  # Card: timm convnext_xxlarge image tower.
  config.model.image.drop_path = 0.1    # Card: SD (0.1), image tower only (json timm_drop_path).
  config.model.image.remat = 'full'     # Card: --grad-checkpointing.
  # (CHOICE) One nn.scan over each stage's blocks after its first (basic.models.scan): the same
  # parameters, stacked; compile time and compiler memory independent of depth.
  config.model.image.scan_layers = True

  config.model.text = config_defaults.tower('transformer', kind='text')
  config.model.text.vocab_size = 49408  # OpenCLIP convnext_xxlarge.json: vocab_size 49408,
  config.model.text.width = 1024        # Card: "a text tower with same size (with 1024,
  config.model.text.depth = 24          # heads 16, depth 24) as ViT-H-14 and ViT-g-14".
  config.model.text.num_heads = 16
  config.model.text.mlp_dim = 4096      # OpenCLIP CLIPTextCfg: mlp_ratio 4.0.
  config.model.text.causal = True       # OpenCLIP TextTransformer: causal attn_mask.
  # OpenCLIP: pool_type 'argmax' (the EOT token has CLIP BPE's highest id, 49407). It needs a
  # tokenizer whose EOT has the highest id; with a SentencePiece model use 'eos'.
  config.model.text.pool = 'argmax'
  config.model.text.activation = 'gelu'  # OpenCLIP: nn.GELU (exact) for non-quickgelu models.
  config.model.text.norm_eps = 1e-5      # OpenCLIP LayerNorm = torch default eps 1e-5.
  config.model.text.dropout = 0.0
  config.model.text.remat = 'full'       # Card: --grad-checkpointing (both towers).
  config.model.text.scan_layers = True   # (CHOICE) As the image tower.

  config.optimizer.name = 'adamw'       # OpenCLIP default --opt adamw.
  config.optimizer.learning_rate = 1e-3  # Card: --lr 1e-3.
  config.optimizer.warmup_steps = 10_000  # Card: --warmup 10000.
  config.optimizer.schedule = 'cosine'  # OpenCLIP default --lr-scheduler cosine,
  config.optimizer.end_lr_ratio = 0.0   # to 0.
  config.optimizer.b1 = 0.9             # OpenCLIP default (params.py, non-ViT models).
  config.optimizer.b2 = 0.98            # Card: --beta2 0.98.
  config.optimizer.eps = 1e-8           # OpenCLIP default (params.py, non-ViT models).
  config.optimizer.weight_decay = 0.2   # OpenCLIP default --wd 0.2 (not on gains / biases).
  config.optimizer.grad_clip_norm = 5.0  # Card: --grad-clip-norm 5.0.

  config.mesh.data = -1                 # (CHOICE) 256 GPUs, see the module docstring.
  config.mesh.model = 1
  config.sharding.rules = models.sharding_rules(config.model)
  config.sharding.fsdp = True           # (CHOICE) 14.4 GB of f32 params + Adam moments.
  config.sharding.fsdp_min_size = 2**18

  if arg.rewind:
    config.batch_size = 95744           # Card: rewind "global batch size of 95744" (1088 x 88).
    # (CHOICE) The same 256 GPUs: 95744 = 256 x 374 = 256 x 34 x 11, so K = 11 passes of 34
    # images per GPU (a K of 4 would need 272 GPUs at 88 each: microbatch 23936).
    config.microbatch_size = 8704
    # 364,032 = OpenCLIP's schedule length at the new batch; the rewind runs its steps
    # 327,060 .. 364,032 (epochs 231-256, 3.5B samples).
    config.total_steps = _REWIND_STEPS_PER_EPOCH * _EPOCHS
    config.eval_every_steps = _REWIND_STEPS_PER_EPOCH
    config.checkpoint_every_steps = _REWIND_STEPS_PER_EPOCH
    config.optimizer.learning_rate = 2e-3         # Card (rewind): --lr 2e-3.
    config.data.augment.crop_scale = (0.3, 1.0)   # Card (rewind): RRC (0.3, 1.0).
    config.data.augment.erasing_prob = 0.4        # Card (rewind): RE (0.4).

  if arg.runlocal:
    common.runlocal(
        config,
        # 32 px: stem /4 -> 8x8, then 4x4, 2x2, 1x1.
        image=dict(variant='', depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), norm_eps=1e-5,
                   drop_path=0.1, remat='none'),
        # The synthetic default's SentencePiece EOS is not its highest id: pool at the EOS.
        text=dict(width=64, depth=2, num_heads=4, mlp_dim=128, pool='eos', remat='none'))
  return config
