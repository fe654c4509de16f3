"""Build shardkit's optional C speedups.

The pure-Python ring lookup is the specification; ``shardkit.ring._speedups``
is a faster copy of it.  Building it is optional, in the way SQLAlchemy and
markupsafe do it: without a compiler the package still installs (the build
warns once and the pure-Python fallback is used).  Environment variables:

* ``SHARDKIT_DISABLE_EXTENSIONS=1``: do not try to build the extension.  ``shardkit.ring``
  reads it at import time too, so an extension built before is not used either.
* ``SHARDKIT_REQUIRE_EXTENSIONS=1``: fail the install if it cannot be built.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DISABLE = os.environ.get("SHARDKIT_DISABLE_EXTENSIONS", "") not in ("", "0")
REQUIRE = os.environ.get("SHARDKIT_REQUIRE_EXTENSIONS", "") not in ("", "0")


class OptionalBuildExt(build_ext):
    """build_ext that warns and carries on when the C compiler is missing or fails."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "use the fallback"
            self._fallback(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._fallback(exc)

    def _fallback(self, exc: BaseException) -> None:
        if REQUIRE:
            raise exc
        sys.stderr.write(
            "WARNING: shardkit's C speedups could not be built "
            f"({exc.__class__.__name__}: {exc}); the pure-Python ring lookup will be used.\n"
        )


ext_modules = []
if not DISABLE:
    ext_modules.append(
        Extension(
            "shardkit.ring._speedups",
            sources=["shardkit/ring/_speedups.c"],
            extra_compile_args=["-O3"] if os.name != "nt" else [],
            optional=not REQUIRE,
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
