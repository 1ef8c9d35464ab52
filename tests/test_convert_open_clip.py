"""basic.convert.open_clip and the clip_bpe tokenizer: OpenCLIP ViT CLIP weights give the same
embeddings and zero-shot probabilities in basic as in OpenCLIP, and train on from there.

Needs the `convert` extra (torch, open_clip_torch); skipped without it. Nothing is downloaded:
the OpenCLIP models have random weights, every tensor of their state dicts perturbed with noise
(so LayerNorm scales, zero-initialised biases, the class token, ... are all non-trivial and a
mapping mistake cannot hide). Images go through both models' own preprocessing at the model's
size (uint8 -> (x / 255 - mean) / std, so the converted config's mean / std are checked too).
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
open_clip = pytest.importorskip('open_clip')
torch = pytest.importorskip('torch')
safetensors_torch = pytest.importorskip('safetensors.torch')

from basic import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
from basic import clip_bpe
from basic import config_lib
from basic import inference
from basic import metric_writers
from basic import tokenizer as tokenizer_lib
from basic.convert import open_clip as convert_lib
from configs import open_clip as open_clip_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_ENV = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
MERGES = open_clip.tokenizer.default_bpe()
TOLERANCE = 1e-6   # max abs difference of unit embeddings and of probabilities, float32 (README).

TRICKY = [
    '', 'a photo of a cat.', 'A PHOTO of   a\tDog\n', '!', '!!! hello ?!', 'Hello, World!',
    'caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u201cquoted\u201d \u2018single\u2019',
    '&amp; &lt;b&gt;bold&lt;/b&gt; &quot;x&quot; &#39;y&#39; &amp;amp;', 'mojibake: Ã©tÃ©',
    '\u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 '
    '\u0440\u0443\u0441\u0441\u043a\u0438\u0439 \U0001F600\U0001F436\u2764\ufe0f',
    "it's we're they've I'm you'll he'd don't", '3.14159 1,000,000 $9.99 50% #1 @user',
    'https://example.com/a_b-c?d=e&f=g', '<start_of_text> literal <end_of_text> tokens',
    'word ' * 120, 'x' * 500, 'supercalifragilisticexpialidocious antidisestablishmentarianism',
]
CAPTIONS = ['a photo of a cat sitting on a red sofa.', 'Two dogs playing in the snow!',
            'a diagram of the solar system', '', 'A bowl of ramen with an egg & chopsticks',
            'caf\u00e9 interior at night, 35mm film']
LABELS = ['cat', 'dog', 'airplane', 'bowl of soup']
TEMPLATES = ('a photo of a {}.', 'a blurry photo of a {}.')


def _perturb(model, seed: int, scale: float = 0.05):
  """Adds scale * N(0, 1) noise to every tensor of the state dict, in place; -> state dict."""
  generator = torch.Generator().manual_seed(seed)
  state = model.state_dict()
  with torch.no_grad():
    for value in state.values():
      value.add_(scale * torch.randn(value.shape, generator=generator))
  return state


def _reference(model, images: np.ndarray, captions, labels) -> dict:
  """OpenCLIP's outputs: unit image / text embeddings and zero-shot probabilities."""
  mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
  tokenize = open_clip.get_tokenizer('ViT-B-32')
  with torch.no_grad():
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    image = model.encode_image(x, normalize=True)
    text = model.encode_text(tokenize(captions), normalize=True)
    prompts = model.encode_text(tokenize([t.format(l) for l in labels for t in TEMPLATES]),
                                normalize=True)
    classes = prompts.reshape(len(labels), len(TEMPLATES), -1).mean(dim=1)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    probs = (model.logit_scale.exp() * image @ classes.T).softmax(dim=-1)
  return {'image': image.numpy(), 'text': text.numpy(), 'probs': probs.numpy()}


def _differences(directory: str, model, image_size: int, seed: int) -> dict:
  """Max abs differences between the converted checkpoint (basic.inference) and `model`."""
  images = np.random.default_rng(seed).integers(0, 256, (4, image_size, image_size, 3), np.uint8)
  want = _reference(model, images, CAPTIONS, LABELS)
  loaded = inference.load(directory, batch_size=4)
  got = {'image': loaded.encode_images(images), 'text': loaded.encode_texts(CAPTIONS),
         'probs': loaded.zero_shot(images, LABELS, TEMPLATES)}
  assert got['probs'].max() < 0.999   # Probabilities that are not all one-hot: a real test.
  diffs = {k: float(np.abs(got[k] - want[k]).max()) for k in want}
  print(f'{directory}: max abs differences {diffs}')
  return diffs


