"""What tilecl's own tests are checked against: imported on demand, never by ``import tilecl``.

* :mod:`tilecl.testing.oracle` — every loss and its analytic gradients in
  NumPy float64, over the full ``N x M`` matrix (the test matrix's oracle);
* :mod:`tilecl.testing.naive` — the full-matrix PyTorch losses tilecl replaces
  (open_clip's ``ClipLoss`` formula), in the input dtype: the "≤ 2× naive
  PyTorch's error" rule's yardstick, the benchmarks' baseline, and the one
  place a loss can be differentiated twice.

Both materialize ``N x M``: for tests and small batches only.
"""
