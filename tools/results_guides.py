"""The numbers of the guides and of the pages others write, rendered (see tools/render_results.py).

Every number is read from `docs/results/<run>/`.
"""

from tools._results import load
from tools._results import per_step
from tools._results import ratio_range
from tools._results import seconds
from tools._results import wall
from tools.results_gallery import augmentation_summary
from tools.results_pages import _speed
from tools.results_pages import _widths


def guide_per_weight_decay() -> str:
  d, million, mnist = load("overfit_validation"), load("overfit_million"), load("overfit_mnist")
  return (
    "With as many hyperparameters as weights, the validation set is fitted almost as a"
    " training set would be. `examples/overfit_validation.py` makes the point of the paper:"
    f" an MLP with {d['num_hyperparams']:,} weights and as many decays, 50 training and 50"
    " validation digits. In its published default run validation accuracy climbs from"
    f" {d['untuned_val_acc']:.2f} to {d['val_acc']:.2f} while test accuracy rises less, from"
    f" {d['untuned_test_acc']:.3f} to {d['test_acc']:.3f} ([gallery](../examples.md), with"
    f" the other seeds). With `--width 1000` it tunes {million['num_hyperparams']:,} decays at"
    f" {per_step([million['seconds_per_hyper_step']])} per hyper step on 2 CPU cores; on MNIST"
    f" (`--dataset mnist`, one hidden layer) `--width 1000` gives {mnist['num_hyperparams']:,}"
    f" decays at {per_step([mnist['seconds_per_hyper_step']])} per hyper step, validation accuracy"
    f" {mnist['untuned_val_acc']:.2f} → {mnist['val_acc']:.2f} and test accuracy"
    f" {mnist['untuned_test_acc']:.3f} → {mnist['test_acc']:.3f}."
  )


def guide_scale() -> str:
  largest = load("scale", "scale.json")["results"][-1]
  return (
    "- **Memory and time** are those of about K + 2 gradients per hyper step (K Neumann"
    " terms), independent of the number of hyperparameters beyond storing them"
    f" (`benchmarks/scale.py`: {largest['hyperparameters']:,} hyperparameters in"
    f" {seconds(largest['seconds'])} per hypergradient on CPU,"
    f" {largest['seconds'] / largest['gradient_seconds']:.0f} gradients' time,"
    f" {largest['xla_total_bytes'] / largest['hyperparameters']:.0f} bytes per hyperparameter in"
    " XLA's memory analysis)."
  )


def guide_distillation() -> str:
  d, mnist = load("dataset_distillation"), load("dataset_distillation_mnist")
  return (
    "`examples/dataset_distillation.py` is the full experiment (Newton-CG inner solver, an MLP"
    " option, five draws of random real images as a baseline): test accuracy"
    f" {d['distilled_test_acc']:.3f} against {d['class_mean_test_acc']:.3f} for the class means"
    f" and {d['random_real_test_acc']:.3f} for ten random real digits in its published run; on"
    f" MNIST (`--dataset mnist`, {mnist['num_hyperparams']:,} hyperparameters)"
    f" {mnist['distilled_test_acc']:.3f} against {mnist['class_mean_test_acc']:.3f} and"
    f" {mnist['random_real_test_acc']:.3f} ([gallery](../examples.md))."
  )


def guide_imaml() -> str:
  m = load("imaml_sinusoid")
  return (
    "`examples/imaml_sinusoid.py` is the full experiment (an MLP, 25 tasks per meta-batch,"
    f" {m['meta_steps']:,} meta-steps): in its published run, query MSE {m['imaml_mse']:.3f} on"
    f" {m['eval_tasks']:,} held-out tasks against {m['pretrain_mse']:.3f} for the same network"
    " pretrained on the pooled tasks and adapted the same way ([gallery](../examples.md)); its"
    " backward CG met negative curvature in"
    f" {100 * m['cg_breakdown_fraction']:.1f}% of the task solves."
  )


def migration_speed() -> str:
  """docs/migrating-from-jaxopt.md's speed bullet."""
  speed = _speed()
  ratio = lambda key: ratio_range([r["ratio_to_floor"][key] for r in speed])  # noqa: E731
  return (
    "- **Speed.** Hessian-vector products are forward-over-reverse here, reverse-over-reverse"
    " in jaxopt; on this project's benchmark one hypergradient with 20 CG steps takes"
    f" {ratio('ih CG')}× a hand-written floor here against {ratio('jaxopt CG')}× with jaxopt's"
    f" CG at {_widths(speed)} (`docs/results/speed/speed.json`;"
    " [how to choose a solver](choosing-a-solver.md))."
  )


def online_loop_quickstart() -> str:
  """docs/concepts/online-loop.md's sentence on the published bilevel_quickstart run."""
  last = load("bilevel_quickstart")[-1]
  return (
    f"Its published run (`python examples/bilevel_quickstart.py`, {wall('bilevel_quickstart')};"
    f" `docs/results/bilevel_quickstart/`) ends at validation loss {last['outer_loss']:.3f}"
    f" after {last['step'] + 1} hyper steps, {last['num_skipped']} of them skipped by the"
    " divergence guard."
  )


def guide_augmentation() -> str:
  """docs/guides/learned-augmentation.md's paragraph on the published run."""
  a = load("learned_augmentation")
  return (
    f"In the published run ({a['num_hyperparams']:,} log standard deviations, a small CNN on"
    f" {a['train_size']} digits, {a['hyper_steps']} hyper steps of which the first {a['warmup']}"
    f" at outer rate 0, {a['seeds']} seeds), {augmentation_summary(a)}"
    " See also the [gallery](../examples.md)."
  )
