"""notebooks/zero_shot_demo.ipynb runs top to bottom against a tiny checkpoint trained here.

The notebook runs in a Jupyter kernel started with this interpreter (a kernel spec written to a
temporary JUPYTER_PATH, so no installed kernel spec matters), with BASIC_CHECKPOINT pointing at
the checkpoint. Its printed probabilities must be those of basic.inference for the same images.
"""
import json
import os
import re
import sys

import nbclient
import nbformat
import numpy as np

import eval_helpers
from basic import inference
from basic.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'zero_shot_demo.ipynb')
KERNEL = 'basic-test-python'


def _outputs(nb, kind):
  return [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.outputs
          if o.output_type == kind]


def test_notebook_executes_and_prints_probabilities(tmp_path_factory, tmp_path, monkeypatch):
  config, workdir = eval_helpers.trained_run(tmp_path_factory)
  spec = tmp_path / 'jupyter' / 'kernels' / KERNEL
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'basic test kernel', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('BASIC_CHECKPOINT', workdir)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not cell.get('outputs') for cell in nb.cells)     # stored without outputs
  nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                          resources={'metadata': {'path': str(tmp_path)}}).execute()

  assert not _outputs(nb, 'error')
  text = ''.join(o.text for o in _outputs(nb, 'stream') if o.name == 'stdout')
  assert f'Loaded step {eval_helpers.TRAIN_STEPS} of {workdir}' in text
  assert 'Label probabilities' in text
  assert any('image/png' in o.data for o in _outputs(nb, 'display_data'))
  # The printed probabilities: one line per image, every label once, summing to 1.
  labels = ['red circle', 'green square', 'blue triangle', 'yellow cross', 'purple diamond',
            'orange ring', 'white circle', 'cyan square']
  rows = re.findall(r'^image (\d+) \(([a-z ]+)\): (.*)$', text, re.M)
  assert [int(r[0]) for r in rows] == list(range(6))
  printed = np.zeros((6, len(labels)))
  for i, _, entries in rows:
    pairs = [re.fullmatch(r'(.+) (\d\.\d{3})', e).groups() for e in entries.split(' | ')]
    assert sorted(p[0] for p in pairs) == sorted(labels)
    for label, p in pairs:
      printed[int(i), labels.index(label)] = float(p)
  np.testing.assert_allclose(printed.sum(axis=1), 1.0, atol=0.01)
  # ... and they are basic.inference's for the held-out images the notebook shows.
  shapes = synthetic.ShapesDataset.from_config(config.data)
  images = shapes.eval_examples(1, 'heldout')['image'][:6]
  expected = inference.load(workdir).zero_shot(list(images), labels)
  np.testing.assert_allclose(printed, expected, atol=0.0005 + 1e-6)
  assert [r[1] for r in rows] == list(np.asarray(shapes.class_names)[shapes.heldout_classes[:6]])
