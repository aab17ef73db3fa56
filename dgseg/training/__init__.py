"""Training: the fit loop, the training steps, losses, optimisers, checkpoints, processes,
precision.

``fit.py`` runs a training from a :class:`dgseg.config.Config`; ``steps.py`` holds the training
steps (plain, domain-adversarial, SLAug two-pass, view consistency), ``engine.py`` the epoch loop
and validation around them.
"""
