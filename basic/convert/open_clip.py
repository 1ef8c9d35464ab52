r"""Imports OpenCLIP / OpenAI CLIP weights (ViT or timm ConvNeXt image towers) as a basic
checkpoint (`pip install -e .[convert]`).

  python -m basic.convert.open_clip --model=ViT-B-32 --checkpoint=open_clip_model.safetensors \
      --output=runs/clip_b32
  python -m basic.convert.open_clip --model=convnext_xxlarge \
      --checkpoint=open_clip_pytorch_model.bin --output=runs/clip_convnext_xxlarge

--checkpoint: an OpenCLIP state dict (`.safetensors`, or a torch `.pt` / `.bin` / `.pth`: a bare
state dict, an OpenCLIP training checkpoint {'state_dict': ...} with or without DDP's 'module.'
prefix, or OpenAI's TorchScript archive such as ViT-B-32.pt). --model: the OpenCLIP model name
(its config, `open_clip.get_model_config(NAME)`, says what shapes cannot: the activation, QuickGELU
for '-quickgelu' names, GELU otherwise; head counts; LayerNorm eps; a ConvNeXt's image size and
timm model) or the path of a JSON file in the same format (OpenCLIP's model_configs/*.json, or an
`open_clip_config.json` with 'model_cfg'). OpenAI's TorchScript weights always use QuickGELU;
--quick_gelu overrides the config. --tokenizer: CLIP's BPE merges file (default: the
`bpe_simple_vocab_16e6.txt.gz` OpenCLIP ships).

The output directory then holds step 0 as a params-only checkpoint (basic.checkpoint, like a soup)
with its config (configs/open_clip.py `clip_vit` or `clip_convnext` of the sizes read from the
state dict) and the tokenizer (kind 'clip_bpe') inside, so that

  model = basic.inference.load('runs/clip_b32')
  python -m basic.train --config=configs/from_checkpoint.py:path=runs/clip_b32 --workdir=...

work as for a checkpoint basic trained. Parameter mapping (torch Linear weights are [out, in],
flax kernels [in, out]; torch conv weights [out, in / groups, kh, kw], flax [kh, kw, in / groups,
out]):
  visual.conv1.weight [W, 3, p, p]             -> image/embedding/kernel [p, p, 3, W] (no bias)
  visual.class_embedding + positional_embedding[0] -> image/cls [1, 1, W]
  visual.positional_embedding[1:]              -> image/pos_embedding [1, T, W]
  visual.ln_pre                                -> image/ln_pre
  *.transformer.resblocks.i.ln_1 / ln_2        -> */encoder/block{i:02d}/ln_attn / ln_mlp
  *.attn.in_proj_weight [3W, W] (q; k; v)      -> .../attn/{query,key,value}/kernel [W, H, W/H]
  *.attn.out_proj.weight [W, W]                -> .../attn/out/kernel [H, W/H, W]
  *.mlp.c_fc / c_proj                          -> .../mlp/fc1 / fc2
  visual.ln_post, ln_final                     -> image/encoder/ln_final, text/encoder/ln_final
  visual.proj [W, E], text_projection [Wt, E]  -> image_proj/kernel, text_proj/kernel
  token_embedding.weight, positional_embedding -> text/token_embedding, text/pos_embedding
  logit_scale = log(1 / T)                     -> log_temperature = -logit_scale
OpenCLIP's `TimmModel` around a timm ConvNeXt (vision_cfg.timm_model_name, e.g. the model card's
`convnext_xxlarge`; timm_pool '' or 'avg', timm_proj 'linear' without bias) has its trunk at
`visual.trunk` (timm's names; LayerNorm2d on NCHW = LayerNorm over the channels of NHWC):
  visual.trunk.stem.0 (conv 4x4 / 4), stem.1 (LayerNorm) -> image/stem_conv, image/stem_norm
  visual.trunk.stages.s.downsample.0 / .1      -> image/stage{s}_downsample_norm / _conv
  visual.trunk.stages.s.blocks.i.conv_dw [C, 1, 7, 7] -> image/stage{s}_block{i:02d}/conv_dw
      [7, 7, 1, C]; .norm, .mlp.fc1, .mlp.fc2, .gamma -> .../norm, mlp_fc1, mlp_fc2, gamma
      (conv_mlp models' 1x1-conv fc weights [O, I, 1, 1] are read as Linear weights)
  visual.trunk.head.norm                       -> image/head_norm
  visual.head.proj.weight [E, C]               -> image_proj/kernel [C, E]
Stages, depths and widths are read from the shapes. Its LayerNorm eps is timm's for the model:
basic.models.convnext.VARIANTS for timm's convnext_* names (1e-6; convnext_xxlarge 1e-5), or read
from timm's own model for another registered name; --norm_eps overrides (a custom trunk).
The mapping is one table, `param_table(arch)`: rows of (OpenCLIP keys and shapes, basic paths,
the transform to basic and its exact inverse), read forwards here and backwards by
basic.export.open_clip. Every state-dict entry must be used and every parameter found, or the
conversion fails naming the key. The temperature floor (config.model.temperature_min) is
CLIP's 0.01, lowered to the checkpoint's temperature if that is below it, so the converted
model computes the same logits.
--scan_layers writes a config whose towers scan their blocks (config.model.*.scan_layers) and
the parameters in that stacked layout (basic.models.scan.to_layout of the table's layout).
"""
import dataclasses
import json
import os
from typing import Callable, Optional

try:
  # The triton of CUDA builds of torch (open_clip imports it through torch._dynamo) segfaults
  # when it loads after TensorFlow; loaded first, both work. In a notebook that already imported
  # TensorFlow (e.g. through basic.inference), run the conversion in a fresh process.
  import triton  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  pass

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import numpy as np

