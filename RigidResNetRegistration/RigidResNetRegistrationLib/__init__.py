"""RigidResNetRegistration library: slice-wise deep rigid registration of brain MRI.

Importable without Slicer. Modules: ``geometry`` (frames, transforms, RAS/LPS), ``resample``
(the interpolator), ``similarity`` (NCC, MI), ``preprocess`` (volumes, normalisation, slice
stacks), ``model_card`` (model cards, no torch), ``model`` (ResNet-34 regressor, loading), ``engine`` (the registration flow),
``io`` (files), ``report`` (summaries, overview figure), ``cli`` (command line), ``batch`` (many
pairs: the loop, the pairs file, the torchrun split), ``distributed`` (torchrun's variables), ``sample``
(embedded sample and demo), ``volume`` (the Volume type, numpy only), ``allocator`` (glibc's thresholds:
freed volumes reused). Only ``slicer_nodes`` (Slicer adapter) imports ``slicer``.
"""

__version__ = "0.1.0"
