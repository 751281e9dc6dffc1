"""Validation loss during training: each inner optimizer alone against it inside Lookahead.

For the Lookahead runs both weight sets are evaluated after every step: the fast weights (the
model's parameters, which the inner optimizer moves) and the slow weights (which move only every k
steps, when the fast weights restart from them). The lower rows zoom in on a few syncs: the
paper's "k steps forward, 1 step back".

    python examples/loss_curves.py            # writes examples/loss_curves.png
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
from common import evaluate, load_data, make_model, make_optimizer, parse_args, save_figure, train

from lookahead_cuda import Lookahead

# (baseline, with Lookahead, learning rate for both): SGD's usual 0.1, the top of its good range in
# lr_robustness.png, and a few times the default 1e-3 for Adam and RAdam, where they are noisy.
PAIRS = (
    ("SGD", "Lookahead(SGD)", 0.1),
    ("Adam", "Lookahead(Adam)", 3e-3),
    ("RAdam", "Ranger", 1e-2),
)
# The same two windows for every pair: while the loss falls fast, and once it has levelled off.
ZOOM_STEPS = 30
ZOOMS = ((20, "steps 20-50, loss falling"), (200, "steps 200-230, loss levelled off"))


@dataclass
class Curves:
    """Validation loss after every step (index 0: before training), over seeds: ``fast[seed]``
    of the model's weights, ``slow[seed]`` of Lookahead's slow weights (None without Lookahead)."""

    fast: np.ndarray
    slow: np.ndarray | None
    k: int | None


def one_seed(name: str, lr: float, seed: int, epochs: int) -> Curves:
    data = load_data()
    model = make_model(seed)
    optimizer = make_optimizer(name, model.parameters(), lr)
    lookahead = optimizer if isinstance(optimizer, Lookahead) else None
    fast: list[float] = []
    slow: list[float] = []

    def record() -> None:
        fast.append(evaluate(model, data.x_val, data.y_val)[0])
        if lookahead is not None:
            with lookahead.slow_weights():
                slow.append(evaluate(model, data.x_val, data.y_val)[0])

    record()
    train(model, optimizer, data, epochs, seed, after_step=record)
    return Curves(
        np.array([fast]),
        None if lookahead is None else np.array([slow]),
        None if lookahead is None else lookahead.k,
    )


def curves(name: str, lr: float, seeds: int, epochs: int) -> Curves:
    runs = [one_seed(name, lr, seed, epochs) for seed in range(seeds)]
    slow = [run.slow for run in runs if run.slow is not None]
    return Curves(
        np.concatenate([run.fast for run in runs]),
        np.concatenate(slow) if slow else None,
        runs[0].k,
    )


def plot_zoom(
    axis: plt.Axes, baseline: str, alone: Curves, paired: Curves, first: int, title: str
) -> None:
    """Seed 0 over ZOOM_STEPS steps from ``first``, with the syncs marked."""
    assert paired.slow is not None and paired.k is not None
    window = slice(first, first + ZOOM_STEPS + 1)
    steps = np.arange(first, first + ZOOM_STEPS + 1)
    axis.plot(steps, alone.fast[0, window], color="tab:gray", lw=1, label=baseline)
    axis.plot(steps, paired.fast[0, window], ".-", color="tab:orange", lw=1, label="fast weights")
    axis.step(steps, paired.slow[0, window], where="post", color="tab:blue", label="slow weights")
    for sync in steps[steps % paired.k == 0]:
        axis.axvline(sync, color="tab:blue", lw=0.5, ls=":")
    axis.set(xlabel="step", ylabel="validation loss", title=f"{title}; syncs (k={paired.k}) dotted")
    axis.legend(fontsize=8)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    epochs, seeds = (2, 1) if args.quick else (30, 3)  # quick: still longer than a zoom

    figure, axes = plt.subplots(3, len(PAIRS), figsize=(5.5 * len(PAIRS), 12))
    for column, (baseline, lookahead, lr) in enumerate(PAIRS):
        alone, paired = curves(baseline, lr, seeds, epochs), curves(lookahead, lr, seeds, epochs)
        assert paired.slow is not None
        series = {
            baseline: alone.fast,
            f"{lookahead}: fast weights": paired.fast,
            f"{lookahead}: slow weights": paired.slow,
        }
        top = axes[0, column]
        for (label, values), color in zip(series.items(), ("tab:gray", "tab:orange", "tab:blue")):
            steps = np.arange(values.shape[1])
            top.plot(steps, values.mean(axis=0), color=color, lw=1, label=label)
            top.fill_between(steps, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2)
        top.set(yscale="log", xlabel="step", ylabel="validation loss")
        top.set_title(f"{baseline} vs {lookahead}, lr={lr:g}")
        top.legend(fontsize=8)
        print(
            f"{baseline:>5} vs {lookahead:<15} lr={lr:<6g} final validation loss "
            + ", ".join(f"{label} {values[:, -1].mean():.4f}" for label, values in series.items())
        )

        last = alone.fast.shape[1] - 1 - ZOOM_STEPS
        for row, (first, title) in enumerate(ZOOMS, start=1):
            plot_zoom(axes[row, column], baseline, alone, paired, min(first, last), title)

    save_figure(
        figure,
        args.out,
        "loss_curves.png",
        "scikit-learn digits, MLP 64-128-128-10, batch 64. Top: mean and min-max of "
        f"{seeds} seeds; below: seed 0 zoomed in",
    )


if __name__ == "__main__":
    main()
