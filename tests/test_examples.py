"""Each example runs end to end at a tiny size, and the README shows what the full runs wrote."""

import dataclasses
import importlib
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# example module -> the PNG it writes
OUTPUTS = {
    "lr_robustness": "lr_robustness.png",
    "loss_curves": "loss_curves.png",
    "sensitivity": "sensitivity.png",
    "snoo_lm": "snoo_lm.png",
    "diloco_lm": "diloco_lm.png",
}


@pytest.fixture(autouse=True)
def _examples_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the examples run on one thread


@pytest.mark.parametrize("module", list(OUTPUTS))
def test_example_runs_quick(module, tmp_path, capsys):
    importlib.import_module(module).main(["--quick", "--out", str(tmp_path / "out")])
    png = tmp_path / "out" / OUTPUTS[module]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out  # the numbers the README quotes are printed


def test_diloco_slow_link_quick(capsys):
    """The slow-link benchmark's runner, end to end on a tiny run, where the machine lets it make
    network namespaces (root, iproute2, tc's tbf); and it leaves none behind."""
    slow_link = importlib.import_module("diloco_slow_link")
    reason = slow_link.unavailable()
    if reason is not None:
        pytest.skip(reason)
    rows = slow_link.main(["--quick"])
    printed = capsys.readouterr().out
    if rows is None:
        pytest.skip(printed.strip())
    assert "targets:" in printed
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert f"lhbench-{os.getpid()}-" not in left.stdout
    char_lm, train = importlib.import_module("char_lm"), importlib.import_module("diloco_train")
    weights = 4 * sum(p.numel() for p in char_lm.make_model(train.CONFIG, seed=0).parameters())
    # Read off the interfaces, not computed: each worker of a 2-process ring sends the whole
    # payload of an all-reduce, and headers on top.
    assert rows["none"].bytes_per_step < 1000
    assert weights < rows["diloco"].bytes_per_sync < 1.2 * weights
    assert rows["delayed"].bytes_per_sync < 0.4 * weights


def test_balanced_fragments_hold_every_parameter_once_in_about_equal_bytes():
    char_lm, train = importlib.import_module("char_lm"), importlib.import_module("diloco_train")
    model = char_lm.make_model(dataclasses.replace(train.CONFIG, depth=12), seed=0)
    params = list(model.parameters())
    fragments = train.balanced_fragments(torch.optim.SGD(params, lr=0.1), 4)
    assert sorted(id(p) for f in fragments for p in f) == sorted(id(p) for p in params)
    loads = [sum(p.numel() for p in f) for f in fragments]
    assert max(loads) - min(loads) <= max(p.numel() for p in params)
    assert max(loads) / sum(loads) < 0.252  # contiguous runs of this model: 0.261


def test_readme_shows_every_png_and_the_command_that_writes_them():
    readme = (EXAMPLES / "README.md").read_text()
    shown = set(re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", readme))
    assert shown == set(OUTPUTS.values())
    for png in shown:
        assert (EXAMPLES / png).is_file(), png
    commands = "".join(re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL))
    for module in OUTPUTS:
        assert module in commands, module
