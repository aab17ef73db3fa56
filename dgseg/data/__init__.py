"""Reading prepared HDF5 shards: manifest, synthetic domains, training/evaluation dataset."""

from dgseg.data.dataset import ShardDataset
from dgseg.data.domains import BEZIER_MODES, assign_domains, curve_kind, sample_seed
from dgseg.data.manifest import SPLITS, load_manifest, split_cases

__all__ = [
    "ShardDataset",
    "load_manifest",
    "split_cases",
    "SPLITS",
    "assign_domains",
    "curve_kind",
    "sample_seed",
    "BEZIER_MODES",
]
