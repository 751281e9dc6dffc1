"""Sensitivity to k and alpha: the paper fixes alpha=0.5 and k=5 and varies them one at a time.

Lookahead(SGD) and Lookahead(Adam) at their usual learning rates (0.1 with momentum 0.9, and 1e-3)
train the MLP on scikit-learn's digits for every (k, alpha) of a grid; the heat maps show the mean
final validation loss and accuracy over seeds, on the slow weights. alpha=1 is the inner optimizer
alone, whatever k (the slow update then copies the fast weights exactly).

    python examples/sensitivity.py            # writes examples/sensitivity.png
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from common import final_validation, parse_args, save_figure

# Inner optimizers at their usual learning rates.
INNER = (("SGD", 0.1), ("Adam", 1e-3))
KS = (1, 5, 10, 20)
# alpha=1 is added to every row: it is the inner optimizer alone, whatever k, so it runs once.
ALPHAS = (0.2, 0.35, 0.5, 0.65, 0.8)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    epochs, seeds, ks, alphas = (1, 1, KS[:2], ALPHAS[2:3]) if args.quick else (30, 5, KS, ALPHAS)

    figure, axes = plt.subplots(2, len(INNER), figsize=(6.5 * len(INNER), 8.5), squeeze=False)
    for column, (inner, lr) in enumerate(INNER):
        name = f"Lookahead({inner})"
        alone = [final_validation(inner, lr, seed, epochs) for seed in range(seeds)]
        # results[k, alpha, seed] = (loss, accuracy)
        results = np.array(
            [
                [
                    [
                        final_validation(name, lr, seed, epochs, k=k, alpha=a)
                        for seed in range(seeds)
                    ]
                    for a in alphas
                ]
                + [alone]
                for k in ks
            ]
        )
        mean = results.mean(axis=2)
        labels = [f"{a:g}" for a in alphas] + [f"1 ({inner})"]
        for row, (metric, colors, digits) in enumerate(
            (("validation loss", "viridis", 3), ("validation accuracy", "viridis_r", 4))
        ):
            values = mean[..., row]
            axis = axes[row, column]
            image = axis.imshow(values, cmap=colors, aspect="auto")
            figure.colorbar(image, ax=axis)
            for (i, j), value in np.ndenumerate(values):
                red, green, blue, _ = image.cmap(image.norm(value))
                bright = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
                axis.text(
                    j,
                    i,
                    f"{value:.{digits}f}",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="black" if bright else "white",
                )
            axis.set_xticks(range(len(labels)), labels)
            axis.set_yticks(range(len(ks)), [str(k) for k in ks])
            axis.set(xlabel="alpha", ylabel="k", title=f"{name}, lr={lr:g}: final {metric}")

        print(f"{name}, lr={lr:g}: mean final validation loss / accuracy over {seeds} seeds")
        print("   k \\ alpha " + "".join(f"{label:>15}" for label in labels))
        for k, row_values in zip(ks, mean):
            print(f"{k:>12} " + "".join(f"{loss:>8.4f}/{acc:.4f}" for loss, acc in row_values))

    save_figure(
        figure,
        args.out,
        "sensitivity.png",
        f"scikit-learn digits, MLP 64-128-128-10, {epochs} epochs: mean of {seeds} seeds, "
        "Lookahead evaluated on its slow weights",
    )


if __name__ == "__main__":
    main()