# --- The tokenizer. -------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def bpe():
  return clip_bpe.ClipBpeTokenizer(MERGES, 77)


def test_clip_bpe_equals_open_clip_tokenize(bpe):
  want = open_clip.tokenize(TRICKY).numpy()
  np.testing.assert_array_equal(bpe.encode(TRICKY), want)
  np.testing.assert_array_equal(open_clip.get_tokenizer('ViT-B-32')(TRICKY).numpy(), want)
  assert (bpe.vocab_size, bpe.pad_id, bpe.bos_id, bpe.eos_id) == (49408, 0, 49406, 49407)
  assert bpe.encode(['']).tolist()[0][:3] == [49406, 49407, 0]
  long = bpe.encode(['word ' * 120])[0]
  assert long[-1] == 49407 and (long != 0).all()          # Cut with EOT kept last.
  assert bpe.serialized_model == open(MERGES, 'rb').read()
  assert bpe.decode(bpe.encode(['Hello,   World! caf\u00e9'])) == ['hello , world ! caf\u00e9']


def test_clip_bpe_inside_tf_data(bpe):
  tf = pytest.importorskip('tensorflow')
  short = clip_bpe.ClipBpeTokenizer(MERGES, 16)
  dataset = tf.data.Dataset.from_tensor_slices(TRICKY).batch(5).map(
      lambda t: (bpe.tf_tokenize(t), short.tf_tokenize(t)), num_parallel_calls=2)
  assert dataset.element_spec[0].shape.as_list() == [None, 77]
  full, cut = (np.concatenate(x) for x in zip(*[(a.numpy(), b.numpy()) for a, b in dataset]))
  assert full.dtype == np.int32
  np.testing.assert_array_equal(full, open_clip.tokenize(TRICKY).numpy())
  np.testing.assert_array_equal(cut, open_clip.tokenize(TRICKY, context_length=16).numpy())


def test_make_tokenizer_and_ensure_tokenizer_for_clip_bpe(tmp_path):
  config = open_clip_configs.get_config(f'tokenizer={MERGES}')
  assert tokenizer_lib.ensure_tokenizer(config, str(tmp_path)) == MERGES
  tok = tokenizer_lib.make_tokenizer(config.tokenizer, MERGES, config.data.text_length)
  assert isinstance(tok, clip_bpe.ClipBpeTokenizer) and tok.length == 77
  config.tokenizer.model_path = ''   # Never trained: an error naming the field.
  with pytest.raises(config_lib.ConfigError, match=r"config\.tokenizer\.model_path=''"):
    tokenizer_lib.ensure_tokenizer(config, str(tmp_path))
  config.tokenizer.kind = 'wordpiece'
  with pytest.raises(config_lib.ConfigError, match=r"config\.tokenizer\.kind='wordpiece'"):
    config_lib.validate(config)


# --- Conversion. ----------------------------------------------------------------------------------

