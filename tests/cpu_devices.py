"""Environment for test subprocesses that need several fake CPU devices."""
import os

# Faster XLA:CPU compiles; every run that is compared with another uses the same flags.
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def env(num_devices: int) -> dict:
  """os.environ plus XLA_FLAGS for `num_devices` host devices (fast compile) and JAX on CPU."""
  result = dict(os.environ)
  result['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE}'
  result['JAX_PLATFORMS'] = 'cpu'
  return result
