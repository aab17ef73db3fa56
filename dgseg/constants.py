"""Names and numbers shared across dgseg (BraTS 2021 conventions, see docs/SPEC.md)."""

__all__ = [
    "MODALITIES",
    "DEFAULT_DATA_ROOT",
    "REGIONS",
    "REGION_LABELS",
    "BRATS_LABELS",
    "LABEL_CONVENTIONS",
    "BRATS_EMPTY_HD95",
]

# Order of the four MRI modalities everywhere: shards, 4D arrays, stacked inputs.
MODALITIES = ("t1", "t1ce", "t2", "flair")

# Prepared shards: tools/prepare_brats.py writes here by default, training reads here by default.
DEFAULT_DATA_ROOT = "data/prepared"

# Network output channels, in this order: whole tumour, tumour core, enhancing tumour.
REGIONS = ("WT", "TC", "ET")

# BraTS 2018-2021 label values: 1 necrotic / non-enhancing core, 2 edema, 4 enhancing tumour.
BRATS_LABELS = (0, 1, 2, 4)

# Each region of REGIONS as the BraTS 2021 label values it holds: WT = 1∪2∪4, TC = 1∪4, ET = 4.
REGION_LABELS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}

# Source value -> BraTS 2021 value per label convention of raw data (docs/SPEC.md "Labels"); values
# not listed are invalid. Plain ints, no torch: preparation workers read it (data_prep.loading).
LABEL_CONVENTIONS: dict[str, dict[int, int]] = {
    "brats2021": {0: 0, 1: 1, 2: 2, 4: 4},
    "brats2020": {0: 0, 1: 1, 2: 2, 4: 4},  # 2018-2020 share the 2021 values
    "brats2023": {0: 0, 1: 1, 2: 2, 3: 4},  # GLI: 1 NETC, 2 SNFH, 3 ET
    "msd": {0: 0, 1: 2, 2: 1, 3: 4},  # Task01: 1 edema, 2 non-enhancing, 3 enhancing
}

# HD95 (mm) when exactly one of prediction / truth is empty: the 240x240x155 diagonal.
BRATS_EMPTY_HD95 = 373.13
