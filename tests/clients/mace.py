"""MACE (``mace-torch``, atomistic ML): ``mace_run_train --distributed --launcher torchrun`` on 2 CPU ranks.

What MACE does with the metric (mace-torch 0.3.16): ``mace/tools/train.py`` ``train()`` steps the
scheduler at the top of every epoch after the first, ``lr_scheduler.step(metrics=valid_loss)``,
on the previous epoch's validation loss. That loss comes from ``evaluate()``, which accumulates
it in ``MACELoss``, a torchmetrics ``Metric`` whose states (``total_loss``, ``num_data``) are
``dist_reduce_fx="sum"``: ``compute()`` all-gathers them (``sync_on_compute`` defaults to True),
so every rank gets the same global loss, ``sum(loss * graphs) / sum(graphs)`` over all ranks'
validation shards. MACE therefore already synchronises the metric, weighted by graphs: torch's
class does not diverge here (BASELINE = "synced"), and ours, called without a weight, sees the same
value on every rank and steps on it exactly as torch's class does, at the cost of one collective.

How the scheduler is built (``mace/tools/scripts_utils.py``, class ``LRScheduler``): a wrapper that
builds ``torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer=..., factor=args.lr_factor,
patience=args.scheduler_patience)`` inside itself, looked up on torch's module at construction,
and forwards ``step(metrics=metrics, epoch=epoch)`` (``epoch=None``) and, through ``__getattr__``,
``state_dict``/``load_state_dict`` to it. There is no scheduler-class argument and no name of
MACE's own to patch, so the seam is the user's one-line patch of torch's module attribute before
``run_train`` builds the scheduler::

    torch.optim.lr_scheduler.ReduceLROnPlateau = DistributedReduceLROnPlateau

Keyword construction (``optimizer=``) and ``step(metrics=..., epoch=None)`` both fit ours.

Two adaptations that have nothing to do with the scheduler, because MACE 0.3.16's distributed path
is written for CUDA/XPU: ``init_distributed`` (``mace/tools/distributed_tools.py``) opens the process
group only for ``--device cuda`` (nccl) or ``xpu`` (ccl), so the case opens a gloo group first (MACE
skips its own when one is open); and ``run()`` wraps the model in ``DDP(model, device_ids=[local_rank])``,
which torch refuses for a CPU module, so ``mace.cli.run_train.DDP`` is replaced by one that drops
``device_ids`` (what upstream MACE's develop branch does for non-CUDA devices, PR #1617).

Resume: MACE's ``--restart_latest`` loads ``CheckpointState(model, optimizer, lr_scheduler)``
(``mace/tools/checkpoint.py``); the scheduler's ``state_dict`` round-trips ours. But the checkpoint
of epoch ``e`` is written after training epoch ``e``, and the restart starts at ``start_epoch = e``:
it trains epoch ``e`` a second time and drops the plateau step on epoch ``e``'s validation loss
(``train()`` steps only when ``epoch > start_epoch``). A resumed run therefore cannot equal the
uninterrupted one, with torch's class or ours. RESUME is "state": across "resume-1" and
"resume-2" (``--restart_latest`` from ``<out>/ckpt``) the scheduler's state continues exactly, and
the steps after the restart are checked as any run of ours is.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

LIBRARY = "mace-torch"
FIELD = "atomistic ML"
SEAM = "patch `torch.optim.lr_scheduler.ReduceLROnPlateau`"
REQUIREMENTS = ["mace-torch==0.3.16"]
EXTRAS = ""
LAUNCHER = "torchrun"
BASELINE = "synced"
RESUME = "state"  # see the docstring: MACE's restart trains the checkpointed epoch again
TIMEOUT = 600

EPOCHS = 6  # "torch", "ours" and, in total, resume-1 + resume-2
RESUME_EPOCHS = 3  # resume-1 stops after this many
N_TRAIN, N_VALID = 16, 8  # configurations; each rank gets half of each through MACE's DistributedSampler
SEED = 7


def _write_data(folder: Path) -> tuple[Path, Path]:
    """Random H/O clusters with random energies and forces: the loss does not improve steadily,
    so the plateau scheduler reduces the learning rate within a few epochs."""
    import ase.io
    import numpy as np
    from ase import Atoms

    rng = np.random.default_rng(SEED)

    def configs(n: int) -> list[Atoms]:
        out = []
        for _ in range(n):
            atoms = Atoms(symbols=rng.choice(["H", "O"], size=4).tolist(), positions=rng.uniform(0.0, 2.5, (4, 3)))
            atoms.info["REF_energy"] = float(rng.normal(-10.0, 1.0))
            atoms.arrays["REF_forces"] = rng.normal(0.0, 1.0, (4, 3))
            out.append(atoms)
        return out

    folder.mkdir(parents=True, exist_ok=True)
    train, valid = folder / "train.xyz", folder / "valid.xyz"
    ase.io.write(train, configs(N_TRAIN), format="extxyz")
    ase.io.write(valid, configs(N_VALID), format="extxyz")
    return train, valid


def _cpu_ddp(module: Any, device_ids: Any = None, **kwargs: Any) -> Any:
    """MACE's ``DDP(model, device_ids=[local_rank])`` for a CPU model: torch takes no device_ids there."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, **kwargs)