from basic import checkpoint as checkpoint_lib
from basic import models
from basic import tokenizer as tokenizer_lib
from basic.models import convnext
from basic.models import scan as scan_lib

# OpenCLIP's defaults for fields its model configs may leave out (open_clip/model.py
# CLIPVisionCfg, CLIPTextCfg).
VISION_HEAD_WIDTH = 64
TEXT_HEADS = 8
NORM_EPS = 1e-5
# Model-config fields that must keep these values (anything else is a tower basic lacks).
_VISION_FIXED = {
    'ls_init_value': None, 'attentional_pool': False, 'pool_type': 'tok', 'act_kwargs': None,
    'block_type': None, 'qk_norm': False, 'scaled_cosine_attn': False, 'scale_heads': False,
    'scale_attn_inner': False, 'scale_attn': False, 'scale_fc': False, 'timm_model_name': None,
}
_TEXT_FIXED = {
    'hf_tokenizer_name': None, 'tokenizer_mode': None, 'tokenizer_kwargs': None,
    'ls_init_value': None, 'embed_cls': False, 'pool_type': 'argmax', 'proj_bias': False,
    'proj_type': 'linear', 'act_kwargs': None, 'block_type': None, 'qk_norm': False,
    'scaled_cosine_attn': False, 'scale_heads': False, 'scale_attn_inner': False,
    'scale_attn': False, 'scale_fc': False, 'hf_model_name': None,
}
# Fields that do not change the function a converted model computes at inference.
# A timm tower (vision_cfg.timm_model_name): a linear projection without bias after the trunk.
_TIMM_FIXED = {'timm_proj': 'linear', 'timm_proj_bias': False}
_VISION_FREE = ('image_size', 'layers', 'width', 'head_width', 'mlp_ratio', 'patch_size',
                'no_ln_pre', 'pos_embed_type', 'final_ln_after_pool', 'patch_dropout',
                'output_tokens', 'norm_kwargs', 'attn_pooler_queries', 'attn_pooler_heads',
                'timm_model_pretrained', 'timm_pool', 'timm_proj', 'timm_proj_bias', 'timm_drop',
                'timm_drop_path')
_TEXT_FREE = ('context_length', 'vocab_size', 'width', 'heads', 'layers', 'mlp_ratio', 'pad_id',
              'eos_id', 'no_causal_mask', 'final_ln_after_pool', 'output_tokens', 'norm_kwargs',
              'hf_model_pretrained', 'hf_proj_type', 'hf_pooler_type')
_TOP_FREE = ('embed_dim', 'quick_gelu', 'vision_cfg', 'text_cfg', 'custom_text', 'cast_dtype',
             'init_logit_scale')
# Non-parameter entries of OpenAI's TorchScript state dicts (open_clip drops them too).
_OPENAI_EXTRAS = ('input_resolution', 'context_length', 'vocab_size')


# --- Reading. -------------------------------------------------------------------------------------


def load_state_dict(path: str) -> tuple[dict[str, np.ndarray], bool]:
  """A checkpoint file -> ({name: float32 array}, is OpenAI's TorchScript archive).

  `.safetensors`, or torch files: a state dict, {'state_dict': ...} (OpenCLIP's training
  checkpoints; DDP's 'module.' prefix removed) or a TorchScript archive (OpenAI's releases).
  """
  import torch  # pylint: disable=g-import-not-at-top
  jit = False
  if str(path).endswith('.safetensors'):
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
    state = load_file(path, device='cpu')
  else:
    try:
      state = torch.load(path, map_location='cpu', weights_only=True)
    except RuntimeError as e:
      if 'torchscript' not in str(e).lower() and 'jit' not in str(e).lower():
        raise
      state, jit = torch.jit.load(path, map_location='cpu').state_dict(), True
    if isinstance(state, torch.jit.ScriptModule):   # torch.load may dispatch to torch.jit.load.
      state, jit = state.state_dict(), True
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
      state = state['state_dict']
  if not isinstance(state, dict) or not state:
    raise ValueError(f'{path}: holds no state dict (got {type(state).__name__}).')
  if all(k.startswith('module.') for k in state):
    state = {k[len('module.'):]: v for k, v in state.items()}
  out = {}
  for key, value in state.items():
    if key in _OPENAI_EXTRAS or key.endswith('attn_mask'):
      continue
    if not isinstance(value, torch.Tensor):
      raise ValueError(f'{path}: entry {key!r} is a {type(value).__name__}, not a tensor.')
    out[key] = value.detach().to(torch.float32).cpu().numpy()
  return out, jit


def model_config(model: str) -> dict:
  """--model -> OpenCLIP's model config dict (`embed_dim`, `vision_cfg`, `text_cfg`, ...)."""
  if model.endswith('.json') or os.path.isfile(model):
    with open(model, encoding='utf-8') as f:
      cfg = json.load(f)
    return cfg.get('model_cfg', cfg)
  try:
    import open_clip  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'--model={model!r}: reading an OpenCLIP model config by name needs '
                      "open_clip_torch (pip install '.[convert]'); or pass a JSON file.") from e
  cfg = open_clip.get_model_config(model)
  if cfg is None:
    raise ValueError(f'--model={model!r}: not an OpenCLIP model name (open_clip.list_models()) '
                     'nor a JSON model config file.')
  return cfg


def default_tokenizer_path() -> str:
  """The `bpe_simple_vocab_16e6.txt.gz` shipped with open_clip_torch."""
  try:
    from open_clip import tokenizer as open_clip_tokenizer  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('--tokenizer: give the path of bpe_simple_vocab_16e6.txt.gz, or install '
                      "open_clip_torch (pip install '.[convert]'), which ships it.") from e
  return open_clip_tokenizer.default_bpe()


# --- Architecture. --------------------------------------------------------------------------------


