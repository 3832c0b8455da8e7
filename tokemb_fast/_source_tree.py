"""``tokemb_fast.kernels`` in a source checkout.

setup.py installs the top-level ``kernels/`` directory as ``tokemb_fast.kernels`` (a top-level
module named ``kernels`` belongs to another project). An installed package has it; a checkout
does not, and a checkout's ``tokemb_fast`` is what Python imports whenever the checkout is on the
path (``python -m pytest`` in it, a script run from it), installed copy or not. So, only where
this package has no ``kernels`` of its own and ``../kernels`` is there, a finder at the front of
``sys.meta_path`` serves ``tokemb_fast.kernels`` from ``../kernels`` (its submodules are then
found through its ``__path__``): this checkout's kernels, even where an editable install of another
checkout would map that name elsewhere. Nothing is imported until the kernels are (they import
Triton).
"""
import importlib.abc
import importlib.util
import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_SOURCE_KERNELS = os.path.join(os.path.dirname(_PACKAGE), "kernels")


class _SourceKernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tokemb_fast.kernels":
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(_SOURCE_KERNELS, "__init__.py"),
                                                      submodule_search_locations=[_SOURCE_KERNELS])


if not os.path.isdir(os.path.join(_PACKAGE, "kernels")) and \
        os.path.isfile(os.path.join(_SOURCE_KERNELS, "__init__.py")) and \
        not any(isinstance(finder, _SourceKernelsFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _SourceKernelsFinder())
