"""AdamW vs Lookahead(AdamW) vs SNOO(AdamW) on a byte-level GPT trained on Python's stdlib source.

SNOO (Kallusky et al., 2025, arXiv 2510.15830) is Lookahead whose sync is a Nesterov-momentum step
on the pseudo-gradient ``slow - fast`` (``Lookahead(..., momentum=0.9, nesterov=True)``, with
``alpha`` the outer learning rate). All runs take the same number of steps on the same batches,
with the same warmup-cosine schedule of the (inner) learning rate. Tuning, once, on seed 0: AdamW's
learning rate over a small grid; the best is then the inner rate of Lookahead (the paper's k=5,
alpha=0.5, not tuned) and of SNOO (k and momentum as DiLoCo's outer Nesterov step, a small grid of
outer learning rates). Seed 1 (another initialization and batch order) reruns the three chosen
settings untouched, to size the seed-to-seed spread. Lookahead and SNOO are evaluated on their slow
weights.

    python examples/snoo_lm.py            # writes examples/snoo_lm.png
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
from char_lm import (
    Batch,
    Corpus,
    Curve,
    GPTConfig,
    adamw,
    batches,
    load_corpus,
    make_model,
    train,
    validation_batches,
    warmup_cosine,
)
from common import parse_args, save_figure
from matplotlib.figure import Figure

from lookahead_cuda import Lookahead

# Small enough for ~50 ms a step on one CPU thread: 137k parameters, 16 x 64 bytes a batch.
MODEL = GPTConfig(context=64, width=64, depth=2, heads=4)
BATCH_SIZE = 16
# Batches of 64 windows of the held-out files; 8 of them are 32 KiB of validation text.
VALIDATION_WINDOWS = 64
LOOKAHEAD = {"k": 5, "alpha": 0.5}  # the Lookahead paper's defaults
SNOO_MOMENTUM = 0.9  # DiLoCo's outer Nesterov momentum, which SNOO keeps


@dataclass(frozen=True)
class Plan:
    steps: int
    eval_every: int
    seeds: int
    validation_count: int
    adamw_lrs: tuple[float, ...]
    snoo_k: int
    snoo_outer_lrs: tuple[float, ...]


FULL = Plan(
    steps=600,
    eval_every=50,
    seeds=2,
    validation_count=8,
    adamw_lrs=(3e-3, 1e-2, 3e-2),
    snoo_k=10,
    snoo_outer_lrs=(0.1, 0.3, 0.7),  # 0.7 is DiLoCo's
)
QUICK = Plan(
    steps=12,
    eval_every=6,
    seeds=1,
    validation_count=1,
    adamw_lrs=(3e-3, 1e-2),
    snoo_k=3,
    snoo_outer_lrs=(0.7,),
)


def run(
    corpus: Corpus,
    validation: Sequence[Batch],
    plan: Plan,
    seed: int,
    lr: float,
    outer: dict[str, float] | None,
) -> Curve:
    """One training run: AdamW at ``lr``, inside Lookahead with ``outer``'s settings if given.
    ``seed`` fixes both the initialization and the batch order."""
    model = make_model(MODEL, seed)
    inner = adamw(model, lr)
    optimizer = inner if outer is None else Lookahead(inner, **outer)
    return train(
        model,
        optimizer,
        plan.steps,
        batches(corpus.train, BATCH_SIZE, MODEL.context, seed),
        validation,
        plan.eval_every,
        warmup_cosine(plan.steps, warmup=plan.steps // 10),
    )


def _final(curve: Curve) -> float:
    return curve.validation[-1]


def snoo(plan: Plan, outer_lr: float) -> dict[str, float]:
    return {"k": plan.snoo_k, "alpha": outer_lr, "momentum": SNOO_MOMENTUM, "nesterov": True}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    corpus = load_corpus()
    validation = validation_batches(
        corpus.validation, VALIDATION_WINDOWS, MODEL.context, plan.validation_count
    )
    print(
        f"corpus: {len(corpus.train):,} training bytes ({corpus.train_files} files), "
        f"{len(corpus.validation):,} validation bytes ({corpus.validation_files} files)"
    )

    sweep = {lr: run(corpus, validation, plan, 0, lr, None) for lr in plan.adamw_lrs}
    lr = min(sweep, key=lambda x: _final(sweep[x]))
    for x, curve in sweep.items():
        print(f"tuning, seed 0: AdamW lr={x:g}: final validation loss {_final(curve):.4f}")
    outer_sweep = {
        outer_lr: run(corpus, validation, plan, 0, lr, snoo(plan, outer_lr))
        for outer_lr in plan.snoo_outer_lrs
    }
    outer_lr = min(outer_sweep, key=lambda x: _final(outer_sweep[x]))
    for x, curve in outer_sweep.items():
        print(f"tuning, seed 0: SNOO outer lr={x:g}: final validation loss {_final(curve):.4f}")

    labels = {
        "AdamW": f"AdamW lr={lr:g}",
        "Lookahead": f"Lookahead(AdamW) k={LOOKAHEAD['k']} alpha={LOOKAHEAD['alpha']:g}",
        "SNOO": f"SNOO(AdamW) k={plan.snoo_k} outer lr={outer_lr:g} Nesterov {SNOO_MOMENTUM:g}",
    }
    settings = {"AdamW": None, "Lookahead": LOOKAHEAD, "SNOO": snoo(plan, outer_lr)}
    # curves[method][seed]; seed 0's AdamW and SNOO runs are the tuning runs already made.
    curves = {
        "AdamW": [sweep[lr]],
        "Lookahead": [run(corpus, validation, plan, 0, lr, LOOKAHEAD)],
        "SNOO": [outer_sweep[outer_lr]],
    }
    for seed in range(1, plan.seeds):
        for method, outer in settings.items():
            curves[method].append(run(corpus, validation, plan, seed, lr, outer))

    for method, runs in curves.items():
        for seed, curve in enumerate(runs):
            points = " ".join(f"{s}:{v:.4f}" for s, v in zip(curve.steps, curve.validation))
            print(f"{labels[method]}, seed {seed} ({curve.seconds:.1f} s of steps): {points}")
    print(
        "final validation loss (nats per byte): "
        + ", ".join(
            f"{method} " + " / ".join(f"{_final(c):.4f}" for c in runs)
            for method, runs in curves.items()
        )
        + f" (seeds {' / '.join(map(str, range(plan.seeds)))})"
    )
    print(f"wall time {time.perf_counter() - started:.0f} s")

    sweeps = {"AdamW learning rate": sweep, f"SNOO outer lr (inner lr {lr:g})": outer_sweep}
    save_figure(
        plot(curves, labels, sweeps),
        args.out,
        "snoo_lm.png",
        f"Byte-level GPT ({MODEL.depth} blocks, width {MODEL.width}, context {MODEL.context}) on "
        f"CPython's stdlib source, {plan.steps} steps of {BATCH_SIZE}x{MODEL.context} bytes; "
        "Lookahead and SNOO: validation loss of the slow weights",
    )


def plot(
    curves: dict[str, list[Curve]],
    labels: dict[str, str],
    sweeps: dict[str, dict[float, Curve]],
) -> Figure:
    """The curves of every method and seed, whole and zoomed on the second half (where the methods
    are a few hundredths apart), and the final losses of each tuning sweep."""
    figure, axes = plt.subplots(
        1,
        2 + len(sweeps),
        figsize=(20, 5.5),
        gridspec_kw={"width_ratios": [2, 2] + [1] * len(sweeps)},
    )
    whole, tail = axes[:2]
    colors = {"AdamW": "tab:gray", "Lookahead": "tab:blue", "SNOO": "tab:red"}
    for method, runs in curves.items():
        for seed, curve in enumerate(runs):
            for axis in (whole, tail):
                axis.plot(
                    curve.steps,
                    curve.validation,
                    color=colors[method],
                    ls="-" if seed == 0 else "--",
                    marker=".",
                    label=f"{labels[method]}, seed {seed}",
                )
    whole.set(xlabel="step", ylabel="validation loss (nats per byte)", title="whole run")
    last = max(curve.steps[-1] for runs in curves.values() for curve in runs)
    tail_values = [
        value
        for runs in curves.values()
        for curve in runs
        for step, value in zip(curve.steps, curve.validation)
        if step >= last // 2
    ]
    tail.set(
        xlabel="step",
        xlim=(last // 2, last),
        ylim=(min(tail_values) - 0.01, max(tail_values) + 0.01),
        title="second half, zoomed",
    )
    tail.legend(fontsize=7)
    for axis, (name, sweep) in zip(axes[2:], sweeps.items()):
        axis.plot(list(sweep), [curve.validation[-1] for curve in sweep.values()], "o-")
        axis.set(xscale="log", xlabel=name, ylabel="final validation loss", title="tuning, seed 0")
        axis.set_xticks(list(sweep), [f"{x:g}" for x in sweep])
        axis.minorticks_off()
    return figure


if __name__ == "__main__":
    main()
