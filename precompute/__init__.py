"""Stage 1: run a teacher once over seeded views and store its raw logits.

The package is callable: ``kdcache.precompute(**options)`` is ``kdcache.precompute.api.precompute``
(the function the ``kdcache precompute`` command calls). A plain function of that name could not
live beside this subpackage: importing ``kdcache.precompute.*`` rebinds the attribute.
"""

import sys
import types


class _Stage(types.ModuleType):
    def __call__(self, **options):
        """Run stage 1 with the CLI's options (snake_case); return the cache path."""
        from kdcache.precompute.api import precompute

        return precompute(**options)


sys.modules[__name__].__class__ = _Stage
