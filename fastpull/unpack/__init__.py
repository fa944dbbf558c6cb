"""Layers into trees: the streaming tar reader (:mod:`.tar`), the applier (:mod:`.archive`) with its
directory resolver (:mod:`.dirs`) and attribute policy (:mod:`.attrs`), the worker processes that
decompress and apply layers while they download (:mod:`.workers`), the whiteout forms
(:mod:`.whiteouts`), ChainID snapshots (:mod:`.snapshots`) and the rootfs merge (:mod:`.rootfs`).
Reads blobs from the content store; knows nothing of HTTP."""
