"""A byte-level language model on the Python standard library's own source, for optimizer examples.

Everything here ships with Python, so nothing is downloaded: the corpus is the interpreter's
top-level ``*.py`` files, and the tokenizer is the identity on bytes (256 symbols). The pieces are
plain functions and classes without module state, so that several processes (data-parallel or
DiLoCo workers) can each build their own model, sampler and optimizer from the same seeds.

    from char_lm import GPTConfig, load_corpus, make_model, batches, validation_batches, train
"""

from __future__ import annotations

import math
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

from lookahead_cuda import Lookahead

VOCAB_SIZE = 256  # bytes
# Every VALIDATION_EVERY-th file (in sorted order) is held out whole, so validation text is never
# a continuation of a training file and the split does not depend on file sizes.
VALIDATION_EVERY = 10

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Corpus:
    """Bytes as uint8 tensors (int64 would be 8x the memory for the same tokens)."""

    train: torch.Tensor
    validation: torch.Tensor
    train_files: int
    validation_files: int


def stdlib_files() -> list[Path]:
    """The top-level modules of this interpreter's standard library, sorted by name. Subpackages
    are left out because the stdlib folder also holds site-packages, whose content varies."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def encode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def decode(tokens: torch.Tensor) -> str:
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def load_corpus(files: Sequence[Path] | None = None) -> Corpus:
    """Concatenate ``files`` (default: :func:`stdlib_files`) and split them by file: several MB
    with CPython 3.11, the same bytes on every run of one Python version."""
    paths = stdlib_files() if files is None else list(files)
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    for index, path in enumerate(paths):
        parts[index % VALIDATION_EVERY == VALIDATION_EVERY - 1].append(path.read_bytes())

    def joined(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)

    return Corpus(joined(parts[False]), joined(parts[True]), len(parts[False]), len(parts[True]))


def batches(tokens: torch.Tensor, batch_size: int, context: int, seed: int) -> Iterator[Batch]:
    """Endless random windows of ``context + 1`` bytes (inputs and next-byte targets), in an order
    fixed by ``seed`` alone: two runs with one seed see the same batches."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(context + 1)
    while True:
        starts = torch.randint(len(tokens) - context, (batch_size, 1), generator=generator)
        window = tokens[starts + offsets].long()
        yield window[:, :-1], window[:, 1:]


def validation_batches(
    tokens: torch.Tensor, batch_size: int, context: int, count: int
) -> list[Batch]:
    """``count`` batches of windows spread evenly over the validation text, the same every call,
    so that every evaluation of every run measures the same bytes."""
    starts = torch.linspace(0, len(tokens) - context - 1, batch_size * count).long()
    window = tokens[starts[:, None] + torch.arange(context + 1)].long()
    return [(w[:, :-1], w[:, 1:]) for w in window.split(batch_size)]


@dataclass(frozen=True)
class GPTConfig:
    context: int = 128
    width: int = 128
    depth: int = 4
    heads: int = 4


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP, each with a residual."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(config.width)
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)
        self.norm2 = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(
            nn.Linear(config.width, 4 * config.width),
            nn.GELU(),
            nn.Linear(4 * config.width, config.width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (
            t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
            for t in self.qkv(self.norm1(x)).chunk(3, dim=-1)
        )
        attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, config.width)
        self.position = nn.Parameter(torch.zeros(config.context, config.width))
        self.blocks = nn.Sequential(*(Block(config) for _ in range(config.depth)))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, VOCAB_SIZE, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # GPT-2's scaling: the residual stream's variance then does not grow with depth.
        for block in self.blocks:
            for output in (block.proj, block.mlp[-1]):
                nn.init.normal_(output.weight, std=0.02 / math.sqrt(2 * config.depth))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))


def make_model(config: GPTConfig, seed: int) -> GPT:
    """A GPT initialized from ``seed``, without touching the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(config)


def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-byte cross-entropy, in nats."""
    x, y = batch
    return functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def adamw(
    model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    """AdamW as GPTs are usually trained: weight decay on the weight matrices only; biases, norms'
    gains and the position table are not decayed."""
    decayed = [p for name, p in model.named_parameters() if p.dim() >= 2 and name != "position"]
    ids = {id(p) for p in decayed}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def warmup_cosine(steps: int, warmup: int, floor: float = 0.1) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear warmup, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def evaluate(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean validation loss over ``batches``; the model is left in training mode."""
    model.eval()
    with torch.no_grad():
        total = sum(loss(model, batch).item() for batch in batches)
    model.train()
    return total / len(batches)


@dataclass
class Curve:
    """Validation loss at ``steps`` (0: before training), and the training wall time: in all, and
    of each step."""

    steps: list[int]
    validation: list[float]
    seconds: float
    step_seconds: list[float]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    data: Iterator[Batch],
    validation: Sequence[Batch],
    eval_every: int,
    schedule: Callable[[int], float] | None = None,
) -> Curve:
    """``steps`` optimizer steps on batches from ``data``, the validation loss every ``eval_every``
    steps and at the end. Lookahead (SNOO included) is evaluated on its slow weights: they are
    the model it returns, and what the SNOO paper evaluates. ``schedule`` scales every group's
    learning rate per step (the inner rate, for Lookahead)."""
    scheduler = None if schedule is None else torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def validate() -> float:
        if isinstance(optimizer, Lookahead):
            with optimizer.slow_weights():
                return evaluate(model, validation)
        return evaluate(model, validation)

    curve = Curve([0], [validate()], 0.0, [])
    for step in range(1, steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss(model, next(data)).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        curve.step_seconds.append(time.perf_counter() - started)
        if step % eval_every == 0 or step == steps:
            curve.steps.append(step)
            curve.validation.append(validate())
    curve.seconds = sum(curve.step_seconds)
    return curve