class _Reader:
  """Takes entries of a state dict by name, checking shapes; remembers which were used."""

  def __init__(self, state: dict[str, np.ndarray], source: str):
    self.state, self.source, self.used = state, source, set()

  def shape(self, key: str) -> tuple:
    if key not in self.state:
      raise ValueError(f'{self.source}: key {key!r} is missing from the state dict; not an '
                       'OpenCLIP / OpenAI CLIP of the architecture --model describes.')
    return self.state[key].shape

  def take(self, key: str, shape: tuple) -> np.ndarray:
    if self.shape(key) != tuple(shape):
      raise ValueError(f'{self.source}: key {key!r} has shape {self.shape(key)}, expected '
                       f'{tuple(shape)} for this architecture.')
    self.used.add(key)
    return self.state[key]

  def count(self, prefix: str) -> int:
    """The number of consecutive blocks `{prefix}{i}.` in the state dict."""
    n = 0
    while any(k.startswith(f'{prefix}{n}.') for k in self.state):
      n += 1
    return n


def _check_config(cfg: dict, free, fixed, where: str):
  for key, value in cfg.items():
    if key in fixed:
      if value != fixed[key] and not (fixed[key] is None and not value):
        raise ValueError(f'OpenCLIP model config {where}{key}={value!r} is not supported: '
                         f'basic converts {where}{key}={fixed[key]!r} only.')
    elif key not in free:
      raise ValueError(f'OpenCLIP model config {where}{key}={value!r} is not supported.')


def _norm_eps(cfg: dict, where: str) -> float:
  kwargs = dict(cfg.get('norm_kwargs') or {})
  eps = kwargs.pop('eps', NORM_EPS)
  if kwargs:
    raise ValueError(f'OpenCLIP model config {where}norm_kwargs={cfg["norm_kwargs"]!r}: only '
                     'eps is supported.')
  return eps


def architecture(reader: _Reader, cfg: dict, *, quick_gelu: Optional[bool] = None,
                 norm_eps: Optional[float] = None) -> dict:
  """The sizes of the towers from the state dict's shapes, the rest from the model config.

  Returns the keyword arguments of configs/open_clip.py `clip_vit` or `clip_convnext` (without
  the temperature), plus 'image_tower': 'vit' or 'convnext' (a timm ConvNeXt at `visual.trunk`).
  `norm_eps` overrides the ConvNeXt trunk's LayerNorm eps (for a timm model basic cannot look
  up). Raises ValueError naming the key or config field that does not fit, or a config field
  whose value the state dict contradicts (a wrong --model).
  """
  _check_config(cfg, _TOP_FREE, {}, '')
  vision, text = dict(cfg.get('vision_cfg') or {}), dict(cfg.get('text_cfg') or {})
  timm_tower = bool(vision.get('timm_model_name'))
  if timm_tower:   # OpenCLIP reads only the timm_* fields (and image_size) of a timm tower.
    _check_config(vision, _VISION_FREE + tuple(_VISION_FIXED), _TIMM_FIXED, 'vision_cfg.')
  else:
    _check_config(vision, _VISION_FREE, _VISION_FIXED, 'vision_cfg.')
  _check_config(text, _TEXT_FREE, _TEXT_FIXED, 'text_cfg.')
  if any(k.startswith('visual.trunk.') for k in reader.state) and not timm_tower:
    raise ValueError(f"{reader.source}: keys 'visual.trunk.*' hold a timm image tower, but the "
                     'model config has no vision_cfg.timm_model_name: wrong --model?')
  if (not timm_tower and 'visual.proj' not in reader.state
      and any(k.startswith('visual.') for k in reader.state)):
    raise ValueError(f'{reader.source}: key \'visual.proj\' is missing: not a ViT image tower '
                     '(ModifiedResNet and attentional pooling are not supported).')
  if 'logit_bias' in reader.state:
    raise ValueError(f'{reader.source}: key \'logit_bias\' (a SigLIP-style model) is not '
                     'supported.')
  if timm_tower:
    image = _convnext_architecture(reader, vision, norm_eps)
    embed_key, embed_dim = 'visual.head.proj.weight', reader.shape('visual.head.proj.weight')[0]
  else:
    if norm_eps is not None:
      raise ValueError('--norm_eps sets the LayerNorm eps of a timm ConvNeXt image tower; a '
                       "ViT's comes from the model config (vision_cfg.norm_kwargs).")
    image = _vit_architecture(reader, vision)
    embed_key, embed_dim = 'visual.proj', reader.shape('visual.proj')[1]
  arch = dict(image, **_text_architecture(reader, text), embed_dim=embed_dim)
  activation = 'quick_gelu' if (cfg.get('quick_gelu', False) if quick_gelu is None
                                else quick_gelu) else 'gelu'
  if timm_tower:   # OpenCLIP's quick_gelu acts on its text tower only (timm's trunk: GELU).
    arch.update(text_activation=activation, text_norm_eps=_norm_eps(text, 'text_cfg.'))
  else:
    arch.update(activation=activation)
    if _norm_eps(text, 'text_cfg.') != arch['norm_eps']:
      raise ValueError('OpenCLIP model config: vision_cfg and text_cfg norm_kwargs eps differ; '
                       'basic converts one LayerNorm eps for both towers of a ViT CLIP.')
  if cfg.get('embed_dim') is not None and cfg['embed_dim'] != embed_dim:
    raise ValueError(f'{reader.source}: key {embed_key!r} gives embed_dim={embed_dim}, but the '
                     f'model config says embed_dim={cfg["embed_dim"]}: wrong --model?')
  return arch


def _check_stated(reader: _Reader, stated: dict):
  """stated: {model-config field: (the value it states, the state-dict key that tells, found)}."""
  for field, (value, key, found) in stated.items():
    if value is not None and value != found:
      raise ValueError(f'{reader.source}: key {key!r} gives {field.split(".")[-1]}={found}, but '
                       f'the model config says {field}={value}: wrong --model?')


