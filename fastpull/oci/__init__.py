"""The OCI data model, pure (no I/O): image references (:mod:`.reference`) and descriptors,
manifests, indexes and platforms (:mod:`.manifest`)."""
