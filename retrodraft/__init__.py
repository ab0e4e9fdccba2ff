"""retrodraft: model-free speculative decoding, drafts retrieved instead of generated.

The source tree keeps the design card's folders at the top (``index/``, ``retrieval/``,
``decode/``, ``tools/``); installed, they live under this one namespace as
``retrodraft.index``, ``retrodraft.retrieval``, ``retrodraft.decode`` and
``retrodraft.tools`` (see pyproject.toml's package-dir), so nothing generic lands in
site-packages.
"""

__version__ = "0.1.0"

import logging as _logging
import os as _os
from pathlib import Path as _Path

# In a source checkout the subpackages are this folder's siblings: put them on the package's
# path, so a checkout (a git worktree, a copy on another machine) imports its own code
# whichever checkout was installed. An installed copy has no pyproject.toml beside it.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "decode" / "__init__.py").is_file():
    __path__.append(str(_checkout))

# Every module logs to logging.getLogger(__name__), under "retrodraft". Configure it as any
# library's logger, or set RETRODRAFT_LOG to a level name (debug, info, warning) to have
# this package print its records to stderr at that level.
if _os.environ.get("RETRODRAFT_LOG"):
    _level = _os.environ["RETRODRAFT_LOG"].upper()
    if not isinstance(_logging.getLevelName(_level), int):
        raise ValueError(f"RETRODRAFT_LOG={_os.environ['RETRODRAFT_LOG']!r} is not a logging level: "
                         "use debug, info, warning or error")
    _handler = _logging.StreamHandler()
    _handler.setFormatter(_logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    _logger = _logging.getLogger(__name__)
    _logger.setLevel(_level)
    _logger.addHandler(_handler)

# The front doors, loaded on first use so that importing retrodraft.retrieval or .index
# (numpy only) does not import torch and transformers.
_LAZY = {"speculative": "retrodraft.decode", "generate": "retrodraft.decode", "load_model": "retrodraft.decode",
         "Speculator": "retrodraft.retrieval", "SpeculationConfig": "retrodraft.retrieval",
         "Datastore": "retrodraft.retrieval"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retrodraft' has no attribute {name!r}")
