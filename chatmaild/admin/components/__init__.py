"""Per-component configuration logic that plain files cannot express: validation of the
rendered files with each daemon's own checker, and edits through a daemon's own tool
(postconf). One module per conf/ folder that needs it, named like the folder.

A module may define:

    validate(files, platform) -> list of problems (strings; empty when all is well)
        `files` are the component's RenderedFile objects (chatmaild.admin.render); check them in
        a scratch directory, never in place.
    apply(files, platform) -> chatmaild.admin.apply.ApplyResult
        for files of a kind other than "file".
"""

import importlib


def component_module(component):
    """The module for `component`, or None if it has no special logic."""
    try:
        return importlib.import_module(f"{__name__}.{component}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{component}":
            return None
        raise