def _vit_architecture(reader: _Reader, vision: dict) -> dict:
  """OpenCLIP's VisionTransformer: `clip_vit`'s image fields, with image_tower 'vit'."""
  width, channels, patch, patch_w = reader.shape('visual.conv1.weight')
  if channels != 3 or patch != patch_w:
    raise ValueError(f"{reader.source}: key 'visual.conv1.weight' has shape "
                     f'{reader.shape("visual.conv1.weight")}: not square RGB patches.')
  positions = reader.shape('visual.positional_embedding')[0] - 1
  grid = int(round(np.sqrt(positions)))
  if grid * grid != positions:
    raise ValueError(f"{reader.source}: key 'visual.positional_embedding' has "
                     f'{positions} + 1 rows: not a square patch grid plus a class token.')
  arch = dict(
      image_tower='vit', image_size=grid * patch, patch_size=patch, width=width,
      depth=reader.count('visual.transformer.resblocks.'),
      num_heads=width // vision.get('head_width', VISION_HEAD_WIDTH),
      mlp_dim=reader.shape('visual.transformer.resblocks.0.mlp.c_fc.weight')[0],
      norm_eps=_norm_eps(vision, 'vision_cfg.'),
      ln_pre='visual.ln_pre.weight' in reader.state)
  _check_stated(reader, {
      'vision_cfg.width': (vision.get('width'), 'visual.conv1.weight', width),
      'vision_cfg.patch_size': (vision.get('patch_size'), 'visual.conv1.weight', patch),
      'vision_cfg.image_size': (vision.get('image_size'), 'visual.positional_embedding',
                                arch['image_size']),
      'vision_cfg.layers': (vision.get('layers'), 'visual.transformer.resblocks.*',
                            arch['depth']),
  })
  if arch['num_heads'] < 1 or width % arch['num_heads']:
    raise ValueError(f'OpenCLIP model config vision_cfg: {arch["num_heads"]} heads do not divide '
                     f'width {width}.')
  return arch


def _convnext_architecture(reader: _Reader, vision: dict, norm_eps: Optional[float]) -> dict:
  """OpenCLIP's TimmModel around a timm ConvNeXt: `clip_convnext`'s image fields.

  Stages, depths and widths from the shapes; the trunk's patch, kernel and MLP sizes must be
  basic.models.convnext's (4, 7, 4x), which the shape checks of `convert_params` enforce. The
  image size and stochastic depth come from the model config, the LayerNorm eps from `norm_eps`
  or the timm model's name (`_timm_norm_eps`).
  """
  name = vision['timm_model_name']
  pool = vision.get('timm_pool', 'avg')
  if pool not in ('', 'avg'):
    raise ValueError(f'OpenCLIP model config vision_cfg.timm_pool={pool!r} is not supported: '
                     "basic's ConvNeXt pools by averaging ('' keeps timm's default, 'avg').")
  stem = reader.shape('visual.trunk.stem.0.weight')
  patch = convnext.ConvNeXt.patch_size
  if stem[1:] != (3, patch, patch):
    raise ValueError(f"{reader.source}: key 'visual.trunk.stem.0.weight' has shape {stem}: "
                     f"basic's ConvNeXt has timm's patch stem, a {patch}x{patch} RGB conv.")
  stages = reader.count('visual.trunk.stages.')
  depths = tuple(reader.count(f'visual.trunk.stages.{s}.blocks.') for s in range(stages))
  dims = tuple(reader.shape(f'visual.trunk.stages.{s}.blocks.0.conv_dw.weight')[0]
               for s in range(max(stages, 1)))
  if norm_eps is None:
    norm_eps = _timm_norm_eps(reader, name, depths, dims)
  size = vision.get('image_size', 224)   # OpenCLIP CLIPVisionCfg's default.
  if isinstance(size, (tuple, list)):
    if len(set(size)) != 1:
      raise ValueError(f'OpenCLIP model config vision_cfg.image_size={size!r}: basic converts '
                       'square images only.')
    size = size[0]
  reduction = patch * 2 ** (len(depths) - 1)
  if size % reduction:
    raise ValueError(f'OpenCLIP model config vision_cfg.image_size={size!r}: basic needs a '
                     f'multiple of {reduction} (the ConvNeXt stem and downsampling stages).')
  return dict(image_tower='convnext', image_size=size, depths=depths, dims=dims,
              norm_eps=norm_eps, drop_path=vision.get('timm_drop_path') or 0.0)