def _argv(variant: str, out: Path, train: Path, valid: Path) -> list[str]:
    # resume-1 and resume-2 share one checkpoint folder and run name, so that --restart_latest finds it.
    work = out / ("resume" if variant.startswith("resume") else variant)
    argv = [
        "mace_run_train", "--name", "tiny", "--seed", str(SEED), "--device", "cpu", "--default_dtype", "float64",
        "--distributed", "--launcher", "torchrun",
        "--work_dir", str(work), "--checkpoints_dir", str(out / "ckpt" if variant.startswith("resume") else work),
        "--train_file", str(train), "--valid_file", str(valid), "--E0s", "average",
        "--energy_key", "REF_energy", "--forces_key", "REF_forces",
        "--model", "MACE", "--num_channels", "8", "--max_L", "0", "--r_max", "3.0", "--num_interactions", "2",
        "--correlation", "2", "--max_ell", "1", "--num_radial_basis", "4", "--MLP_irreps", "4x0e",
        "--radial_MLP", "[8]",
        "--batch_size", "2", "--valid_batch_size", "2", "--num_workers", "0", "--eval_interval", "1",
        "--lr", "0.05", "--scheduler", "ReduceLROnPlateau", "--lr_factor", "0.5", "--scheduler_patience", "1",
        "--max_num_epochs", str(RESUME_EPOCHS if variant == "resume-1" else EPOCHS),
        # every epoch's checkpoint, not only improving ones: resume-2 restarts from resume-1's last epoch
        "--save_all_checkpoints", "--plot", "False",
    ]
    return [*argv, "--restart_latest"] if variant == "resume-2" else argv


def main() -> None:
    variant, out_text = sys.argv[1:3]
    out = Path(out_text)
    from tests.clients import record

    # Before the swap below: install() wraps the step of torch's class as torch's module has it.
    record.install(out, variant)

    import torch
    import torch.distributed as dist

    # MACE opens the group only for cuda (nccl) or xpu (ccl), and uses this one when it exists.
    dist.init_process_group("gloo")
    data = out / "data"
    if dist.get_rank() == 0:
        _write_data(data)
    dist.barrier()

    from mace.cli import run_train

    run_train.DDP = _cpu_ddp  # CPU only, see the module docstring; not part of the swap
    if variant != "torch":
        from distplateau import DistributedReduceLROnPlateau

        # The swap: MACE's LRScheduler looks the class up on torch's module when it builds it.
        torch.optim.lr_scheduler.ReduceLROnPlateau = DistributedReduceLROnPlateau  # type: ignore[misc]
    sys.argv = _argv(variant, out, data / "train.xyz", data / "valid.xyz")
    run_train.main()  # mace_run_train's entry point


if __name__ == "__main__":
    main()
