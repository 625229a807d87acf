"""``python -m distplateau.replay``: its decisions are the scheduler's (and torch's, and
schnetpack's with smoothing) on the same series; its reading (CSV, JSON, TensorBoard events),
table, sweep, plot and errors. The replay of a real 2-rank run's ``metrics.csv`` and TensorBoard
directory is in tests/test_lightning_ranks.py."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from distplateau import DistributedReduceLROnPlateau
from distplateau.replay import main, read_series, replay
from tests.plateau_references import SchnetpackReduceLROnPlateau

SERIES = [round(1.0 / (1 + 0.2 * i) + random.Random(i).uniform(-0.08, 0.08), 6) for i in range(40)]
SETTINGS: list[dict[str, Any]] = [
    {"patience": 3, "factor": 0.5},
    {"patience": 1, "factor": 0.3, "threshold": 0.0, "cooldown": 2},
    {"patience": 0, "threshold": 0.05, "threshold_mode": "abs", "min_lr": 0.01},
    {"patience": 2, "mode": "max"},
]


def _lrs(scheduler: Any, values: list[float]) -> list[float]:
    lrs = []
    for value in values:
        scheduler.step(value)
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
    return lrs


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


@pytest.mark.parametrize("settings", SETTINGS)
def test_replay_takes_torchs_decisions_on_the_same_series(settings: dict[str, Any]) -> None:
    result = replay(SERIES, settings, lr=0.1)
    assert result.lrs == _lrs(ReduceLROnPlateau(_optimizer(), **settings), SERIES)
    assert result.cuts and [i for i, _, _ in result.cuts] == [
        i for i in range(len(SERIES)) if result.lrs[i] < (result.lrs[i - 1] if i else 0.1)]


def test_replay_with_smoothing_stopping_and_warmup_is_the_schedulers_run() -> None:
    settings = {"patience": 2, "factor": 0.5, "smoothing_factor": 0.6, "stop_patience": 6, "warmup": 3}
    result = replay(SERIES, settings, lr=0.1)
    ours = DistributedReduceLROnPlateau(_optimizer(), backend="none", **settings)
    assert result.lrs == _lrs(ours, SERIES)
    schnetpack = SchnetpackReduceLROnPlateau(_optimizer(), patience=2, factor=0.5, smoothing_factor=0.6)
    assert replay(SERIES, {"patience": 2, "factor": 0.5, "smoothing_factor": 0.6}, lr=0.1).lrs == _lrs(
        schnetpack, SERIES)
    stop = replay(SERIES[:5] + [9.0] * 10, {"stop_patience": 4}).stop
    assert stop == 8  # best at index 4; indexes 5..8 are 4 steps without a new best


LIGHTNING_CSV = """epoch,step,val_loss,val_loss/bad_steps,val_loss/best,val_loss/global
0,3,2.5,,,
,3,,0,2.0,2.0
1,7,2.25,,,
,7,,1,2.0,2.0
2,11,2.75,,,
,11,,2,2.0,2.5
"""


def test_read_series_takes_a_column_of_lightnings_metrics_csv_with_its_steps(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(LIGHTNING_CSV)
    assert read_series(path, "val_loss/global") == ([3.0, 7.0, 11.0], [2.0, 2.0, 2.5])
    assert read_series(path, "val_loss") == ([3.0, 7.0, 11.0], [2.5, 2.25, 2.75])
    (tmp_path / "a.json").write_text(json.dumps({"loss": [1, 0.5]}))
    assert read_series(tmp_path / "a.json", "loss") == ([0.0, 1.0], [1.0, 0.5])
    (tmp_path / "b.csv").write_text("loss\n1\n0.5\n")
    assert read_series(tmp_path / "b.csv") == ([0.0, 1.0], [1.0, 0.5])  # the only column


def _write_events(directory: Path, tag: str, steps: list[int], values: list[float]) -> None:
    """TensorBoard event files as torch's (and Lightning's TensorBoardLogger's) writer makes them."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(directory))
    for step, value in zip(steps, values):
        writer.add_scalar(tag, value, global_step=step)
        writer.add_scalar("epoch", step // 4, global_step=step)  # as Lightning logs it: --column may be left out
    writer.close()


def test_tensorboard_events_replay_like_the_same_series_in_csv(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    values = torch.tensor(SERIES, dtype=torch.float32).tolist()  # what an event file holds: float32
    steps = [3 + 4 * i for i in range(len(values))]
    _write_events(tmp_path / "tb", "val_loss/global", steps, values)
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("step,val_loss/global\n" + "".join(f"{s},{v!r}\n" for s, v in zip(steps, values)))
    expected = ([float(s) for s in steps], values)
    assert read_series(csv_path, "val_loss/global") == expected
    assert read_series(tmp_path / "tb", "val_loss/global") == expected  # the directory
    (event_file,) = (tmp_path / "tb").iterdir()
    assert read_series(event_file) == expected  # one file; the only tag besides epoch
    outputs = []
    for path in (csv_path, tmp_path / "tb"):
        assert main([str(path), "--column", "val_loss/global", "--patience", "3", "--factor", "0.5",
                     "--lr", "0.1"]) == 0
        outputs.append(capsys.readouterr().out.splitlines())
    assert outputs[0][1:] == outputs[1][1:]  # all but the line that names the input
    assert outputs[1][0].endswith(f"{len(values)} values, steps 3 to {steps[-1]}, initial lr 0.1")
    cuts = replay(values, {"patience": 3, "factor": 0.5}, lr=0.1).cuts
    assert len(cuts) >= 2 and sum("->" in line for line in outputs[1]) == len(cuts)


def test_cli_prints_the_cuts_and_the_stop_and_a_line_per_swept_combination(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "series.json"
    path.write_text(json.dumps(SERIES))
    assert main([str(path), "--patience", "3", "--factor", "0.5", "--stop_patience", "8", "--lr", "0.1"]) == 0
    out = capsys.readouterr().out.splitlines()
    expected = replay(SERIES, {"patience": 3, "factor": 0.5, "stop_patience": 8}, lr=0.1)
    assert out[1] == "settings: factor=0.5 patience=3 stop_patience=8"
    rows = [line.split() for line in out[3:-1]]
    assert [int(r[0]) - 1 for r in rows if r[-2] == "->"] == [i for i, _, _ in expected.cuts]
    assert [float(r[-1]) for r in rows if r[-2] == "->"] == [after for _, _, after in expected.cuts]
    assert [int(r[0]) - 1 for r in rows if r[5] == "stop"] == [expected.stop]
    assert out[-1] == f"final lr {expected.final_lr:g}"
    assert main([str(path), "--sweep", "patience=1,5", "--sweep", "smoothing-factor=0,0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 4
    for line, (patience, smoothing) in zip(lines, [(1, 0.0), (1, 0.5), (5, 0.0), (5, 0.5)]):
        result = replay(SERIES, {"patience": patience, "smoothing_factor": smoothing})
        assert line.startswith(f"patience={patience} smoothing_factor={smoothing} ")
        assert f"cuts {len(result.cuts):>3}" in line and line.endswith(f"final lr {result.final_lr:g}")


def test_cli_plot_draws_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "metrics.csv"
    path.write_text(LIGHTNING_CSV)
    out = tmp_path / "lr.png"
    assert main([str(path), "--column", "val_loss/global", "--sweep", "patience=0,1", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case", ["no column", "not a number", "empty", "directory", "missing", "sweep",
                                  "setting", "no matplotlib", "empty directory", "unknown tag",
                                  "event files below", "no tensorboard"])
def test_bad_input_is_one_line_and_exit_status_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "metrics.csv"
    good.write_text(LIGHTNING_CSV)
    args = {
        "no column": [str(good), "--column", "val_acc"],
        "not a number": [str(tmp_path / "x.csv"), "--column", "loss"],
        "empty": [str(tmp_path / "empty.csv")],
        "directory": [str(tmp_path)],
        "missing": [str(tmp_path / "nowhere.csv")],
        "sweep": [str(good), "--column", "val_loss", "--sweep", "patients=1,2"],
        "setting": [str(good), "--column", "val_loss", "--factor", "1.5"],
        "no matplotlib": [str(good), "--column", "val_loss", "--plot", str(tmp_path / "x.png")],
        "empty directory": [str(tmp_path / "nothing")],
        "unknown tag": [str(tmp_path / "logs" / "version_0"), "--column", "val_acc"],
        "event files below": [str(tmp_path / "logs"), "--column", "val_loss"],
        "no tensorboard": [str(tmp_path / "logs" / "version_0"), "--column", "val_loss"],
    }[case]
    (tmp_path / "x.csv").write_text("step,loss\n0,1.0\n1,oops\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "nothing").mkdir()
    if case in ("unknown tag", "event files below", "no tensorboard"):
        _write_events(tmp_path / "logs" / "version_0", "val_loss", [0, 1], [1.0, 0.5])
    if case == "no matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    if case == "no tensorboard":
        monkeypatch.setitem(sys.modules, "tensorboard.backend.event_processing.event_accumulator", None)
    assert main(args) == 2
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("error: ")
    assert "Traceback" not in captured.err
    if case == "not a number":
        assert "line 3, column 'loss': 'oops' is not a number" in captured.err
    if case == "empty directory":
        assert "nothing is a directory without TensorBoard event files" in captured.err
    if case == "unknown tag":
        assert captured.err.endswith("no scalar tag 'val_acc'; the tags are: val_loss, epoch\n")
    if case == "event files below":
        assert captured.err.endswith(f"give one of the directories that do: {tmp_path / 'logs' / 'version_0'}\n")
    if case == "no tensorboard":
        assert "needs tensorboard: pip install tensorboard" in captured.err


def test_python_dash_m_runs_it(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(LIGHTNING_CSV)
    done = subprocess.run([sys.executable, "-m", "distplateau.replay", str(path), "--column", "val_loss/global",
                           "--patience", "0", "--factor", "0.5"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "final lr 0.25"  # 2.0; 2.0 and 2.5: bad, > patience 0: a cut each
