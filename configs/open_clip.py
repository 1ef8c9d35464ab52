r"""OpenCLIP / OpenAI CLIP dual encoders in basic's layout, with CLIP's BPE tokenizer.

`basic.convert.open_clip` writes converted weights with the config of `clip_vit(...)` (ViT image
towers) or `clip_convnext(...)` (OpenCLIP's timm ConvNeXt towers), the architecture read from the
state dict; `get_config` gives OpenCLIP's ViT-B-32 itself, e.g. to train one from scratch on your
shards:

  python -m basic.train --config=configs/open_clip.py:model=ViT-B-32 --workdir=runs/b32 \
      --config.tokenizer.model_path=PATH/bpe_simple_vocab_16e6.txt.gz \
      --config.data.tfrecord_pattern='shards/*.tfrecord'

Everything but the towers and the tokenizer is configs/vit_b16.py's (the CLIP paper's training
recipe, data on TFRecord shards, OpenAI's mean / std, pod mesh and sharding). The towers follow
OpenCLIP's modules exactly (basic/models/vit.py, text.py): a ViT with `ln_pre` and no
patch-embedding bias, class-token pooling; a causal text Transformer that attends to every token
(`mask_padding=False`: CLIP's BPE gives id 0 to '!') and pools at the EOT token ('argmax');
LayerNorm eps 1e-5 (torch's); MLP activation 'quick_gelu' (OpenAI's weights and OpenCLIP's
'-quickgelu' models) or exact 'gelu' (OpenCLIP's other models).

`clip_convnext` is configs/convnext_xxlarge.py's (the model card's recipe: optimiser, data
augmentation, sharding rules, remat) with the sizes of the converted model: timm's ConvNeXt trunk
(basic/models/convnext.py: average pool + LayerNorm, then `image_proj` = OpenCLIP's `head.proj`)
and the same OpenCLIP text tower as above.
"""
import ml_collections

from configs import common
from configs import convnext_xxlarge
from configs import vit_b16

# OpenCLIP's model_configs/ViT-B-32.json (its text tower: OpenAI CLIP's).
VIT_B_32 = dict(image_size=224, patch_size=32, width=768, depth=12, num_heads=12, mlp_dim=3072,
                text_width=512, text_depth=12, text_num_heads=8, text_mlp_dim=2048,
                text_length=77, vocab_size=49408, embed_dim=512)
MODELS = {'ViT-B-32': VIT_B_32}
NORM_EPS = 1e-5               # torch.nn.LayerNorm's default, as in every OpenCLIP ViT.
CLIP_LOGIT_SCALE_MAX = 100.   # CLIP clamps its logit scale at 100: temperature >= 0.01.


def clip_vit(*, image_size: int, patch_size: int, width: int, depth: int, num_heads: int,
             mlp_dim: int, text_width: int, text_depth: int, text_num_heads: int,
             text_mlp_dim: int, text_length: int, vocab_size: int, embed_dim: int,
             activation: str = 'gelu', norm_eps: float = NORM_EPS, ln_pre: bool = True,
             causal: bool = True, temperature_init: float = 0.07,
             temperature_min: float = 1 / CLIP_LOGIT_SCALE_MAX,
             tokenizer_path: str = '', scan_layers: bool = False) -> ml_collections.ConfigDict:
  """The full experiment config of an OpenCLIP ViT CLIP of these sizes.

  Args:
    image_size, patch_size, width, depth, num_heads, mlp_dim: the image ViT.
    text_width, text_depth, text_num_heads, text_mlp_dim, text_length, vocab_size: the text
      Transformer (text_length: the context length, config.data.text_length).
    embed_dim: the joint embedding.
    activation: 'quick_gelu' or 'gelu' (basic.models.transformer.ACTIVATIONS), both towers.
    norm_eps: every LayerNorm's epsilon.
    ln_pre: the image tower's LayerNorm before its Transformer (OpenCLIP's `no_ln_pre=False`).
    causal: causal text attention (OpenCLIP's `no_causal_mask=False`).
    temperature_init, temperature_min: the temperature at init and its floor.
    tokenizer_path: CLIP's BPE merges file ('' = none: a run then takes the tokenizer of its
      config.init_from checkpoint, see basic.tokenizer.ensure_tokenizer).
    scan_layers: both towers scan their blocks (config.model.*.scan_layers; basic.models.scan),
      parameters stacked per layer; False: one module per block, as OpenCLIP's state dict.
  """
  config = vit_b16.get_config()
  _clip_common(config, image_size=image_size, text_width=text_width, text_depth=text_depth,
               text_num_heads=text_num_heads, text_mlp_dim=text_mlp_dim,
               text_length=text_length, vocab_size=vocab_size, embed_dim=embed_dim,
               text_activation=activation, text_norm_eps=norm_eps, causal=causal,
               temperature_init=temperature_init, temperature_min=temperature_min,
               tokenizer_path=tokenizer_path, scan_layers=scan_layers)
  image = config.model.image
  image.update(dict(variant='', patch_size=patch_size, width=width, depth=depth,
                    num_heads=num_heads, mlp_dim=mlp_dim, pool='cls', posemb='learn'))
  image.activation = activation
  image.norm_eps = norm_eps
  image.ln_pre = ln_pre
  image.patch_bias = False
  return config


