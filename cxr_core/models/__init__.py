"""Models: the registry of architectures (:mod:`.specs`, TF-free), the graph contract and the one
loader (:mod:`.layers`), graph building (:mod:`.graph`), weight loading (:mod:`.weights`) after
the HDF5 checks (:mod:`.h5safe`), one
model by reference (:mod:`.store`), ensembles (:mod:`.ensembles`), the reference dispatcher above
both (:mod:`.refs`) and model cards (:mod:`.card`).

May import :mod:`cxr_core.data` and everything below it.
"""
