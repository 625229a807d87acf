"""Sphinx configuration: Markdown pages (MyST), API reference from the docstrings."""

from __future__ import annotations

import importlib.util

import distplateau

project = "distplateau"
author = "the distplateau authors"
copyright = "2026, the distplateau authors"
release = version = distplateau.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "figures/*.py", "check_layout.py"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# No network at build time (CI and this machine): cross-references to torch and Python
# stay plain text instead of links; intersphinx is kept for builds that pass -D to enable it.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
nitpicky = False

html_theme = "furo" if importlib.util.find_spec("furo") else "alabaster"
html_title = f"distplateau {release}"

# The NaN examples would print rank 0's warning between the doctest results.
doctest_global_setup = 'import logging; logging.getLogger("distplateau").setLevel(logging.ERROR)'
# Docstring examples run under pytest --doctest-modules, in their modules' namespaces; here
# only the pages' own {doctest} blocks run.
doctest_test_doctest_blocks = ""
html_static_path = ["_static"]
html_css_files = ["narrow.css"]
