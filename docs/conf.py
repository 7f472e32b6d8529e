"""Sphinx configuration: Markdown pages (MyST) and an API reference from the docstrings.

Build with ``sphinx-build -W -b html docs docs/_build/html``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

project = "prefetch_ingest"
author = "prefetch_ingest developers"
copyright = "prefetch_ingest developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Docstrings are Google style ("Args:", "Attributes:"); attributes become
# :ivar: fields so that they do not clash with autodoc's own member entries.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = "prefetch_ingest"


def _attrs_signature(app, what, name, obj, options, signature, return_annotation):  # type: ignore[no-untyped-def]
    """attrs classes: the real defaults in the signature.

    With ``autodoc_preserve_defaults`` Sphinx copies the source of the generated
    ``__init__``, where a default reads ``attr_dict['started_at'].default``.
    """
    import attrs

    if what not in ("class", "exception") or not attrs.has(obj):
        return None
    params = []
    for field in attrs.fields(obj):
        if not field.init:
            continue
        default = field.default
        if default is attrs.NOTHING:
            shown = field.alias or field.name
        elif isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            made = default.factory
            shown = f"{field.alias or field.name}={getattr(made, '__name__', 'factory')}()"
        else:
            shown = f"{field.alias or field.name}={default!r}"
        params.append((field.kw_only, shown))
    parts: list[str] = []
    star = False
    for kw_only, shown in params:
        if kw_only and not star:
            parts.append("*")
            star = True
        parts.append(shown)
    return f"({', '.join(parts)})", return_annotation


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("autodoc-process-signature", _attrs_signature)