def _timm_norm_eps(reader: _Reader, name: str, depths: tuple, dims: tuple) -> float:
  """The LayerNorm eps of timm's ConvNeXt `name`: basic.models.convnext.VARIANTS (timm's
  convnext_* model functions), else timm's own model (built on the 'meta' device: no memory),
  whose trunk shapes and code path must then be those the state dict and basic assume."""
  where = f'vision_cfg.timm_model_name={name!r}'
  if name in convnext.VARIANTS:
    want_depths, want_dims, eps = convnext.VARIANTS[name]
    if (depths, dims) != (want_depths, want_dims):
      raise ValueError(f"{reader.source}: keys 'visual.trunk.stages.*' give depths={depths}, "
                       f'dims={dims}, but the model config says {where} (depths={want_depths}, '
                       f'dims={want_dims}): wrong --model?')
    return eps
  try:
    import timm  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'OpenCLIP model config {where}: not one of basic.models.convnext.VARIANTS;'
                      " reading its LayerNorm eps needs timm (pip install '.[convert]'), or give "
                      'it with --norm_eps.') from e
  if not timm.is_model(name):
    raise ValueError(f'OpenCLIP model config {where}: neither one of '
                     f'basic.models.convnext.VARIANTS nor a model registered in timm; give its '
                     'LayerNorm eps with --norm_eps.')
  with torch.device('meta'):
    trunk = timm.create_model(name, pretrained=False)
  if not isinstance(trunk, timm.models.convnext.ConvNeXt):
    raise ValueError(f'OpenCLIP model config {where}: a timm {type(trunk).__name__}, not a '
                     'ConvNeXt.')
  for key, value in trunk.state_dict().items():
    if not key.startswith('head.fc.') and reader.shape(f'visual.trunk.{key}') != value.shape:
      raise ValueError(f"{reader.source}: key 'visual.trunk.{key}' has shape "
                       f'{reader.shape(f"visual.trunk.{key}")}, but timm\'s {name} has '
                       f'{tuple(value.shape)}: wrong --model?')
  norms = {(type(m).__name__, m.eps) for m in trunk.modules()
           if isinstance(m, torch.nn.LayerNorm)}
  acts = {(type(block.mlp.act).__name__, getattr(block.mlp.act, 'approximate', 'none'))
          for stage in trunk.stages for block in stage.blocks}
  eps = {e for _, e in norms}
  pool = trunk.head.global_pool.pool_type
  if ({n for n, _ in norms} - {'LayerNorm', 'LayerNorm2d'} or len(eps) != 1
      or acts != {('GELU', 'none')} or pool != 'avg'):
    raise ValueError(f'OpenCLIP model config {where}: not the ConvNeXt basic computes (norms '
                     f'{sorted(norms)}, activations {sorted(acts)}, pool {pool!r}).')
  return eps.pop()


def _text_architecture(reader: _Reader, text: dict) -> dict:
  """OpenCLIP's text Transformer: the text_* fields of `clip_vit` / `clip_convnext`."""
  text_width = reader.shape('ln_final.weight')[0]
  vocab_size = reader.shape('token_embedding.weight')[0]
  arch = dict(
      text_width=text_width, text_depth=reader.count('transformer.resblocks.'),
      text_num_heads=text.get('heads', TEXT_HEADS),
      text_mlp_dim=reader.shape('transformer.resblocks.0.mlp.c_fc.weight')[0],
      text_length=reader.shape('positional_embedding')[0], vocab_size=vocab_size,
      causal=not text.get('no_causal_mask', False))
  _check_stated(reader, {
      'text_cfg.width': (text.get('width'), 'ln_final.weight', text_width),
      'text_cfg.layers': (text.get('layers'), 'transformer.resblocks.*', arch['text_depth']),
      'text_cfg.context_length': (text.get('context_length'), 'positional_embedding',
                                  arch['text_length']),
      'text_cfg.vocab_size': (text.get('vocab_size'), 'token_embedding.weight', vocab_size),
  })
  heads = arch['text_num_heads']
  if heads < 1 or text_width % heads:
    raise ValueError(f'OpenCLIP model config text_cfg: {heads} heads do not divide width '
                     f'{text_width}.')
  if vocab_size < 49408:
    raise ValueError(f"{reader.source}: key 'token_embedding.weight' has {vocab_size} rows; "
                     "CLIP's BPE needs 49408.")
  return arch


# --- Parameters: one table, both ways. ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of the mapping between OpenCLIP's state dict and basic's DualEncoder params.

  keys, shapes: OpenCLIP state-dict keys and their torch shapes; paths: basic param paths (tuples
  of names under 'params'). to_basic(*tensors of keys) -> arrays of paths; to_open_clip(*arrays
  of paths) -> tensors of keys, its inverse. Every inverse is exact (transposes, reshapes, splits,
  concatenations, negation) but the ViT's class token (see `_class_token`).
  """
  keys: tuple
  shapes: tuple
  paths: tuple
  to_basic: Callable
  to_open_clip: Callable


def _one(key, shape, path, forward=lambda x: x, inverse=lambda x: x) -> Entry:
  """A one-to-one row: path = forward(key), key = inverse(path)."""
  return Entry((key,), (tuple(shape),), (tuple(path.split('/')),),
               lambda x: (forward(x),), lambda x: (inverse(x),))


def _transpose(key, shape, path) -> Entry:
  """torch Linear weight [out, in] <-> flax kernel [in, out]: W.T both ways."""
  return _one(key, shape, path, lambda x: x.T, lambda x: x.T)


def _layer_norm(prefix: str, width: int, path: str) -> list:
  return [_one(f'{prefix}.weight', (width,), f'{path}/scale'),
          _one(f'{prefix}.bias', (width,), f'{path}/bias')]


def _dense(prefix: str, d_in: int, d_out: int, path: str) -> list:
  return [_transpose(f'{prefix}.weight', (d_out, d_in), f'{path}/kernel'),
          _one(f'{prefix}.bias', (d_out,), f'{path}/bias')]


def _conv(prefix: str, shape: tuple, path: str) -> list:
  """torch Conv2d [O, I / groups, kh, kw] + bias <-> flax nn.Conv [kh, kw, I / groups, O]:
  axes (2, 3, 1, 0) one way, (3, 2, 0, 1) back."""
  return [_one(f'{prefix}.weight', shape, f'{path}/kernel', lambda x: x.transpose(2, 3, 1, 0),
               lambda x: x.transpose(3, 2, 0, 1)),
          _one(f'{prefix}.bias', (shape[0],), f'{path}/bias')]


def _pointwise(prefix: str, d_in: int, d_out: int, path: str, conv_mlp: bool) -> list:
  """A Linear, or the 1x1 conv of timm's conv_mlp ConvNeXts ([O, I, 1, 1]) <-> nn.Dense."""
  if not conv_mlp:
    return _dense(prefix, d_in, d_out, path)
  return [_one(f'{prefix}.weight', (d_out, d_in, 1, 1), f'{path}/kernel',
               lambda x: x[:, :, 0, 0].T, lambda x: x.T[:, :, None, None]),
          _one(f'{prefix}.bias', (d_out,), f'{path}/bias')]


