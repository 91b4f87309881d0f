"""Built-in configs and how a command line names one.

The configs live inside the package so an installed ``megan`` finds them;
``configs/*.py`` at the repository top re-export them, so both
``--config demo`` and ``--config configs/demo.py`` work, as does any file of
the user's with a ``get_config(arg=None)``. ``NAME:ARG`` passes ``ARG``
(``--config demo:smoke``); a module's ``VARIANTS``, where it lists them (the
built-ins do), are the only ``ARG``s it takes. Fields are overridden with
``--config.model.ngf=32`` style arguments.
"""
from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import os
from typing import Sequence

import ml_collections

from megan_jax.errors import InputError

BUILTIN = ("default", "demo", "brats_t2", "copd_ct")
# What a true/false override may say (any case).
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def _one_line(e: BaseException) -> str:
  return f"{type(e).__name__}: {' '.join(str(e).split())}"


def get_config(spec: str = "demo") -> ml_collections.ConfigDict:
  """Loads a config by built-in name or file path, with an optional ``:arg``.

  A module that lists its ``VARIANTS`` (the built-ins do) refuses any other
  ``arg``; a file's ``get_config`` that fails, or returns no ``ConfigDict``,
  is an ``InputError`` naming the file.
  """
  name, _, arg = spec.partition(":")
  arg = arg or None
  if name in BUILTIN:
    module = importlib.import_module(f"megan_jax.configs.{name}")
  else:
    if not os.path.isfile(name):
      raise InputError(f"config {name}: " + (
          "not a file" if os.path.exists(name) else "no such file")
          + f" (built-in names: {', '.join(BUILTIN)})")
    # Any name: a file without ".py" is read as Python too (the import
    # system has no loader for other suffixes).
    loader = importlib.machinery.SourceFileLoader("_megan_user_config", name)
    mod_spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(mod_spec)
    try:
      mod_spec.loader.exec_module(module)
    except Exception as e:  # a user's file: report, don't trace back
      raise InputError(f"config {name}: failed to load "
                       f"({_one_line(e)})") from None
    if not hasattr(module, "get_config"):
      raise InputError(f"config {name}: defines no get_config()")
  variants = getattr(module, "VARIANTS", None)
  if arg is not None and variants is not None and arg not in variants:
    known = (f"known: {', '.join(variants)}" if variants
             else "it has no variants")
    raise InputError(f"config {spec}: unknown variant {arg!r} of {name} "
                     f"({known})")
  try:
    config = module.get_config(arg)
  except Exception as e:  # a user's file (or arg): report, don't trace back
    raise InputError(f"config {spec}: get_config({arg!r}) failed "
                     f"({_one_line(e)})") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise InputError(f"config {spec}: get_config({arg!r}) returned a "
                     f"{type(config).__name__}, not an "
                     "ml_collections.ConfigDict")
  config.lock()  # a typo in an override is an error, not a new field
  return config


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies ``config.a.b=value`` strings (leading dashes optional)."""
  for item in overrides:
    text = item.lstrip("-")
    key, eq, raw = text.partition("=")
    if not eq or not key.startswith("config."):
      raise InputError(f"override {item!r}: expected --config.FIELD=VALUE")
    path = key[len("config."):].split(".")
    node = config
    for part in path[:-1]:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise InputError(f"override {item!r}: no section {part!r} in the config")
      node = node[part]
    field = path[-1]
    if field not in node:
      raise InputError(f"override {item!r}: no field {field!r} in the config")
    old = node[field]
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw  # a bare string
    if isinstance(old, bool) and not isinstance(value, bool):
      word = str(value).lower()
      if word not in TRUE_WORDS + FALSE_WORDS:
        raise InputError(f"override {item!r}: {field} is true or false "
                         f"(one of {', '.join(TRUE_WORDS + FALSE_WORDS)})")
      value = word in TRUE_WORDS
    elif isinstance(old, str) and value is not None and not isinstance(
        value, str):
      value = raw  # a name that reads as a number: the text as given
    elif isinstance(old, float) and isinstance(value, int):
      value = float(value)
    elif isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[field] = value  # ConfigDict checks the type against the old value
    except (TypeError, ValueError) as e:
      raise InputError(f"override {item!r}: {e}") from None
  return config
