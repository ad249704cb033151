"""examples/nonunique_inner.py: what each method reaches when L_T has many minimisers."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import nonunique_inner  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return nonunique_inner.main(["--quick", "--out", str(tmp_path_factory.mktemp("nonunique"))])


def test_cg_flags_the_singular_hessian_and_every_hyper_step_is_skipped(results):
  for init in ("zero", "random"):
    run = results[f"bilevel_cg/{init}"]
    assert run["lam"] == [0.0, 0.0]
    assert run["num_skipped"] == 20  # all of the quick run's hyper steps


def test_neumann_reaches_the_minimiser_its_own_initialisation_selects(results):
  scale = np.linalg.norm(results["lam_O/zero"])
  # Two initialisations, two different fixed points lam_A, each reached.
  assert results["lam_A_gap_between_inits"] > 0.5 * scale
  for init in ("zero", "random"):
    run = results[f"bilevel_neumann/{init}"]
    assert run["distance_to_lam_A"] < 0.05
    assert run["distance_to_lam_O"] > 0.05
    assert run["num_skipped"] == 0 and run["residual_norm"] > 0.1  # not flagged


def test_f2sa_reaches_the_optimistic_solution_from_any_initialisation(results):
  zero, random = (np.array(results[f"f2sa/{init}"]["lam"]) for init in ("zero", "random"))
  for init in ("zero", "random"):
    assert results[f"f2sa/{init}"]["distance_to_lam_O"] < 0.01  # O(1 / penalty), penalty 1000
  assert np.linalg.norm(zero - random) < 1e-3 * np.linalg.norm(zero)


def test_bome_forgets_the_initialisation_but_stays_off_the_optimistic_solution(results):
  zero, random = (np.array(results[f"bome/{init}"]["lam"]) for init in ("zero", "random"))
  assert np.linalg.norm(zero - random) < 0.1 * results["lam_A_gap_between_inits"]
  for init in ("zero", "random"):
    assert 0.2 < results[f"bome/{init}"]["distance_to_lam_O"] < 0.5