TINY = dict(embed_dim=48, quick_gelu=True,
            vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """A small custom OpenCLIP ViT (QuickGELU), saved as .pt, converted with the command line."""
  root = tmp_path_factory.mktemp('tiny')
  torch.manual_seed(0)
  model = open_clip.model.CLIP(embed_dim=TINY['embed_dim'], vision_cfg=TINY['vision_cfg'],
                               text_cfg=TINY['text_cfg'], quick_gelu=True).eval()
  state = _perturb(model, seed=1)
  torch.save(state, root / 'tiny.pt')
  (root / 'tiny.json').write_text(json.dumps(TINY))
  output = str(root / 'converted')
  subprocess.run([sys.executable, '-m', 'basic.convert.open_clip', f'--model={root}/tiny.json',
                  f'--checkpoint={root}/tiny.pt', f'--output={output}'],
                 cwd=REPO, env=SUBPROCESS_ENV, check=True)
  return model, output, {k: v.numpy().copy() for k, v in state.items()}


def test_tiny_custom_model_gives_the_same_embeddings(tiny):
  model, output, _ = tiny
  diffs = _differences(output, model, 32, seed=0)
  assert max(diffs.values()) <= TOLERANCE, diffs
  ckpt = checkpoint_lib.Checkpointer(output, read_only=True)
  assert ckpt.all_steps() == [0]
  assert ckpt.restore_tokenizer_kind(0) == 'clip_bpe'
  assert ckpt.restore_tokenizer(0) == open(MERGES, 'rb').read()
  config = ckpt.restore_config(0)
  assert (config.model.image.activation, config.model.text.pool, config.data.text_length,
          config.tokenizer.kind) == ('quick_gelu', 'argmax', 77, 'clip_bpe')
  config_lib.validate(config)
  np.testing.assert_allclose(float(ckpt.restore_params(0)['log_temperature']),
                             -model.logit_scale.item(), rtol=1e-6)


def test_vit_b32_gives_the_same_embeddings(tmp_path):
  """OpenCLIP's ViT-B-32 (GELU), from .safetensors, converted by the function."""
  torch.manual_seed(0)
  model = open_clip.create_model('ViT-B-32', pretrained=None).eval()
  state = _perturb(model, seed=2)
  path = str(tmp_path / 'vit_b32.safetensors')
  safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
  del state
  output = convert_lib.convert('ViT-B-32', path, str(tmp_path / 'converted'))
  os.remove(path)
  diffs = _differences(output, model, 224, seed=1)
  assert max(diffs.values()) <= TOLERANCE, diffs
  config = checkpoint_lib.Checkpointer(output, read_only=True).restore_config(0)
  image, text = config.model.image, config.model.text    # The architecture, read from shapes.
  assert (config.data.image_size, image.patch_size, image.width, image.depth, image.num_heads,
          image.mlp_dim, image.activation, image.ln_pre) == (224, 32, 768, 12, 12, 3072, 'gelu',
                                                             True)
  assert (config.data.text_length, text.vocab_size, text.width, text.depth, text.num_heads,
          text.mlp_dim, text.mask_padding, config.model.embed_dim) == (77, 49408, 512, 12, 8,
                                                                       2048, False, 512)


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_torchscript_training_checkpoint_and_ddp_inputs_convert_alike(tiny, tmp_path):
  """The input forms a user has: a TorchScript archive (torch.jit.save of a scripted model, as
  OpenAI's ViT-B-32.pt), OpenCLIP's training checkpoint {'state_dict': ...} with DDP's 'module.'
  prefix, and a bare 'module.'-prefixed state dict all read as the tiny model's state dict and
  convert to the same parameters as its plain .pt (which matches OpenCLIP within TOLERANCE)."""
  model, output, state = tiny
  scripted = tmp_path / 'scripted.pt'
  torch.jit.save(torch.jit.script(model), str(scripted))
  training = tmp_path / 'epoch_1.pt'
  ddp = {'module.' + k: torch.from_numpy(v) for k, v in state.items()}
  torch.save({'epoch': 1, 'name': 'tiny', 'state_dict': ddp}, training)
  bare_ddp = tmp_path / 'ddp.pt'
  torch.save(ddp, bare_ddp)
  (tmp_path / 'tiny.json').write_text(json.dumps(TINY))
  want = _flat(checkpoint_lib.Checkpointer(output, read_only=True).restore_params(0))
  for path, is_jit in ((scripted, True), (training, False), (bare_ddp, False)):
    read, jit = convert_lib.load_state_dict(str(path))
    assert jit == is_jit and read.keys() == state.keys(), (path, sorted(read.keys() ^ state.keys()))
    for key in state:
      np.testing.assert_array_equal(read[key], state[key], err_msg=f'{path}: {key}')
    converted = convert_lib.convert(str(tmp_path / 'tiny.json'), str(path),
                                    str(tmp_path / f'converted_{path.stem}'))
    ckpt = checkpoint_lib.Checkpointer(converted, read_only=True)
    assert ckpt.restore_config(0).model.image.activation == 'quick_gelu'
    got = _flat(ckpt.restore_params(0))
    assert got.keys() == want.keys()
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=f'{path}: {name}')


