"""The registry client: credentials and tokens (:mod:`.auth`) and the client that resolves a
reference to verified manifests over the distribution API (:mod:`.client`).

Light on purpose: importing the package loads nothing; take what you need from its modules.
"""
