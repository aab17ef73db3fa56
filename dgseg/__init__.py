"""dgseg: single-source domain generalization for 3D brain-tumour segmentation."""

__version__ = "0.1.0"
