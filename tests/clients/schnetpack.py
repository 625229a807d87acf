"""schnetpack (atomistic ML): a SchNet potential trained by schnetpack's ``AtomisticTask``, Lightning DDP, 2 CPU ranks.

What schnetpack does with the metric (read in schnetpack 2.2.0 with pytorch-lightning 2.6.6):

- ``schnetpack/task.py``, ``AtomisticTask.validation_step``: ``self.log("val_loss", loss,
  on_step=False, on_epoch=True, prog_bar=True, batch_size=len(batch["_idx"]))``, without
  ``sync_dist``. Lightning averages this rank's batch losses weighted by their molecule counts:
  every rank holds the mean over its own validation molecules, and nothing gathers it.
- ``AtomisticTask.configure_optimizers``: ``scheduler_cls(optimizer=optimizer, **scheduler_args)``,
  returned as ``[optimizer], [{"scheduler": ..., "name": "lr_schedule", "monitor": scheduler_monitor}]``
  (``"interval": "step"`` with ``"frequency": val_check_interval`` only when ``val_check_interval > 1``).
  No isinstance or exact-class test: our class builds, and Lightning (through distplateau's
  callback, each rank's validation batch sizes as weight) steps it once per epoch.
- ``schnetpack/train/lr_scheduler.py``, ``ReduceLROnPlateau``: torch's class plus
  ``smoothing_factor``, an exponential moving average of the metric that it steps on (in 2.2.0;
  2.1.1 computed the average but stepped on the raw value). spk-train's default config
  (``configs/task/scheduler/reduce_on_plateau.yaml``) builds it with ``smoothing_factor: 0.0``.
  The baseline here is schnetpack's class with ``smoothing_factor=0.5``: ours takes the argument
  with schnetpack's name and formula (applied to the gathered global value), so the swap keeps
  ``scheduler_args`` as they are, and ours is checked against schnetpack's own class replayed in
  one process on the global values (``record.write_reference``), not against torch's.

The seam is ``AtomisticTask(scheduler_cls=...)``: ``DistributedReduceLROnPlateau`` instead of
``schnetpack.train.ReduceLROnPlateau``. With spk-train (``cli.py`` resolves the string with
``schnetpack.utils.str2class``): ``task.scheduler_cls=distplateau.DistributedReduceLROnPlateau``.

Baseline: diverges. The data is a small ``ASEAtomsData`` database of random molecules with a
synthetic pair energy; the validation molecules alternate between that energy and its mirror
image about the training mean, and Lightning's ``DistributedSampler`` (no shuffling for
validation) deals them out alternately: rank 0 validates only true energies, whose loss falls as
the model learns, rank 1 only mirrored ones, whose loss rises. Rank 1 alone cuts its learning
rate (measured: after 8 epochs rank 0 0.005, rank 1 0.00125), and from then on the ranks'
weights drift apart: DDP averages the gradients, each rank applies its own rate. With ours every
rank steps on the moving average of the mean over all 9 validation molecules (weights 5 and 4:
distplateau's callback takes Lightning's ``extract_batch_size`` of schnetpack's batch dict, whose
first tensor ``_idx`` has one entry per molecule, the count schnetpack logs ``val_loss`` with) and
both cut at the 4th and 7th plateau steps, as schnetpack's class does in one process on those values.

Resume, as spk-train does it: schnetpack's ``ModelCheckpoint`` (``save_last=True``) writes
``last.ckpt`` and ``trainer.fit(task, datamodule=..., ckpt_path=...)`` continues from it. The
checkpoint is written at the end of the validation, before Lightning's epoch-end plateau step;
distplateau's callback keeps that step as pending in the checkpoint and "resume-2" takes it first.
Two things break that resume with torch's class as with ours, both worked around below:
``trainer.fit(ckpt_path=...)`` needs ``weights_only=False`` (the checkpoint pickles the model), and
``save_top_k=1`` leaves ``last.ckpt`` at epoch 0 here (Lightning 2.6 refreshes it only together
with a top-k save, which needs every rank's own ``val_loss`` to improve).

Installing: schnetpack 2.2.0, the only release that imports under torch 2.13 (2.0.x and 2.1.x
import ``T_co`` from ``torch.utils.data.dataloader``, gone since; 2.1.x also pins
``sympy<=1.12`` against torch's ``sympy>=1.13.3``), declares ``Requires-Python >=3.12``, and
this machine has Python 3.11. It installs with ``--ignore-requires-python`` and runs;
``--prefer-binary`` and ``networkx==3.6.1`` keep pip from the sdists and 3.12-only releases that
the ignored check would otherwise let in (numpy and scipy sdists, networkx 3.7).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

LIBRARY = "schnetpack"
FIELD = "atomistic ML"
SEAM = "`AtomisticTask(scheduler_cls=...)`"
REQUIREMENTS = ["--ignore-requires-python", "--prefer-binary", "schnetpack==2.2.0", "networkx==3.6.1"]
EXTRAS = "pytorch-lightning"  # schnetpack imports `pytorch_lightning`, not `lightning.pytorch`
LAUNCHER = "python"  # Trainer(strategy="ddp", devices=2) starts rank 1 itself
BASELINE = "diverges"
RESUME = "exact"
TIMEOUT = 600

EPOCHS = 8  # "torch", "ours" and, split 4 + 4, "resume-1" and "resume-2"
FIRST_PART = 4
N_TRAIN, N_VAL = 32, 9  # 9 validation molecules: 5 true ones on rank 0, 4 mirrored ones on rank 1
CUTOFF = 5.0
# spk-train's reduce_on_plateau.yaml, with a patience that fits 8 epochs and no cooldown
SCHEDULER_ARGS: dict[str, Any] = {"mode": "min", "factor": 0.5, "patience": 2, "threshold": 0.0,
                                  "threshold_mode": "rel", "cooldown": 0, "min_lr": 0.0}
# schnetpack's moving average (spk-train's default is 0): the same argument for both classes, and
# ours checked against schnetpack's own class replayed on the global values (record.write_reference)
SMOOTHING = 0.5


def _energy(numbers: Any, positions: Any) -> float:
    """A synthetic energy that a SchNet can learn: a term per element and a smooth pair term."""
    import numpy as np

    per_atom = {1: -0.5, 6: -3.0, 8: -4.0}
    distances = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    pairs = np.exp(-distances[np.triu_indices(len(numbers), 1)])
    return float(sum(per_atom[int(z)] for z in numbers) + 2.0 * pairs.sum())


def _database(path: Path) -> None:
    """The molecules, written with schnetpack's ``ASEAtomsData.create``/``add_systems`` and the
    split file ``AtomsDataModule`` reads: training molecules first, then validation molecules
    that alternate between the true energy and its mirror image about the training mean (rank 0
    validates the even positions, rank 1 the odd ones). Seeded: every launch writes the same
    database, so the resumed run can equal the uninterrupted one."""
    import numpy as np
    from ase import Atoms
    from schnetpack.data import ASEAtomsData

    rng = np.random.default_rng(0)
    atoms_list, energies = [], []
    for _ in range(N_TRAIN + N_VAL):
        numbers = rng.choice([1, 6, 8], size=int(rng.integers(3, 7)))
        positions = rng.uniform(0.0, 3.0, size=(len(numbers), 3))
        atoms_list.append(Atoms(numbers=numbers, positions=positions))
        energies.append(_energy(numbers, positions))
    mean = float(np.mean(energies[:N_TRAIN]))
    for i in range(N_TRAIN + 1, N_TRAIN + N_VAL, 2):
        energies[i] = 2.0 * mean - energies[i]
    data = ASEAtomsData.create(str(path / "molecules.db"), distance_unit="Ang", property_unit_dict={"energy": "eV"})
    data.add_systems([{"energy": np.array([e])} for e in energies], atoms_list)
    np.savez(path / "split.npz", train_idx=np.arange(N_TRAIN), val_idx=np.arange(N_TRAIN, N_TRAIN + N_VAL),
             test_idx=np.array([], dtype=np.int64))


def _datamodule(path: Path) -> Any:
    import schnetpack as spk
    import schnetpack.transform as trn

    # As schnetpack's tutorials build it; num_workers=0 keeps the data order deterministic.
    return spk.data.AtomsDataModule(
        str(path / "molecules.db"), batch_size=4, num_train=N_TRAIN, num_val=N_VAL,
        split_file=str(path / "split.npz"), distance_unit="Ang", property_units={"energy": "eV"},
        transforms=[trn.ASENeighborList(cutoff=CUTOFF), trn.RemoveOffsets("energy", remove_mean=True),
                    trn.CastTo32()],
        num_workers=0, pin_memory=False,
    )


def _task(variant: str) -> Any:
    import schnetpack as spk
    import schnetpack.transform as trn
    import torch
    import torchmetrics

    # schnetpack's tutorial model (tutorial_02_qm9), tiny
    representation = spk.representation.SchNet(
        n_atom_basis=16, n_interactions=2, radial_basis=spk.nn.GaussianRBF(n_rbf=10, cutoff=CUTOFF),
        cutoff_fn=spk.nn.CosineCutoff(CUTOFF))
    model = spk.model.NeuralNetworkPotential(
        representation=representation, input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=16, output_key="energy")],
        postprocessors=[trn.CastTo64(), trn.AddOffsets("energy", add_mean=True)])
    output = spk.task.ModelOutput(name="energy", loss_fn=torch.nn.MSELoss(), loss_weight=1.0,
                                  metrics={"MAE": torchmetrics.MeanAbsoluteError()})
    if variant == "torch":
        from schnetpack.train import ReduceLROnPlateau as scheduler_cls
    else:  # the whole swap: the class handed to the task, with the same arguments
        from distplateau import DistributedReduceLROnPlateau as scheduler_cls
    scheduler_args = {**SCHEDULER_ARGS, "smoothing_factor": SMOOTHING}
    return spk.task.AtomisticTask(
        model=model, outputs=[output], optimizer_cls=torch.optim.AdamW,
        # 5e-3 rather than the tutorial's 1e-4: the model must learn within 8 short epochs
        optimizer_args={"lr": 5e-3},
        scheduler_cls=scheduler_cls, scheduler_args=scheduler_args, scheduler_monitor="val_loss",
    )


def main() -> None:
    variant, out = sys.argv[1], str(Path(sys.argv[2]).resolve())
    sys.argv[2] = out  # rank 1 re-runs this command line, from the directory chdir'ed to below
    from tests.clients import record

    # On both ranks: Lightning's DDP launcher re-runs this module (python -m) for rank 1.
    record.install(out, variant)
    import pytorch_lightning as pl
    import schnetpack as spk

    work = Path(out) / f"work-{variant}"
    checkpoints = Path(out) / "ckpt"  # resume-1 writes last.ckpt there, resume-2 resumes from it
    if "LOCAL_RANK" not in os.environ:  # the launched process, before it starts rank 1
        work.mkdir(parents=True, exist_ok=True)
        _database(work)
    # AtomsDataModule takes a lock file "splitting.lock" in the working directory: keep it out of
    # the repository. Rank 1 starts in this directory too; PYTHONPATH still finds tests.clients.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.chdir(work)
    # Both ranks build the same initial weights (DDP would broadcast rank 0's anyway), and every
    # launch the same ones: the resumed run must equal the uninterrupted one.
    pl.seed_everything(0, workers=True)
    task = _task(variant)
    # spk-train's checkpoint callback, but save_top_k=-1 instead of 1: Lightning 2.6 rewrites last.ckpt
    # only when it also saved a top-k checkpoint, and it saves one only when every rank's own
    # val_loss improved (reduce_boolean_decision); with rank 1's loss rising that is never after
    # epoch 0, and resume-2 would restart from epoch 0.
    callbacks = [spk.train.ModelCheckpoint(
        model_path=str(work / "best_inference_model"), monitor="val_loss", save_top_k=-1, save_last=True,
        dirpath=str(checkpoints if variant.startswith("resume") else work / "checkpoints"))]
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=FIRST_PART if variant == "resume-1" else EPOCHS,
        callbacks=callbacks, default_root_dir=str(work),
        # logger=False: spk-train adds a TensorBoard logger; nothing here reads it
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    if variant == "resume-2":
        # weights_only=False: the checkpoint pickles the whole model (AtomisticTask's
        # save_hyperparameters() keeps model=...), which torch.load's default since torch 2.6
        # refuses, with torch's class as with ours; spk-train's own resume fails the same way.
        trainer.fit(task, datamodule=_datamodule(work), ckpt_path=str(checkpoints / "last.ckpt"), weights_only=False)
    else:
        trainer.fit(task, datamodule=_datamodule(work))
    if variant == "ours" and trainer.global_rank == 0:
        record.write_reference(out, variant, spk.train.ReduceLROnPlateau)


if __name__ == "__main__":
    main()
