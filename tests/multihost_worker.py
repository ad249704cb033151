"""One process of a multi-process hypergradient, launched twice by tests/test_multihost.py.

Usage: python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES COORDINATOR_ADDRESS OUT_JSON

Each process owns the CPU devices that XLA_FLAGS gives it and loads only its own rows
of the training and validation sets; a global mesh over the devices of all processes
shards the batches, and `jax.jit` runs one program across the processes, which talk
through gloo. The process writes the hypergradient it sees to OUT_JSON.
"""

import json
import sys

import _problems
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import implicit_hyper as ih

ROWS, FEATURES, CLASSES = 32, 5, 3


train_loss = _problems.decayed_cross_entropy
val_loss = _problems.validation_cross_entropy


@jax.jit
def hypergrad(weights, log_decay, train, val):
  return ih.hypergrad(
    train_loss, val_loss, weights, log_decay, inner_args=train, outer_args=val, solver=ih.CG()
  )


def make_problem(seed=0):
  """Weights, log decays, and the full training and validation sets (float64 numpy)."""
  return _problems.softmax_problem(ROWS, FEATURES, CLASSES, seed)


def main(process_id, num_processes, coordinator_address, out_path):
  jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
  )
  mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  by_rows = NamedSharding(mesh, P("batch"))
  replicated = NamedSharding(mesh, P())

  weights, log_decay, train, val = make_problem()
  rows = slice(process_id * ROWS // num_processes, (process_id + 1) * ROWS // num_processes)

  def global_batch(batch):  # assembled from every process's own rows
    return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(by_rows, a[rows], a.shape), batch
    )

  grads = hypergrad(
    jax.device_put(weights, replicated),
    jax.device_put(log_decay, replicated),
    global_batch(train),
    global_batch(val),
  )
  result = {
    "process_index": jax.process_index(),
    "global_devices": jax.device_count(),
    "local_devices": jax.local_device_count(),
    "hypergrad": np.asarray(grads.addressable_data(0)).tolist(),
  }
  with open(out_path, "w") as f:
    json.dump(result, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
