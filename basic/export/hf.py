r"""Exports a basic checkpoint with a ViT image tower as a Hugging Face `transformers` CLIPModel
directory (config.json, model.safetensors, the CLIP tokenizer's vocab.json / merges.txt, the
image processor's mean / std); needs torch and transformers.

  python -m basic.export.hf --checkpoint=runs/clip_b32 --output=hf_clip_b32
  model = transformers.CLIPModel.from_pretrained('hf_clip_b32')

The model goes through basic.export.open_clip (its checks, `param_table` read backwards) to
OpenCLIP's state dict, which is renamed to transformers' keys (`HF_NAMES`): OpenCLIP's fused
`in_proj_weight` [3W, W] = (q; k; v) rows is split into q_proj / k_proj / v_proj [W, W] (and the
bias alike); the projections [W, E] are transposed to Linear weights [E, W]; everything else is
the same tensor. transformers' CLIP has what OpenCLIP's ViT CLIP has, plus: its ViT always has
the LayerNorm before the Transformer (`config.model.image.ln_pre` must be True) and it has no
logit bias (`config.loss='sigmoid'` fails). Text pooling: transformers takes the first EOT token
(eos_token_id 49407), which is OpenCLIP's argmax over CLIP's BPE ids (EOT is the largest id).
"""
import json
import os
from typing import Optional

from absl import app
from absl import flags
import numpy as np

from basic import config_lib
from basic.export import open_clip as open_clip_export

# OpenCLIP key prefix -> transformers key prefix (longest match first), per tower.
HF_NAMES = (
    ('visual.transformer.resblocks.', 'vision_model.encoder.layers.'),
    ('transformer.resblocks.', 'text_model.encoder.layers.'),
    ('visual.class_embedding', 'vision_model.embeddings.class_embedding'),
    ('visual.conv1.weight', 'vision_model.embeddings.patch_embedding.weight'),
    ('visual.positional_embedding', 'vision_model.embeddings.position_embedding.weight'),
    ('visual.ln_pre.', 'vision_model.pre_layrnorm.'),
    ('visual.ln_post.', 'vision_model.post_layernorm.'),
    ('token_embedding.weight', 'text_model.embeddings.token_embedding.weight'),
    ('positional_embedding', 'text_model.embeddings.position_embedding.weight'),
    ('ln_final.', 'text_model.final_layer_norm.'),
    ('logit_scale', 'logit_scale'),
)
# Inside a residual block.
BLOCK_NAMES = (('ln_1.', 'layer_norm1.'), ('ln_2.', 'layer_norm2.'), ('mlp.c_fc.', 'mlp.fc1.'),
               ('mlp.c_proj.', 'mlp.fc2.'), ('attn.out_proj.', 'self_attn.out_proj.'))


def _rename(key: str) -> str:
  for old, new in HF_NAMES:
    if key.startswith(old):
      rest = key[len(old):]
      if old.endswith('resblocks.'):
        index, inner = rest.split('.', 1)
        for o, n in BLOCK_NAMES:
          if inner.startswith(o):
            return f'{new}{index}.{n}{inner[len(o):]}'
        raise KeyError(key)
      return new + rest
  raise KeyError(key)


def hf_state_dict(state: dict) -> dict:
  """OpenCLIP's ViT CLIP state dict -> transformers CLIPModel's (module docstring)."""
  out = {}
  for key, value in state.items():
    if key.endswith('attn.in_proj_weight') or key.endswith('attn.in_proj_bias'):
      prefix = _rename(key.replace('attn.in_proj_weight', 'ln_1.weight').replace(
          'attn.in_proj_bias', 'ln_1.bias')).rsplit('layer_norm1.', 1)[0]
      suffix = 'weight' if key.endswith('weight') else 'bias'
      for part, name in zip(np.split(value, 3), ('q_proj', 'k_proj', 'v_proj')):
        out[f'{prefix}self_attn.{name}.{suffix}'] = np.ascontiguousarray(part)
    elif key == 'visual.proj':
      out['visual_projection.weight'] = np.ascontiguousarray(value.T)
    elif key == 'text_projection':
      out['text_projection.weight'] = np.ascontiguousarray(value.T)
    else:
      out[_rename(key)] = value
  return out


