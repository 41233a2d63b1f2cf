"""Trainer of the bundled ResNet-34 slice regressor (unsupervised: image similarity losses).

Uses the product's own model, geometry, resampling and similarity code
(``RigidResNetRegistrationLib``): one implementation for training and inference.
"""
