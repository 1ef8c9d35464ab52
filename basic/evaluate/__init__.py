"""Evaluation of dual encoders: zero-shot classification and image-text retrieval.

  run.py        run_evaluators / Evaluator: the evaluators a config lists; evaluate_checkpoint.
  __main__.py   python -m basic.evaluate --workdir=DIR | --checkpoint=PATH [--config=FILE].
  tasks.py      task configs for config.eval.tasks (zeroshot_task, retrieval_task, imagenet_suite).
  zeroshot.py   zero-shot top-k with prompt ensembles (synthetic data and TFDS tasks).
  retrieval.py  image <-> text recall@k with several captions per image.
  datasets.py   evaluation examples from prepared TFDS data sets (tf.data, CPU).
  encoders.py   the towers jitted over the device mesh for global evaluation batches.
  metadata.py   class names, prompt templates, class subsets (data/: ImageNet-1k, CLIP's 80
                templates, CIFAR-10/100, ImageNet-A/R subsets).
"""
