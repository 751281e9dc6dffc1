"""Plans of the syncs (lookahead_cuda/planner.py): made and validated once per change of the
tensors a group holds, and made again when any of those tensors changes under the same object."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import steps_on_sin_gradients

import lookahead_cuda.functional
from lookahead_cuda import Lookahead
from lookahead_cuda.ops import TensorFingerprint

PACKAGE = Path(__file__).resolve().parent.parent / "lookahead_cuda"


def counting_validation(monkeypatch):
    calls = []
    real = lookahead_cuda.functional.check_sync

    def check_sync(*args):
        calls.append(len(args[1]))
        real(*args)

    monkeypatch.setattr(lookahead_cuda.functional, "check_sync", check_sync)
    return calls


def make(k=2, sizes=(5, 7, 3), **settings):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    return params, Lookahead(torch.optim.SGD(params, lr=0.1), k=k, **settings)


@pytest.mark.parametrize("capturable", [False, True])
def test_a_group_is_validated_once_however_many_syncs(monkeypatch, capturable):
    calls = counting_validation(monkeypatch)
    _, opt = make(capturable=capturable)
    steps_on_sin_gradients(opt, 20)  # 10 syncs
    assert calls == [3]
    opt.sync()
    assert calls == [3]


@pytest.mark.parametrize(
    "change",
    [
        lambda p: setattr(p, "data", p.data.double()),
        lambda p: setattr(p, "data", p.data.clone()),
        lambda p: p.data.resize_(9),
        lambda p: torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().clone())),
    ],
    ids=["dtype", "storage", "resize", "swap_tensors"],
)
def test_a_tensor_changed_under_the_same_object_is_planned_and_validated_again(monkeypatch, change):
    calls = counting_validation(monkeypatch)
    params, opt = make()
    steps_on_sin_gradients(opt, 2)
    with torch.no_grad():
        change(params[1])
    if params[1].shape != (7,):  # resized: refused before the inner step, nothing changed
        before = [p.detach().clone() for p in params]
        with pytest.raises(ValueError, match="parameter 1 of param group 0"):
            steps_on_sin_gradients(opt, 2)
        assert all(map(torch.equal, params, before))
        assert calls == [3, 3]
        return
    steps_on_sin_gradients(opt, 2)
    assert calls[0] == 3 and sum(calls[1:]) == 3  # once more, bucket by bucket
    slow = opt.lookahead_state[params[1]]["slow_param"]
    assert slow.dtype == params[1].dtype and torch.equal(slow, params[1])


def test_a_fingerprint_sees_each_kind_of_change():
    tensors = [torch.randn(4), torch.randn(2, 3)]
    fingerprint = TensorFingerprint(tensors)
    assert fingerprint.matches()
    for change in (
        lambda: tensors[0].data.resize_(5),
        lambda: setattr(tensors[1], "data", tensors[1].data.t()),  # strides
        lambda: setattr(tensors[1], "data", tensors[1].data.double()),
    ):
        fingerprint = TensorFingerprint(tensors)
        change()
        assert not fingerprint.matches()
    tensors[0].add_(1)  # values are not what a fingerprint records
    assert TensorFingerprint(tensors).matches()


def test_no_import_circle_in_the_package():
    # Type-only imports count: a module's layer must not depend on the modules above it.
    modules = {path.stem: path for path in PACKAGE.glob("*.py")}
    imports = {}
    for module, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] == "lookahead_cuda" and len(parts) > 1:
                    found.add(parts[1])
                elif node.module == "lookahead_cuda":
                    found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {
                    alias.name.split(".")[1]
                    for alias in node.names
                    if alias.name.startswith("lookahead_cuda.")
                }
        imports[module] = (found & set(modules)) - {module}

    def reaches(start, target, seen):
        for module in imports[start]:
            if module == target or (
                module not in seen and reaches(module, target, seen | {module})
            ):
                return True
        return False

    circles = [module for module in imports if reaches(module, module, set())]
    assert not circles, f"modules on an import circle: {sorted(circles)}"
