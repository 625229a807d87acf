"""The Lightning integration, written once for both Lightning packages; the public modules are
``distplateau.lightning`` (``lightning.pytorch``) and ``distplateau.pytorch_lightning``
(``pytorch_lightning``). Imports no Lightning package itself."""

#: The two Lightning packages, and the distplateau module built on each (importing it
#: registers ``strategy="horovod"`` in that package).
DISTPLATEAU_MODULE = {
    "lightning.pytorch": "distplateau.lightning",
    "pytorch_lightning": "distplateau.pytorch_lightning",
}
