"""A hypergradient across two processes (`jax.distributed` on 127.0.0.1, gloo collectives)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multihost_worker  # noqa: E402

WORKER = Path(__file__).resolve().parent / "multihost_worker.py"
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2
TIMEOUT_S = 180  # a hung collective fails the test instead of blocking the suite


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_workers(tmp_path):
  """Starts the processes, waits for all of them (killing all on a timeout), returns results."""
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
    JAX_PLATFORMS="cpu",
  )
  address = f"127.0.0.1:{free_port()}"
  outputs = [tmp_path / f"process_{i}.json" for i in range(NUM_PROCESSES)]
  logs = [(tmp_path / f"process_{i}.log").open("w") for i in range(NUM_PROCESSES)]
  workers = [
    subprocess.Popen(
      [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), address, str(out)],
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
    )
    for i, (out, log) in enumerate(zip(outputs, logs, strict=True))
  ]
  try:
    codes = [worker.wait(timeout=TIMEOUT_S) for worker in workers]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
        worker.wait()
    for log in logs:
      log.close()
  report = "\n".join(
    f"--- process {i} ---\n{(tmp_path / f'process_{i}.log').read_text()}"
    for i in range(NUM_PROCESSES)
  )
  assert codes is not None, f"the workers did not finish within {TIMEOUT_S} s\n{report}"
  assert codes == [0] * NUM_PROCESSES, f"exit codes {codes}\n{report}"
  return [json.loads(out.read_text()) for out in outputs]


def test_hypergrad_sharded_across_two_processes_equals_single_process(tmp_path):
  results = run_workers(tmp_path)

  weights, log_decay, train, val = multihost_worker.make_problem()
  single = np.asarray(multihost_worker.hypergrad(weights, log_decay, train, val))
  for process_id, result in enumerate(results):
    assert result["process_index"] == process_id
    assert result["global_devices"] == NUM_PROCESSES * DEVICES_PER_PROCESS
    assert result["local_devices"] == DEVICES_PER_PROCESS
    np.testing.assert_allclose(
      result["hypergrad"], single, rtol=1e-9, atol=1e-9 * np.max(np.abs(single))
    )
  assert np.max(np.abs(single)) > 1e-4  # a non-trivial hypergradient is compared
