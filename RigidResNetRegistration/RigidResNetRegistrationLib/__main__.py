"""``python -m RigidResNetRegistrationLib ...`` runs the command line (same as ``rigid-resnet-register``)."""

from .cli import console_main

console_main()
