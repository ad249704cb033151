"""benchmarks/bilevel.py: the quadratic's closed form, the oracle counts, and --quick runs.

The three problems run at once with --quick, each in its own subprocess, once per test
session. Nothing here asserts a timing.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "bilevel.py"
sys.path.insert(0, str(BENCHMARKS))
import _bilevel_problems as bilevel_problems  # noqa: E402
import bilevel  # noqa: E402

PROBLEMS = {
  "quadratic": ("quadratic_mu0.1",),
  "cleaning": ("cleaning_0.5",),
  "logreg": ("logreg",),
}
# Every method is compiled in one of the three smoke runs (all sixteen in each would take
# minutes of compilation).
SUBSETS = {
  "quadratic": ("cg", "cg_nystrom", "saba", "srba", "f2sa", "fsla"),
  "cleaning": ("soba", "unrolled", "bome", "sama", "amigo_decay"),
  "logreg": ("neumann", "amigo", "stocbio", "soba_decay", "ttsa"),
}


def test_quadratic_value_function_matches_a_direct_solve_of_the_inner_problem():
  p = bilevel_problems.quadratic_problem(n_inner=512, n_outer=128, dim_inner=20, dim_outer=4)
  for seed in (1, 2):
    x = jnp.asarray(np.random.default_rng(seed).normal(size=4))
    hessian = jax.hessian(p.inner_loss)(p.params, x, *p.train)
    z = -jnp.linalg.solve(hessian, jax.grad(p.inner_loss)(p.params, x, *p.train))
    record, _ = p.evaluate(None, x, None)
    assert record["outer"] == pytest.approx(float(p.outer_loss(z, x, *p.val)), rel=1e-10)
    # |grad h|^2 against the implicit hypergradient by Direct solves.
    value = lambda x, hessian=hessian: p.outer_loss(
      -jnp.linalg.solve(hessian, jax.grad(p.inner_loss)(p.params, x, *p.train)), x, *p.val
    )
    assert record["grad_norm_sq"] == pytest.approx(
      float(jnp.sum(jax.grad(value)(x) ** 2)), rel=1e-9
    )
  start, _ = p.evaluate(None, p.hparams, None)
  assert start["suboptimality"] > 0


def test_the_smoke_runs_cover_every_method():
  assert sorted(m for subset in SUBSETS.values() for m in subset) == sorted(bilevel.METHODS)


def test_oracle_calls_follow_benchopts_table_for_the_methods_it_shares():
  # benchopt's figures/plot_benchmark_bilevel.py N_CALLS: (inner, outer) per iteration.
  assert bilevel.METHODS["amigo"].calls == (21, 2)
  assert bilevel.METHODS["stocbio"].calls == (21, 2)
  assert bilevel.METHODS["saba"].calls == (3, 2)
  assert bilevel.METHODS["soba"].calls == (3, 2)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("bilevel")
  runs = {
    name: subprocess.Popen(
      [sys.executable, str(SCRIPT), "--problem", name, "--quick", "--out", str(out)]
      + ["--methods", ",".join(SUBSETS[name])],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for name in PROBLEMS
  }
  finished = {name: run.communicate(timeout=900) for name, run in runs.items()}
  payloads = {}
  for name, (stdout, stderr) in finished.items():
    assert runs[name].returncode == 0, f"bilevel.py --problem {name} --quick:\n{stdout}\n{stderr}"
    payloads[name] = json.loads((out / f"bilevel_{name}.json").read_text())
    assert (out / f"bilevel_{name}.png").read_bytes()[:4] == b"\x89PNG"
  return payloads


@pytest.mark.parametrize("name", PROBLEMS)
def test_every_method_runs_every_seed_on_about_the_same_budget(results, name):
  payload = results[name]
  budget = payload["settings"]["budget"]
  for variant in PROBLEMS[name]:
    runs = payload["problems"][variant]["runs"]
    assert set(runs) == set(SUBSETS[name])
    for method, seeds in runs.items():
      assert len(seeds) == len(payload["settings"]["seeds"])
      for records in seeds:
        calls = [r["calls"] for r in records]
        assert calls[0] == 0 and calls == sorted(calls)
        assert 0.5 * budget <= calls[-1] <= 2.0 * budget, method
      assert payload["results"][variant][method]["skipped_hyper_steps"] == [0] * len(seeds)


def test_the_quadratic_reports_suboptimality_and_the_squared_hypergradient(results):
  runs = results["quadratic"]["problems"]["quadratic_mu0.1"]["runs"]
  finals = []
  for seeds in runs.values():
    for records in seeds:
      assert all(r["suboptimality"] >= 0 and r["grad_norm_sq"] >= 0 for r in records)
      finals.append(records[-1]["suboptimality"] / records[0]["suboptimality"])
  assert min(finals) < 0.8  # the smoke budget is small; at least one method makes progress


def test_cleaning_reports_test_error_and_the_kept_labels_reference(results):
  summary = results["cleaning"]["problems"]["cleaning_0.5"]
  label, value = summary["reference"]
  assert label == "kept labels only" and 0 < value < 0.5
  for seeds in summary["runs"].values():
    for records in seeds:
      assert 0.0 < records[-1]["test_error"] < 0.9
