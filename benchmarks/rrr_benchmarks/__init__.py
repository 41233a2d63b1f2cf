"""Benchmarks of RigidResNetRegistration against classical rigid registration (SimpleITK, ANTsPy,
elastix) on held-out real volumes with known motions: ``rigid-resnet-benchmark --help``.

Modules: ``itk_bridge`` (our RAS/array conventions <-> ITK-family images and transforms),
``cases`` (known-motion cases), ``methods`` (one function per method), ``worker`` (runs one
method in its own process: time, peak memory), ``report`` (markdown, JSON, plots), ``run`` (the
command).
"""
