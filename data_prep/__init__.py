"""Offline preprocessing: raw BraTS-style cases (NIfTI) to HDF5 shards, and synthetic cases."""
