"""Names and numbers shared across dgseg (BraTS 2021 conventions, see docs/SPEC.md)."""

__all__ = ["MODALITIES", "DEFAULT_DATA_ROOT", "REGIONS", "BRATS_LABELS", "BRATS_EMPTY_HD95"]

# Order of the four MRI modalities everywhere: shards, 4D arrays, stacked inputs.
MODALITIES = ("t1", "t1ce", "t2", "flair")

# Prepared shards: tools/prepare_brats.py writes here by default, training reads here by default.
DEFAULT_DATA_ROOT = "data/prepared"

# Network output channels, in this order: whole tumour, tumour core, enhancing tumour.
REGIONS = ("WT", "TC", "ET")

# BraTS 2018-2021 label values: 1 necrotic / non-enhancing core, 2 edema, 4 enhancing tumour.
BRATS_LABELS = (0, 1, 2, 4)

# HD95 (mm) when exactly one of prediction / truth is empty: the 240x240x155 diagonal.
BRATS_EMPTY_HD95 = 373.13
