"""Saliency estimators, one per module, each registered in ``registry.ESTIMATORS``.

A new estimator is one module here: a class deriving from ``base.Estimator`` (or
``base.GradientEstimator``) decorated with ``@ESTIMATORS.register``; the registry imports every
module of this package, so the config, the command lines and the README table pick it up.
"""
