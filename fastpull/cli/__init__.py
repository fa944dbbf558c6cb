"""The ``fastpull`` command (:mod:`.main`) and the cross-process single flight that makes identical
concurrent commands run once (:mod:`.singleflight`)."""