def _attention(p: str, width: int, heads: int, path: str) -> list:
  """in_proj_weight [3W, W] = (q; k; v) rows <-> {query,key,value}/kernel [W, H, W/H] each
  (rows j*W..(j+1)*W, transposed, heads split); in_proj_bias [3W] <-> bias [H, W/H];
  out_proj.weight [W, W] <-> out/kernel [H, W/H, W] (transposed, heads split)."""
  hd, names = width // heads, ('query', 'key', 'value')
  return [
      Entry((f'{p}.in_proj_weight',), ((3 * width, width),),
            tuple((*path.split('/'), n, 'kernel') for n in names),
            lambda w: tuple(w[j * width:(j + 1) * width].T.reshape(width, heads, hd)
                            for j in range(3)),
            lambda *ks: (np.concatenate([k.reshape(width, width).T for k in ks]),)),
      Entry((f'{p}.in_proj_bias',), ((3 * width,),),
            tuple((*path.split('/'), n, 'bias') for n in names),
            lambda b: tuple(b[j * width:(j + 1) * width].reshape(heads, hd) for j in range(3)),
            lambda *bs: (np.concatenate([b.reshape(width) for b in bs]),)),
      _one(f'{p}.out_proj.weight', (width, width), f'{path}/out/kernel',
           lambda x: x.T.reshape(heads, hd, width), lambda x: x.reshape(width, width).T),
      _one(f'{p}.out_proj.bias', (width,), f'{path}/out/bias'),
  ]


def _encoder(prefix: str, depth: int, width: int, heads: int, mlp_dim: int, final_norm: str,
             path: str) -> list:
  """OpenCLIP's `Transformer` at `prefix` ('visual.transformer') <-> basic's `Encoder`."""
  rows = []
  for i in range(depth):
    p, b = f'{prefix}.resblocks.{i}', f'{path}/block{i:02d}'
    rows += (_layer_norm(f'{p}.ln_1', width, f'{b}/ln_attn')
             + _attention(f'{p}.attn', width, heads, f'{b}/attn')
             + _layer_norm(f'{p}.ln_2', width, f'{b}/ln_mlp')
             + _dense(f'{p}.mlp.c_fc', width, mlp_dim, f'{b}/mlp/fc1')
             + _dense(f'{p}.mlp.c_proj', mlp_dim, width, f'{b}/mlp/fc2'))
  return rows + _layer_norm(final_norm, width, f'{path}/ln_final')


def _class_token(w: int, positions: int) -> Entry:
  """class_embedding [W], positional_embedding [T + 1, W] <-> image/cls [1, 1, W] =
  class_embedding + positional_embedding[0], image/pos_embedding [1, T, W] = rows 1..T.
  basic folds the class token's position into `cls`, so the way back is class_embedding = cls,
  positional_embedding[0] = 0: the same function (OpenCLIP adds the two), and the same tensors
  whenever the original positional_embedding[0] was zero; otherwise class_embedding comes back
  as the float32 sum class_embedding + positional_embedding[0] (exactly what both compute)."""
  def back(cls, pos):
    return cls[0, 0], np.concatenate([np.zeros((1, w), pos.dtype), pos[0]])
  return Entry(('visual.class_embedding', 'visual.positional_embedding'),
               ((w,), (positions + 1, w)), (('image', 'cls'), ('image', 'pos_embedding')),
               lambda c, pos: ((c + pos[0])[None, None], pos[None, 1:]), back)


def _vit_table(arch: dict) -> list:
  """OpenCLIP's VisionTransformer at `visual` <-> basic.models.vit.ViT at `image`."""
  w, p = arch['width'], arch['patch_size']
  grid = arch['image_size'] // p
  rows = [_one('visual.conv1.weight', (w, 3, p, p), 'image/embedding/kernel',
               lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)),
          _class_token(w, grid * grid)]
  if arch['ln_pre']:
    rows += _layer_norm('visual.ln_pre', w, 'image/ln_pre')
  rows += _encoder('visual.transformer', arch['depth'], w, arch['num_heads'], arch['mlp_dim'],
                   'visual.ln_post', 'image/encoder')
  return rows + [_one('visual.proj', (w, arch['embed_dim']), 'image_proj/kernel')]


def _convnext_table(arch: dict, conv_mlp: bool) -> list:
  """timm's ConvNeXt at `visual.trunk` (+ OpenCLIP's head.proj) <-> basic.models.convnext."""
  t, dims = 'visual.trunk', arch['dims']
  patch, k = convnext.ConvNeXt.patch_size, convnext.ConvNeXt.kernel_size
  mlp = convnext.ConvNeXt.mlp_ratio
  rows = (_conv(f'{t}.stem.0', (dims[0], 3, patch, patch), 'image/stem_conv')
          + _layer_norm(f'{t}.stem.1', dims[0], 'image/stem_norm'))
  for s, (depth, dim) in enumerate(zip(arch['depths'], dims)):
    p = f'{t}.stages.{s}'
    if s > 0:
      rows += (_layer_norm(f'{p}.downsample.0', dims[s - 1], f'image/stage{s}_downsample_norm')
               + _conv(f'{p}.downsample.1', (dim, dims[s - 1], 2, 2),
                       f'image/stage{s}_downsample_conv'))
    for i in range(depth):
      b, q = f'{p}.blocks.{i}', f'image/stage{s}_block{i:02d}'
      rows += (_conv(f'{b}.conv_dw', (dim, 1, k, k), f'{q}/conv_dw')
               + _layer_norm(f'{b}.norm', dim, f'{q}/norm')
               + _pointwise(f'{b}.mlp.fc1', dim, mlp * dim, f'{q}/mlp_fc1', conv_mlp)
               + _pointwise(f'{b}.mlp.fc2', mlp * dim, dim, f'{q}/mlp_fc2', conv_mlp)
               + [_one(f'{b}.gamma', (dim,), f'{q}/gamma')])
  rows += _layer_norm(f'{t}.head.norm', dims[-1], 'image/head_norm')
  return rows + [_transpose('visual.head.proj.weight', (arch['embed_dim'], dims[-1]),
                            'image_proj/kernel')]


