"""The lab: the demo, the article's experiments and the memory probe, run from a source checkout.

Not part of the installed ``tilecl`` package (a user's ``import tilecl`` never loads
them); they need the ``demo`` extra (scikit-learn, tqdm, matplotlib)::

    python -m experiments demo
    python -m experiments reproduce {synthetic, digits, modality}
    python -m experiments.memory PROVIDER N D     # one memory measurement, in a fresh process
"""
