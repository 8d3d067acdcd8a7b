"""Simulates a bare GPU box (scripts/gpu-check.sh --dry-run): the packages named in $GPU_CHECK_BLOCK
(comma list of import names) are absent, in this process and in every child that inherits the
environment. A None entry in sys.modules makes `import name` raise ModuleNotFoundError and
`importlib.util.find_spec(name)` return None, as for a package that is not installed; their
distributions drop out of importlib.metadata.distributions(), so pytest autoloads none of their
plugins (as on the box, where they are not installed at all)."""

import importlib.metadata as _metadata
import os
import sys

_BLOCKED = frozenset(filter(None, (n.strip() for n in os.environ.get("GPU_CHECK_BLOCK", "").split(","))))
if _BLOCKED:
    for _name in _BLOCKED:
        sys.modules.setdefault(_name, None)
    _distributions = _metadata.distributions

    def _present(**kwargs):
        for dist in _distributions(**kwargs):
            if (dist.metadata["Name"] or "").lower().replace("-", "_") not in _BLOCKED:
                yield dist

    _metadata.distributions = _present