def test_training_continues_from_the_converted_checkpoint(tiny, tmp_path):
  """`basic.train --config=configs/from_checkpoint.py:path=DIR` on synthetic data: it trains,
  starts from the converted parameters (an update of lr 1e-20 leaves them equal) and tokenises
  with the checkpoint's CLIP BPE."""
  _, output, _ = tiny
  workdir = tmp_path / 'ft'
  subprocess.run(
      [sys.executable, '-m', 'basic.train', f'--config=configs/from_checkpoint.py:path={output}',
       f'--workdir={workdir}', '--config.data.source=synthetic', '--config.total_steps=2',
       '--config.batch_size=8', '--config.microbatch_size=8', '--config.log_every_steps=1',
       '--config.model.image.remat=none', '--config.model.text.remat=none',
       '--config.optimizer.learning_rate=1e-20'],
      cwd=REPO, env=SUBPROCESS_ENV, check=True, stdout=subprocess.DEVNULL)
  rows = [r for r in metric_writers.read_jsonl(str(workdir / 'metrics.jsonl'))
          if 'train/loss' in r]
  assert [r['step'] for r in rows] == [1, 2] and all(np.isfinite(r['train/loss']) for r in rows)
  converted = checkpoint_lib.Checkpointer(output, read_only=True).restore_params(0)
  trained = checkpoint_lib.Checkpointer(str(workdir / 'checkpoints'),
                                        read_only=True).restore_params(2)
  flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v)
                       for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  got, want = flat(trained), flat(converted)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)
  assert (workdir / 'tokenizer' / 'bpe_simple_vocab_16e6.txt.gz').read_bytes() == open(
      MERGES, 'rb').read()


def test_a_state_dict_that_does_not_fit_fails_naming_the_key(tiny, tmp_path):
  _, _, state = tiny

  def convert(state, cfg=TINY):
    reader = convert_lib._Reader(dict(state), 'ckpt.pt')    # pylint: disable=protected-access
    return convert_lib.convert_params(reader, convert_lib.architecture(reader, cfg))

  assert convert(state)['image']['cls'].shape == (1, 1, 64)
  missing = {k: v for k, v in state.items() if k != 'visual.ln_post.weight'}
  with pytest.raises(ValueError, match=r"key 'visual\.ln_post\.weight' is missing"):
    convert(missing)
  with pytest.raises(ValueError, match=r"key 'visual\.extra\.weight' \(and 0 more\) has no place"):
    convert({**state, 'visual.extra.weight': np.zeros(3, np.float32)})
  bad = dict(state)
  bad['transformer.resblocks.1.attn.out_proj.weight'] = np.zeros((64, 32), np.float32)
  with pytest.raises(ValueError, match=r"key 'transformer\.resblocks\.1\.attn\.out_proj\.weight' "
                                       r'has shape \(64, 32\), expected \(64, 64\)'):
    convert(bad)
  wrong = {**TINY, 'vision_cfg': {**TINY['vision_cfg'], 'patch_size': 16}}
  with pytest.raises(ValueError, match=r"key 'visual\.conv1\.weight' gives patch_size=8, but the "
                                       r'model config says vision_cfg\.patch_size=16'):
    convert(state, wrong)
  with pytest.raises(ValueError, match=r'text_cfg\.embed_cls=True is not supported'):
    convert(state, {**TINY, 'text_cfg': {**TINY['text_cfg'], 'embed_cls': True}})
  # The command line: the same errors, before anything is written.
  torch.save({k: torch.from_numpy(v) for k, v in missing.items()}, tmp_path / 'bad.pt')
  (tmp_path / 'tiny.json').write_text(json.dumps(TINY))
  run = subprocess.run([sys.executable, '-m', 'basic.convert.open_clip',
                        f'--model={tmp_path}/tiny.json', f'--checkpoint={tmp_path}/bad.pt',
                        f'--output={tmp_path}/out'],
                       cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True)
  assert run.returncode != 0 and "key 'visual.ln_post.weight' is missing" in run.stderr
  assert not os.path.exists(tmp_path / 'out')
  with pytest.raises(ValueError, match=r"--model='ViT-Nope': not an OpenCLIP model name"):
    convert_lib.model_config('ViT-Nope')
