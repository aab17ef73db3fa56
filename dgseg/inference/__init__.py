"""Inference: sliding-window prediction on stored volumes, and prediction of raw cases back in
their original grid (``predict_case.py``), written as NIfTI (``nifti.py``)."""
