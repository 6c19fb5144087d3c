"""The evaluation harness: accuracy of strategies x KV budgets x tasks x context lengths.

Not part of the core library (``pipeline`` never imports it); its extra packages come with
``pip install "kvpress-like[eval]"`` (matplotlib, for the plots).

- ``passkey``: the passkey prompt, also used by ``kvpress-like demo``; needs only the core install.
- ``tasks``: the task generators (passkey, RULER-style needles, variable tracking, fidelity) and
  their scoring, built offline from the text in ``data/`` (essays and ``passkey.yaml``).
- ``harness``: ``evaluate``, the resumable grid run, its summary table and plots.
- ``cli``: ``kvpress-like eval`` (also ``python -m kvpress_like.eval``), its arguments checked
  before any model loads.

Importing this package imports none of them, and none imports matplotlib at module level.
"""
