"""Benchmarks of basic (`python -m benchmarks.NAME`); not part of the library or the test suite.

One module per benchmark, each writing one section of BENCHMARKS.md (`--out`) through
`benchmarks.common.write_section`:

  gradcache        gradient-cached vs plain step time; peak RSS at two batch sizes
  input_pipeline   tf.data decode / crop / tokenise throughput on JPEG TFRecord shards
  webdataset       webdataset tar shards vs TFRecord: raw stream and training pipeline
  clipa            CLIPA token reduction: image tower and train step throughput
  clipa_schedule   CLIPA schedule vs full tokens at equal training time (held-out top-1)
  loss_precision   loss and gradient errors per config.loss_precision (float64 reference)
  loss_memory      the loss's per-device memory, replicated vs sharded (fake devices)
  loss_speed       the loss's time, replicated vs sharded (8 fake CPU devices)
"""
