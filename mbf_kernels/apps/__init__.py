"""The applications built on the library: the ``mbf`` command (:mod:`.cli`), the training
comparison (:mod:`.training`, on :mod:`.data` with :mod:`.models`), the block-op benchmark
(:mod:`.benchmark`) and the step profile (:mod:`.profiling`).

The library (ops, kernels, optimizer) never imports this package; these modules import the
library as any user would.
"""