def param_table(arch: dict, *, conv_mlp: bool = False, logit_scale_shape: tuple = (),
                logit_bias: bool = False) -> list:
  """The whole mapping, OpenCLIP state dict <-> basic DualEncoder params, as a list of `Entry`.

  arch: `architecture`'s dict (image_tower 'vit' or 'convnext' and the sizes). conv_mlp: timm's
  1x1-conv MLP blocks. logit_scale_shape: () (OpenCLIP) or (1,); logit_scale = log(1 / T) =
  -log_temperature, both ways. logit_bias: SigLIP's `logit_bias` <-> `bias` (loss 'sigmoid').
  """
  e, tw, length = arch['embed_dim'], arch['text_width'], arch['text_length']
  rows = (_convnext_table(arch, conv_mlp) if arch['image_tower'] == 'convnext'
          else _vit_table(arch))
  rows += [
      _one('token_embedding.weight', (arch['vocab_size'], tw), 'text/token_embedding/embedding'),
      _one('positional_embedding', (length, tw), 'text/pos_embedding',
           lambda x: x[None], lambda x: x[0]),
  ]
  rows += _encoder('transformer', arch['text_depth'], tw, arch['text_num_heads'],
                   arch['text_mlp_dim'], 'ln_final', 'text/encoder')
  shape = tuple(logit_scale_shape)
  rows += [_one('text_projection', (tw, e), 'text_proj/kernel'),
           _one('logit_scale', shape, 'log_temperature', lambda x: -x.reshape(()),
                lambda x: -np.reshape(x, shape))]
  if logit_bias:
    rows.append(_one('logit_bias', shape, 'bias', lambda x: x.reshape(()),
                     lambda x: np.reshape(x, shape)))
  return rows


def set_path(tree: dict, path: tuple, value):
  """tree[path[0]][path[1]]... = value, creating dicts on the way."""
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def get_path(tree, path: tuple):
  for name in path:
    tree = tree[name]
  return tree


def _apply(r: _Reader, rows: list) -> dict:
  """The params tree of `rows` (`Entry.to_basic`), taking their keys from `r` (shapes checked)."""
  params = {}
  for entry in rows:
    values = entry.to_basic(*(r.take(k, s) for k, s in zip(entry.keys, entry.shapes)))
    for path, value in zip(entry.paths, values):
      set_path(params, path, value)
  return params


def _convnext(r: _Reader, arch: dict) -> dict:
  """timm's ConvNeXt trunk at `visual.trunk` -> basic.models.convnext.ConvNeXt params (the
  `image` subtree of `param_table`)."""
  conv_mlp = len(r.shape('visual.trunk.stages.0.blocks.0.mlp.fc1.weight')) == 4
  rows = [e for e in _convnext_table(arch, conv_mlp) if e.paths[0][0] == 'image']
  return _apply(r, rows)['image']


def convert_params(r: _Reader, arch: dict) -> dict:
  """The state dict -> basic's DualEncoder params (float32 numpy arrays), per `param_table`
  (the module docstring's table). Every entry of the state dict must be used."""
  if arch['image_tower'] == 'convnext':
    conv_mlp = len(r.shape('visual.trunk.stages.0.blocks.0.mlp.fc1.weight')) == 4
  else:
    conv_mlp = False
  scale_shape = r.shape('logit_scale')
  if int(np.prod(scale_shape)) != 1:
    raise ValueError(f"{r.source}: key 'logit_scale' has shape {scale_shape}, expected a "
                     'scalar.')
  params = _apply(r, param_table(arch, conv_mlp=conv_mlp, logit_scale_shape=scale_shape))
  unused = sorted(set(r.state) - r.used)
  if unused:
    raise ValueError(f'{r.source}: key {unused[0]!r} (and {len(unused) - 1} more) has no place '
                     f'in the converted {arch["image_tower"]} CLIP; unsupported model. Unused: '
                     f'{unused[:8]}')
  return jax.tree.map(lambda x: np.array(x, np.float32, order='C'), params)


def _check_against_model(params: dict, config):
  """The converted tree must be exactly the DualEncoder's (names and shapes)."""
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
  tokens = jax.ShapeDtypeStruct((1, config.data.text_length), np.int32)
  want = jax.eval_shape(models.build(config).init, jax.random.key(0), images, tokens)['params']
  flat = lambda t: {jax.tree_util.keystr(k): tuple(v.shape)
                    for k, v in jax.tree_util.tree_leaves_with_path(t)}
  got, want = flat(params), flat(want)
  if got != want:
    diff = sorted(set(got.items()) ^ set(want.items()))
    raise AssertionError(f'Converted parameters do not match the model: {diff[:8]}')


# --- Conversion. ----------------------------------------------------------------------------------

# The experiment config file whose `clip_vit(**sizes)` / `clip_convnext(**sizes)` and
# `CLIP_LOGIT_SCALE_MAX` build a converted model's config (--config_file). A path, not an import:
# the `basic` package never imports the repository's configs/; relative paths resolve from the
# current directory, as `python -m basic.train --config=FILE` resolves its config.
DEFAULT_CONFIG_FILE = 'configs/open_clip.py'


