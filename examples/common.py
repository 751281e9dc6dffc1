"""What the examples share: the digits data, a small MLP, the optimizers compared, one run."""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional

from lookahead_cuda import Lookahead, Ranger

matplotlib.use("Agg")  # files only: the examples run on machines without a display

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

EXAMPLES = Path(__file__).resolve().parent
BATCH_SIZE = 64
VALIDATION_SHARE = 0.3


@dataclass(frozen=True)
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


@functools.lru_cache(maxsize=1)
def load_data() -> Data:
    """scikit-learn's handwritten digits (1797 8x8 images, 10 classes; shipped inside the package,
    nothing is downloaded), split 70/30 stratified and standardized with the training statistics."""
    digits = load_digits()
    x_train, x_val, y_train, y_val = train_test_split(
        digits.data,
        digits.target,
        test_size=VALIDATION_SHARE,
        stratify=digits.target,
        random_state=0,
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0  # border pixels that are blank in every training image
    return Data(
        torch.as_tensor((x_train - mean) / std, dtype=torch.float32),
        torch.as_tensor(y_train, dtype=torch.long),
        torch.as_tensor((x_val - mean) / std, dtype=torch.float32),
        torch.as_tensor(y_val, dtype=torch.long),
    )


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


# The inner optimizers, as the paper uses them (SGD with momentum 0.9, Adam with torch's defaults);
# RAdam gets Ranger's betas so that RAdam vs Ranger isolates Lookahead and gradient centralization.
INNER: dict[str, Callable[[Iterable[torch.Tensor], float], torch.optim.Optimizer]] = {
    "SGD": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "Adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "RAdam": lambda params, lr: torch.optim.RAdam(params, lr=lr, betas=(0.95, 0.999)),
}


def make_optimizer(
    name: str, params: Iterable[torch.Tensor], lr: float, k: int = 5, alpha: float = 0.5
) -> torch.optim.Optimizer:
    """``name`` is an inner optimizer ("SGD", "Adam", "RAdam"), "Lookahead(<inner>)" with ``k``
    and ``alpha``, or "Ranger" (its own defaults: k=6, alpha=0.5, gradient centralization)."""
    if name == "Ranger":
        return Ranger(params, lr=lr)
    if name.startswith("Lookahead(") and name.endswith(")"):
        return Lookahead(INNER[name[len("Lookahead(") : -1]](params, lr), k=k, alpha=alpha)
    return INNER[name](params, lr)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Cross-entropy and accuracy; a diverged model gives a loss of inf, not nan."""
    with torch.no_grad():
        logits = model(x)
        loss = functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return (loss if math.isfinite(loss) else math.inf), accuracy


@contextlib.contextmanager
def evaluated_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Lookahead is evaluated on its slow weights, as its authors recommend; others as they are."""
    if isinstance(optimizer, Lookahead):
        with optimizer.slow_weights():
            yield
    else:
        yield


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Data,
    epochs: int,
    seed: int,
    after_step: Callable[[], None] | None = None,
) -> None:
    """Minibatch training on cross-entropy; the batch order depends on ``seed`` only."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(data.y_train), generator=generator).split(BATCH_SIZE):
            optimizer.zero_grad()
            functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
            optimizer.step()
            if after_step is not None:
                after_step()


def final_validation(
    name: str, lr: float, seed: int, epochs: int, k: int = 5, alpha: float = 0.5
) -> tuple[float, float]:
    """Train a fresh model with optimizer ``name``; its validation loss and accuracy at the end."""
    data = load_data()
    model = make_model(seed)
    optimizer = make_optimizer(name, model.parameters(), lr, k=k, alpha=alpha)
    train(model, optimizer, data, epochs, seed)
    with evaluated_weights(optimizer):
        return evaluate(model, data.x_val, data.y_val)


def parse_args(description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="a tiny run, to check that the example works"
    )
    parser.add_argument(
        "--out", type=Path, default=EXAMPLES, help="folder for the PNG (default: examples/)"
    )
    args = parser.parse_args(argv)
    # Matrices this small run faster on one thread than on several (13x on the 2-core machine),
    # and one thread keeps the results the same from run to run.
    torch.set_num_threads(1)
    return args


def save_figure(figure: Figure, out: Path, name: str, title: str) -> None:
    """Title the figure, write it as out/name (creating out), and close it."""
    figure.suptitle(title)
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    figure.savefig(out / name, dpi=100)
    plt.close(figure)
