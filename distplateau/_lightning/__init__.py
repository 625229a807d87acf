"""The Lightning integration, written once for both Lightning packages; the public modules are
``distplateau.lightning`` (``lightning.pytorch``) and ``distplateau.pytorch_lightning``
(``pytorch_lightning``). Imports no Lightning package itself."""
