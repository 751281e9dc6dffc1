"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(EXAMPLES[index], f"README example {index}", "exec"), {})


def test_quick_start_shows_slow_and_fast_weights_apart_and_writes_nothing(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    quick_start = EXAMPLES[0]
    assert "slow_weights()" in quick_start
    exec(compile(quick_start, "README quick start", "exec"), {})
    printed = capsys.readouterr().out
    fast, slow = (float(x) for x in re.findall(r"weights (\d+\.\d+)", printed))
    assert fast != slow  # it stops mid-cycle, so the two evaluations differ
    assert not any(tmp_path.iterdir())
