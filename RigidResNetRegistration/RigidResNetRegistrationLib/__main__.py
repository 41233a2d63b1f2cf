"""``python -m RigidResNetRegistrationLib ...`` runs the command line (same as ``rigid-resnet-register``)."""

from .cli import main

raise SystemExit(main())
