"""The docstring examples of every lpkernel module run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import lpkernel

MODULES = sorted(m.name for m in pkgutil.walk_packages(lpkernel.__path__, "lpkernel."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_some_examples_exist():
  attempted = sum(
    doctest.testmod(importlib.import_module(n), verbose=False).attempted for n in MODULES
  )
  assert attempted >= 8