def hf_config(config, arch: dict) -> dict:
  """transformers CLIPConfig keyword arguments of the model."""
  image, text = config.model.image, config.model.text
  return dict(
      projection_dim=int(arch['embed_dim']),
      logit_scale_init_value=2.6592,
      text_config=dict(
          vocab_size=int(arch['vocab_size']), hidden_size=int(arch['text_width']),
          intermediate_size=int(arch['text_mlp_dim']), num_hidden_layers=int(arch['text_depth']),
          num_attention_heads=int(arch['text_num_heads']),
          max_position_embeddings=int(arch['text_length']), hidden_act=text.activation,
          layer_norm_eps=float(text.norm_eps), bos_token_id=49406, eos_token_id=49407,
          pad_token_id=1, projection_dim=int(arch['embed_dim'])),
      vision_config=dict(
          hidden_size=int(arch['width']), intermediate_size=int(arch['mlp_dim']),
          num_hidden_layers=int(arch['depth']), num_attention_heads=int(arch['num_heads']),
          image_size=int(arch['image_size']), patch_size=int(arch['patch_size']),
          hidden_act=image.activation, layer_norm_eps=float(image.norm_eps), num_channels=3,
          projection_dim=int(arch['embed_dim'])))


def bpe_vocab(merges_gz: bytes) -> tuple[dict, list]:
  """CLIP's BPE merges file (bpe_simple_vocab_16e6.txt.gz) -> (vocab.json dict, merges lines),
  as OpenAI's / OpenCLIP's SimpleTokenizer builds its encoder."""
  import gzip  # pylint: disable=g-import-not-at-top
  from basic import clip_bpe  # pylint: disable=g-import-not-at-top
  lines = gzip.decompress(merges_gz).decode('utf-8').split('\n')
  merges = lines[1:49152 - 256 - 2 + 1]
  byte_chars = list(clip_bpe.bytes_to_unicode().values())
  vocab = byte_chars + [v + '</w>' for v in byte_chars]
  vocab += [''.join(m.split()) for m in merges] + ['<|startoftext|>', '<|endoftext|>']
  return {token: i for i, token in enumerate(vocab)}, merges


def check_exportable(config):
  """Raises ConfigError naming the field if transformers' CLIPModel cannot express the model:
  basic.export.open_clip's checks, then a ViT image tower with ln_pre and no sigmoid bias."""
  open_clip_export.check_exportable(config)
  if config.model.image.name != 'vit':
    raise config_lib.ConfigError(f'config.model.image.name={config.model.image.name!r}: '
                                 "transformers' CLIPModel has a ViT image tower only.")
  if not config.model.image.ln_pre:
    raise config_lib.ConfigError("config.model.image.ln_pre=False: transformers' CLIP ViT "
                                 'always has its pre-Transformer LayerNorm.')
  if config.loss == 'sigmoid':
    raise config_lib.ConfigError("config.loss='sigmoid': transformers' CLIPModel has no logit "
                                 'bias.')


def export(checkpoint: str, output: str, *, step: Optional[int] = None) -> str:
  """Writes the CLIPModel directory `output`. -> output."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config, params, tokenizer = open_clip_export.load(checkpoint, step)
  check_exportable(config)
  if 'bias' in params:   # Another loss with a bias parameter.
    raise config_lib.ConfigError(f"config.loss={config.loss!r}: transformers' CLIPModel has no "
                                 'logit bias.')
  arch = open_clip_export.architecture(params, config)
  state = hf_state_dict(open_clip_export.export_params(params, config, arch))
  model = transformers.CLIPModel(transformers.CLIPConfig(**hf_config(config, arch)))
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                        strict=True)
  model.save_pretrained(output)
  if tokenizer is not None:
    vocab, merges = bpe_vocab(tokenizer)
    with open(os.path.join(output, 'vocab.json'), 'w', encoding='utf-8') as f:
      json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(output, 'merges.txt'), 'w', encoding='utf-8') as f:
      f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
    transformers.CLIPTokenizer(os.path.join(output, 'vocab.json'),
                               os.path.join(output, 'merges.txt'),
                               model_max_length=int(arch['text_length'])).save_pretrained(output)
  size = int(arch['image_size'])
  transformers.CLIPImageProcessor(
      size={'shortest_edge': size}, crop_size={'height': size, 'width': size},
      image_mean=list(config.data.mean), image_std=list(config.data.std)).save_pretrained(output)
  return output


def _define_flags():
  flags.DEFINE_string('checkpoint', None, 'A basic workdir, checkpoints dir or step dir.')
  flags.DEFINE_string('output', None, 'The transformers CLIPModel directory to write.')
  flags.DEFINE_integer('step', None, 'The step (default: the latest).')
  flags.mark_flags_as_required(['checkpoint', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  output = export(flags.FLAGS.checkpoint, flags.FLAGS.output, step=flags.FLAGS.step)
  print(f'Wrote {output}: transformers.CLIPModel.from_pretrained({output!r})')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
