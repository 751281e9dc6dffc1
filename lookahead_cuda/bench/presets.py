"""Workloads for the benchmark: the parameter shapes of real models (no weights needed)."""

from __future__ import annotations

from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    shapes: tuple[Shape, ...]
    gpu_only: bool = False

    @property
    def numel(self) -> int:
        total = 0
        for shape in self.shapes:
            count = 1
            for size in shape:
                count *= size
            total += count
        return total


def _resnet50() -> list[Shape]:
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for blocks, width in ((3, 64), (4, 128), (6, 256), (3, 512)):
        for block in range(blocks):
            out_channels = width * 4
            shapes += [(width, in_channels, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out_channels, width, 1, 1), (out_channels,), (out_channels,)]
            if block == 0:  # projection shortcut
                shapes += [(out_channels, in_channels, 1, 1), (out_channels,), (out_channels,)]
            in_channels = out_channels
    return [*shapes, (1000, 2048), (1000,)]


def _gpt2(
    layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024
) -> list[Shape]:
    shapes: list[Shape] = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,)]
        shapes += [
            (width,),
            (width,),
            (width, 4 * width),
            (4 * width,),
            (4 * width, width),
            (width,),
        ]
    return [*shapes, (width,), (width,)]


def _llama_layer(width: int = 4096, hidden: int = 11008) -> list[Shape]:
    attention = [(width, width)] * 4
    mlp = [(hidden, width), (hidden, width), (width, hidden)]
    return [*attention, *mlp, (width,), (width,)]


def _llama(layers: int = 32, width: int = 4096, vocab: int = 32000) -> list[Shape]:
    return [(vocab, width), *(_llama_layer(width) * layers), (width,), (vocab, width)]


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("resnet50", "ResNet-50 (25.6M parameters, 161 tensors)", tuple(_resnet50())),
        Preset("gpt2", "GPT-2 small (124M parameters, 148 tensors)", tuple(_gpt2())),
        Preset(
            "llama-7b-layer", "one LLaMA-7B decoder layer (202M, 9 tensors)", tuple(_llama_layer())
        ),
        Preset(
            "llama-7b", "LLaMA-7B (6.7B parameters, 291 tensors)", tuple(_llama()), gpu_only=True
        ),
        Preset("many-small", "3000 tensors of 64x64 (12.3M)", ((64, 64),) * 3000),
    )
}


def custom_preset(tensors: int, numel: int) -> Preset:
    return Preset("custom", f"{tensors} tensors of {numel} elements", ((numel,),) * tensors)
