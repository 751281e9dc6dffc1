"""The lookahead-bench command line: argument errors, a tiny run, its JSON."""

import json

import pytest

from lookahead_cuda.bench.cli import main, parse_args
from lookahead_cuda.bench.presets import PRESETS


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tensors", "3"], "--tensors and --numel go together"),
        (["--tensors", "0", "--numel", "5"], "must be at least 1"),
        (["--reps", "0"], "--reps must be at least 1"),
        (["--alpha", "1.5"], "--alpha must be in (0, 1]"),
        (["--slow-dtype", "float16", "--fast-dtype", "float32"], "unsupported --slow-dtype"),
        (["--preset", "nope"], "invalid choice"),
        (["--device", "nonsense"], "--device"),
        (["--threads", "0"], "--threads must be at least 1"),
    ],
)
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_gpu_only_preset_needs_a_gpu(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--preset", "llama-7b"])
    assert "needs a GPU" in capsys.readouterr().err


def test_presets_have_the_real_models_sizes():
    assert PRESETS["gpt2"].numel == 124_439_808 and len(PRESETS["gpt2"].shapes) == 148
    assert PRESETS["resnet50"].numel == 25_557_032
    assert PRESETS["llama-7b"].numel == 6_738_415_616 and len(PRESETS["llama-7b"].shapes) == 291


@pytest.mark.parametrize("dtypes", [[], ["--fast-dtype", "bfloat16", "--slow-dtype", "float32"]])
def test_tiny_run_writes_table_and_json(tmp_path, capsys, dtypes):
    out = tmp_path / "results.json"
    argv = [
        "--device",
        "cpu",
        "--tensors",
        "3",
        "--numel",
        "1000",
        "--reps",
        "2",
        "--json",
        str(out),
        *dtypes,
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for impl in ("fused", "foreach", "loop", "floor"):
        assert f"custom         {impl}" in table
    report = json.loads(out.read_text())
    assert {"device", "torch", "threads", "results"} <= set(report)
    assert [r["impl"] for r in report["results"]] == ["fused", "foreach", "loop", "floor"]
    keys = {
        "preset",
        "impl",
        "fast_dtype",
        "slow_dtype",
        "numel",
        "tensors",
        "median_ms",
        "gbps",
        "ratio_to_floor",
    }
    for r in report["results"]:
        assert keys <= set(r)
        assert r["numel"] == 3000 and r["tensors"] == 3 and r["median_ms"] > 0


def test_end_to_end_mode(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    argv = [
        "--device",
        "cpu",
        "--e2e",
        "--tensors",
        "4",
        "--numel",
        "5000",
        "--reps",
        "2",
        "--k",
        "2",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    assert "AdamW(fused=True)" in capsys.readouterr().out
    rows = json.loads(out.read_text())["e2e"]
    assert [r["optimizer"] for r in rows] == ["AdamW(foreach=True)", "AdamW(fused=True)"]
    assert all(r["step_ms"] > 0 and r["k"] == 2 for r in rows)
