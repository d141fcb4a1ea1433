"""Stage 2: losses, teacher providers, the training loop, study.

The package is callable: ``kdcache.distill(**options)`` is ``kdcache.distill.api.distill`` (the
function the ``kdcache distill`` command calls). A plain function of that name could not live
beside this subpackage: importing ``kdcache.distill.*`` rebinds the attribute.
"""

import sys
import types


class _Stage(types.ModuleType):
    def __call__(self, **options):
        """Run stage 2 with the CLI's options (snake_case); return the run's result record."""
        from kdcache.distill.api import distill

        return distill(**options)


sys.modules[__name__].__class__ = _Stage
