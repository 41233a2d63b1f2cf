"""The errors every front door (command line, Slicer Logic, Python API, batch) tells apart.

A small module of its own, importing nothing, so that any stage can raise them without import
cycles (the refinement used to import the engine for :class:`RegistrationCancelled`).
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: the message is one clear line, shown as is."""


class RegistrationCancelled(RuntimeError):
    """Raised when the caller's ``cancel()`` returned True; nothing was produced."""
