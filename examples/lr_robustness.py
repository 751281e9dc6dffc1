"""Learning-rate robustness, the paper's central claim: SGD and Adam with and without Lookahead.

Every optimizer trains the same MLP on scikit-learn's digits for a sweep of learning rates and
several seeds; the final validation loss and accuracy (Lookahead on its slow weights) are plotted
against the learning rate, as the mean over seeds with the min-max range shaded.

    python examples/lr_robustness.py          # writes examples/lr_robustness.png
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from common import final_validation, parse_args, save_figure

# Learning rates a third of a decade apart, wide enough for every optimizer to fail at both ends.
FAMILIES = {
    "SGD (momentum 0.9)": (("SGD", "Lookahead(SGD)"), np.logspace(-2, 1 / 3, 8)),
    "Adam": (("Adam", "Lookahead(Adam)"), np.logspace(-4, -1, 10)),
}
# Diverged runs have an infinite loss, and some runs end far above chance (ln 10 = 2.3) with
# overconfident logits; losses are drawn capped here so that the mean stays on the axis.
LOSS_CAP = 10.0
GOOD_ACCURACY = 0.95


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    epochs, seeds, every = (1, 1, 4) if args.quick else (30, 5, 1)

    figure, axes = plt.subplots(2, len(FAMILIES), figsize=(6 * len(FAMILIES), 8), squeeze=False)
    for column, (family, (names, all_lrs)) in enumerate(FAMILIES.items()):
        lrs = all_lrs[::every]
        table = []
        for name, color in zip(names, ("tab:gray", "tab:blue")):
            # results[lr, seed] = (loss, accuracy)
            results = np.array(
                [[final_validation(name, lr, seed, epochs) for seed in range(seeds)] for lr in lrs]
            )
            loss, accuracy = np.minimum(results[..., 0], LOSS_CAP), results[..., 1]
            for axis, values in ((axes[0, column], loss), (axes[1, column], accuracy)):
                axis.plot(lrs, values.mean(axis=1), "o-", color=color, label=name)
                axis.fill_between(
                    lrs, values.min(axis=1), values.max(axis=1), color=color, alpha=0.2
                )
            table.append(results.mean(axis=1))
            good = lrs[accuracy.mean(axis=1) >= GOOD_ACCURACY]
            print(
                f"{name}: lowest mean loss {loss.mean(axis=1).min():.4f}, highest mean accuracy "
                f"{accuracy.mean(axis=1).max():.4f}; mean accuracy >= {GOOD_ACCURACY} for lr "
                + (f"{good.min():.3g} to {good.max():.3g}" if len(good) else "none")
            )
        print(
            f"{family}, mean of {seeds} seeds: final validation loss (inf: a seed diverged) "
            "/ accuracy"
        )
        print(f"{'lr':>10}" + "".join(f"{name:>18}" for name in names))
        for lr, *means in zip(lrs, *table):
            print(f"{lr:>10.3g}" + "".join(f"{loss:>10.4f}/{acc:.4f}" for loss, acc in means))
        axes[0, column].set(
            xscale="log",
            yscale="log",
            ylabel=f"final validation loss (capped at {LOSS_CAP:g})",
            title=f"{family}: {seeds} seeds, {epochs} epochs",
        )
        axes[1, column].set(
            xscale="log", xlabel="learning rate", ylabel="final validation accuracy", ylim=(0, 1)
        )
        for axis in axes[:, column]:
            axis.legend()
            axis.grid(True, which="major", alpha=0.3)

    save_figure(
        figure,
        args.out,
        "lr_robustness.png",
        "scikit-learn digits, MLP 64-128-128-10: Lookahead (k=5, alpha=0.5) against its inner "
        "optimizer\nline: mean over seeds, shaded: min-max; "
        "Lookahead evaluated on its slow weights",
    )


if __name__ == "__main__":
    main()