def load_config_file(path: str):
  """The Python config file at `path` as a module (its own imports, e.g. `from configs import
  common`, resolve from sys.path: the repository root when run from there)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config_file={path!r}: no such file (the config file that builds '
                            f'a converted model\'s config, default {DEFAULT_CONFIG_FILE!r} from '
                            'the repository root).')
  spec = importlib.util.spec_from_file_location(
      '_open_clip_config_' + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module



def convert(model: str, checkpoint: str, output: str, *, tokenizer: Optional[str] = None,
            quick_gelu: Optional[bool] = None, norm_eps: Optional[float] = None,
            scan_layers: bool = False, config_file: str = DEFAULT_CONFIG_FILE) -> str:
  """Converts `checkpoint` (an OpenCLIP ViT or timm ConvNeXt CLIP, see the module docstring)
  into a basic checkpoint at `output` (local or gs://; step 0). Returns `output`.

  Args:
    model: OpenCLIP model name or JSON model-config path (--model).
    checkpoint: the weights file (--checkpoint).
    output: the directory to write (must not hold a checkpoint yet).
    tokenizer: CLIP's BPE merges file (default: the one open_clip_torch ships).
    quick_gelu: override the model config's activation (OpenAI's TorchScript files: True).
    norm_eps: the LayerNorm eps of a timm ConvNeXt image tower (default: timm's for the model
      named by vision_cfg.timm_model_name).
    scan_layers: write a config with scanned towers and the parameters stacked per layer.
    config_file: the config file whose clip_vit / clip_convnext build the output's config
      (--config_file, `load_config_file`).
  """
  open_clip_configs = load_config_file(config_file)
  state, jit = load_state_dict(checkpoint)
  if jit and quick_gelu is None:
    quick_gelu = True   # OpenAI's released weights were trained with QuickGELU.
  if all(k.startswith(('visual.', 'text.', 'logit_')) for k in state):   # CustomTextCLIP.
    state = {k[len('text.'):] if k.startswith('text.') else k: v for k, v in state.items()}
  reader = _Reader(state, checkpoint)
  arch = architecture(reader, model_config(model), quick_gelu=quick_gelu, norm_eps=norm_eps)
  params = convert_params(reader, arch)
  temperature = float(np.exp(params['log_temperature']))
  tokenizer = tokenizer or default_tokenizer_path()
  build = {'vit': open_clip_configs.clip_vit, 'convnext': open_clip_configs.clip_convnext}
  config = build[arch['image_tower']](
      **{k: v for k, v in arch.items() if k != 'image_tower'},
      temperature_min=min(1 / open_clip_configs.CLIP_LOGIT_SCALE_MAX, temperature),
      scan_layers=scan_layers)
  tok = tokenizer_lib.make_tokenizer(config.tokenizer, tokenizer, config.data.text_length)
  if tok.vocab_size > arch['vocab_size']:
    raise ValueError(f'--tokenizer={tokenizer}: {tok.vocab_size} ids, more than the '
                     f'{arch["vocab_size"]} rows of token_embedding.weight.')
  if scan_layers:
    params = scan_lib.for_config(params, config)
  _check_against_model(params, config)
  ckpt = checkpoint_lib.Checkpointer(output, async_save=False)
  if ckpt.latest_step() is not None:
    raise FileExistsError(f'--output={output}: already holds a checkpoint (step '
                          f'{ckpt.latest_step()}); give a new directory.')
  ckpt.save(0, {'params': params}, config, tokenizer_model=tok.serialized_model,
            tokenizer_kind=tok.kind,
            data={'converted_from': str(checkpoint), 'open_clip_model': model})
  ckpt.wait()
  ckpt.close()
  logging.info('Converted %s (%s: %s image tower, %d text blocks) to %s.', checkpoint, model,
               arch['image_tower'], arch['text_depth'], output)
  return output


def _define_flags():
  """Flags of the command line only (importing this module defines none)."""
  flags.DEFINE_string('model', None, 'OpenCLIP model name (ViT-B-32, ViT-B-32-quickgelu, ...) '
                      'or a JSON model-config file.')
  flags.DEFINE_string('checkpoint', None, 'Weights: .safetensors, or torch .pt / .bin / .pth.')
  flags.DEFINE_string('output', None, 'Directory of the basic checkpoint to write.')
  flags.DEFINE_string('tokenizer', None, "CLIP's BPE merges file (default: the one "
                      'open_clip_torch ships).')
  flags.DEFINE_bool('quick_gelu', None, 'Override the model config: QuickGELU (OpenAI weights, '
                    '-quickgelu models) or GELU (--noquick_gelu).')
  flags.DEFINE_float('norm_eps', None, 'LayerNorm eps of a timm ConvNeXt image tower (default: '
                     "timm's for vision_cfg.timm_model_name; needed for a custom timm model).")
  flags.DEFINE_bool('scan_layers', False, 'Write the towers scanned (config.model.*.scan_layers) '
                    'with their blocks\' parameters stacked per layer.')
  flags.DEFINE_string('config_file', DEFAULT_CONFIG_FILE, 'The config file whose clip_vit / '
                      "clip_convnext build the output's config (from the repository root).")
  flags.mark_flags_as_required(['model', 'checkpoint', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  options = flags.FLAGS
  if not epath.Path(options.checkpoint).exists():
    raise app.UsageError(f'--checkpoint={options.checkpoint}: no such file.')
  output = convert(options.model, options.checkpoint, options.output,
                   tokenizer=options.tokenizer, quick_gelu=options.quick_gelu,
                   norm_eps=options.norm_eps, scan_layers=options.scan_layers,
                   config_file=options.config_file)
  print(f'Wrote {output}: basic.inference.load({output!r}); continue training with '
        f'--config=configs/from_checkpoint.py:path={output}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
