"""Regenerate ``lr_per_rank.png``: learning rate per rank over epochs, from a real 2-rank run.

The training is the demo's (``examples/horovod_demo.py:train``): two identical linear
models trained side by side under Horovod with gradient averaging, uneven validation
shards (192 and 64 samples) and a NaN validation loss on rank 1 at epoch 5; one model is
scheduled by plain ``ReduceLROnPlateau`` on each rank's local loss, the other by
``DistributedReduceLROnPlateau`` with the local sample count as weight.

Needs Horovod (``python -m distplateau.install_horovod``) and matplotlib
(``pip install ".[docs]"``). From the repository root::

    python docs/figures/make_lr_per_rank.py            # about 20 s on 2 cores

It starts ``horovodrun -np 2 --gloo`` on itself; the ranks write every rank's history to a
JSON file, then this process draws the figure from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
EPOCHS = 12
NAN_EPOCH = 5


def run_ranks(out: Path) -> None:
    """On each rank under horovodrun: train, then rank 0 writes every rank's history."""
    sys.path.insert(0, str(ROOT))
    import horovod.torch as hvd

    from examples.horovod_demo import VAL_SAMPLES, train

    hvd.init()
    history = train(EPOCHS, NAN_EPOCH)
    everyone = hvd.allgather_object(history)
    if hvd.rank() == 0:
        out.write_text(json.dumps({"val_samples": VAL_SAMPLES[: hvd.size()], "ranks": everyone}))
    hvd.shutdown()


def launch(out: Path, timeout: float) -> None:
    horovodrun = shutil.which("horovodrun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if horovodrun is None:
        raise SystemExit("horovodrun not found: run `python -m distplateau.install_horovod` first")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", "--gloo-timeout-seconds", "60",
           sys.executable, __file__, "--ranks", str(out)]
    subprocess.run(cmd, env=env, check=True, timeout=timeout)


def draw(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = data["ranks"]
    samples = data["val_samples"]
    epochs = list(range(1, len(ranks[0]["plain"]) + 1))
    # one panel above the other and 11-pt text: shown 560 px wide (docs/index.md), about 360 px on a
    # phone, the text stays readable
    plt.rcParams["font.size"] = 11
    fig, axes = plt.subplots(2, 1, figsize=(5.6, 7.2), sharex=True)
    styles = [dict(color="tab:blue", linewidth=3), dict(color="tab:orange", linewidth=1.5, linestyle="--")]
    markers = ["o", "s"]
    titles = {"plain": "torch ReduceLROnPlateau on each rank",
              "distplateau": "DistributedReduceLROnPlateau"}
    lrs = sorted({lr for h in ranks for name in titles for lr in h[name]}, reverse=True)
    for ax, name in zip(axes, ("plain", "distplateau")):
        for rank, history in enumerate(ranks):
            lr = history[name]
            # each epoch's learning rate holds from the start of the epoch to the start of the next
            ax.step([e - 0.5 for e in epochs] + [epochs[-1] + 0.5], lr + [lr[-1]], where="post",
                    label=f"rank {rank} ({samples[rank]} val samples)", **styles[rank % 2])
            ax.plot(epochs, lr, linestyle="none", marker=markers[rank % 2],
                    markersize=6 if rank % 2 == 0 else 3.5, color=styles[rank % 2]["color"])
        ax.axvspan(NAN_EPOCH - 0.5, NAN_EPOCH + 0.5, color="tab:red", alpha=0.08, linewidth=0)
        ax.text(NAN_EPOCH, lrs[0] * 0.9, "NaN val\nloss on\nrank 1", ha="center", va="top",
                fontsize=10, color="tab:red")
        same = all(h[name] == ranks[0][name] for h in ranks)
        verdict = "ranks diverge" if not same else "one learning rate on every rank"
        ax.set_title(f"{titles[name]}:\n{verdict}", fontsize=12, color="tab:red" if not same else "tab:green")
        ax.set_ylabel("learning rate")
        ax.set_yscale("log")
        ax.set_yticks(lrs, [f"{lr:g}" for lr in lrs])
        ax.minorticks_off()
        ax.set_ylim(lrs[-1] * 0.8, lrs[0] * 1.15)
        ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        ax.set_xticks(epochs)
        ax.grid(True, axis="y", alpha=0.3)
    axes[1].set_xlabel("epoch")
    fig.suptitle("Learning rate per rank: one model, 2 Horovod ranks,\nuneven validation shards", fontsize=13)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(png, dpi=200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=Path, help=argparse.SUPPRESS)  # set by launch() for the ranks
    parser.add_argument("--out", type=Path, default=HERE / "lr_per_rank.png")
    parser.add_argument("--data", type=Path, default=HERE / "lr_per_rank.json",
                        help="where to keep the run's per-rank history (committed next to the PNG)")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    if args.ranks is not None:
        run_ranks(args.ranks)
        return
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "history.json"
        launch(raw, args.timeout)
        data = json.loads(raw.read_text())
    args.data.write_text(json.dumps(data, indent=1) + "\n")
    draw(data, args.out)
    for name in ("plain", "distplateau"):
        print(name, [h[name] for h in data["ranks"]])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
