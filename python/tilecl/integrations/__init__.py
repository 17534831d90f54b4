"""Adapters for other libraries' loss APIs, each in its own module and imported on demand.

* :mod:`tilecl.integrations.sentence_transformers` —
  ``MultipleNegativesRankingLoss`` with sentence-transformers' constructor and
  call, plus false-negative masking (needs ``sentence-transformers``);
* :mod:`tilecl.integrations.pytorch_metric_learning` — ``NTXentLoss`` and
  ``SupConLoss`` with pytorch-metric-learning's call ``loss(embeddings, labels)``
  and reduction (needs nothing beyond tilecl).

``import tilecl`` imports neither: ``import tilecl.integrations.sentence_transformers``
is where the other package is first needed.
"""
