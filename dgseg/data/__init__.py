"""Reading prepared HDF5 shards: ``manifest`` (the format), ``domains`` (synthetic domains) and
``dataset`` (``ShardDataset``: shards -> training / evaluation samples).

Nothing is imported here: ``data_prep`` reads the manifest format from ``dgseg.data.manifest``
in worker processes that must not pay for importing torch and h5py through ``dataset``.
"""
