r"""OpenCLIP / OpenAI CLIP ViT dual encoders in basic's layout, with CLIP's BPE tokenizer.

`basic.convert.open_clip` writes converted weights with the config of `clip_vit(...)` (the
architecture read from the state dict); `get_config` gives OpenCLIP's ViT-B-32 itself, e.g. to
train one from scratch on your shards:

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
"""
import ml_collections

from configs import common
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
             tokenizer_path: str = '') -> ml_collections.ConfigDict:
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
  """
  config = vit_b16.get_config()
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
  image = config.model.image
  image.update(dict(patch_size=patch_size, width=width, depth=depth, num_heads=num_heads,
                    mlp_dim=mlp_dim, pool='cls', posemb='learn'))
  image.activation = activation
  image.norm_eps = norm_eps
  image.ln_pre = ln_pre
  image.patch_bias = False
  text = config.model.text
  text.update(dict(vocab_size=vocab_size, width=text_width, depth=text_depth,
                   num_heads=text_num_heads, mlp_dim=text_mlp_dim, causal=causal, pool='argmax'))
  text.activation = activation
  text.norm_eps = norm_eps
  text.mask_padding = False
  return config


def get_config(arg=None):
  arg = common.parse_arg(arg, model='ViT-B-32', quick_gelu=False, tokenizer='')
  if arg.model not in MODELS:
    raise ValueError(f'configs/open_clip.py: model={arg.model!r} is not one of {sorted(MODELS)}; '
                     'convert a checkpoint of another size with basic.convert.open_clip.')
  return clip_vit(**MODELS[arg.model], activation='quick_gelu' if arg.quick_gelu else 'gelu',
                  tokenizer_path=arg.tokenizer)
