"""pytest, for the whole checkout: ``--doctest-modules`` imports every module of ``distplateau``;
leave out the one whose optional framework is not installed, as its tests skip."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("transformers") else ["distplateau/transformers.py"]