def clip_convnext(*, image_size: int, depths: tuple[int, ...], dims: tuple[int, ...],
                  norm_eps: float, text_width: int, text_depth: int, text_num_heads: int,
                  text_mlp_dim: int, text_length: int, vocab_size: int, embed_dim: int,
                  text_activation: str = 'gelu', text_norm_eps: float = NORM_EPS,
                  causal: bool = True, drop_path: float = 0.0, temperature_init: float = 0.07,
                  temperature_min: float = 1 / CLIP_LOGIT_SCALE_MAX,
                  tokenizer_path: str = '', scan_layers: bool = False
                  ) -> ml_collections.ConfigDict:
  """The full experiment config of an OpenCLIP CLIP with a timm ConvNeXt image tower.

  Args:
    image_size: OpenCLIP's vision_cfg.image_size (a ConvNeXt has no position embedding to tell).
    depths, dims, norm_eps: the ConvNeXt stages (blocks, channels) and its LayerNorm epsilon
      (timm: 1e-6, `convnext_xxlarge` 1e-5).
    text_width, text_depth, text_num_heads, text_mlp_dim, text_length, vocab_size: the text
      Transformer, as in `clip_vit`.
    embed_dim: the joint embedding.
    text_activation, text_norm_eps: the text tower's MLP activation and LayerNorm epsilon (timm's
      ConvNeXt always uses exact GELU).
    causal: causal text attention.
    drop_path: the ConvNeXt's stochastic depth when training (OpenCLIP's timm_drop_path).
    temperature_init, temperature_min, tokenizer_path, scan_layers: as in `clip_vit`.
  """
  config = convnext_xxlarge.get_config()
  _clip_common(config, image_size=image_size, text_width=text_width, text_depth=text_depth,
               text_num_heads=text_num_heads, text_mlp_dim=text_mlp_dim,
               text_length=text_length, vocab_size=vocab_size, embed_dim=embed_dim,
               text_activation=text_activation, text_norm_eps=text_norm_eps, causal=causal,
               temperature_init=temperature_init, temperature_min=temperature_min,
               tokenizer_path=tokenizer_path, scan_layers=scan_layers)
  image = config.model.image
  image.variant = ''              # Explicit sizes (basic.models.convnext.variant_spec).
  image.depths = tuple(depths)
  image.dims = tuple(dims)
  image.norm_eps = norm_eps
  image.drop_path = drop_path
  return config


def _clip_common(config, *, image_size: int, text_width: int, text_depth: int,
                 text_num_heads: int, text_mlp_dim: int, text_length: int, vocab_size: int,
                 embed_dim: int, text_activation: str, text_norm_eps: float, causal: bool,
                 temperature_init: float, temperature_min: float, tokenizer_path: str,
                 scan_layers: bool):
  """What every converted CLIP shares: data sizes, CLIP's BPE, float32, the text tower."""
  config.data.image_size = image_size
  config.data.text_length = text_length
  # OpenCLIP's eval transform: shorter side resized (bicubic) to image_size, centre crop. TF's
  # bicubic resize is close to, not bit-equal with, PIL's: images already at image_size x
  # image_size are not resized, and give OpenCLIP's embeddings exactly.
  config.data.resize_method = 'bicubic'
  config.tokenizer.kind = 'clip_bpe'
  config.tokenizer.model_path = tokenizer_path
  # What clip_bpe always does (the fields are SentencePiece's; stated here for the reader).
  config.tokenizer.lowercase = True
  config.tokenizer.add_bos = True
  config.tokenizer.add_eos = True

  config.model.embed_dim = embed_dim
  config.model.dtype = 'float32'        # Exactly OpenCLIP's float32 numerics; bfloat16 trains.
  config.model.temperature_init = temperature_init
  config.model.temperature_min = temperature_min
  text = config.model.text
  text.update(dict(vocab_size=vocab_size, width=text_width, depth=text_depth,
                   num_heads=text_num_heads, mlp_dim=text_mlp_dim, causal=causal, pool='argmax'))
  text.activation = text_activation
  text.norm_eps = text_norm_eps
  text.mask_padding = False
  config.model.image.scan_layers = scan_layers
  text.scan_layers = scan_layers

def get_config(arg=None):
  arg = common.parse_arg(arg, model='ViT-B-32', quick_gelu=False, tokenizer='')
  if arg.model not in MODELS:
    raise ValueError(f'configs/open_clip.py: model={arg.model!r} is not one of {sorted(MODELS)}; '
                     'convert a checkpoint of another size with basic.convert.open_clip.')
  return clip_vit(**MODELS[arg.model], activation='quick_gelu' if arg.quick_gelu else 'gelu',
                  tokenizer_path=arg.tokenizer)
