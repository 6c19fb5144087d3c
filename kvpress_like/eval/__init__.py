"""The evaluation harness: accuracy of strategies x KV budgets x tasks x context lengths.

Not part of the core library (``pipeline`` never imports it); its extra packages come with
``pip install "kvpress-like[eval]"`` (matplotlib, for the plots).

- ``passkey``: the passkey prompt, also used by ``kvpress-like demo``; needs only the core install.
- ``tasks``: the task generators (passkey, RULER-style needles, variable tracking, fidelity) and
  their scoring, built offline from the text in ``data/`` (``passkey.yaml`` and the haystacks).
- ``haystacks``: the texts needles hide in (essays; Python source) and how needles go in.
- ``harness``: ``evaluate``, the resumable grid run, samples in batches.
- ``report``: the summary table (95% intervals, ``intervals``) and the plots.
- ``merge``: ``kvpress-like eval-merge``, runs made apart merged when their environments agree.
- ``cli``: ``kvpress-like eval`` (also ``python -m kvpress_like.eval``), its arguments checked
  before any model loads.

Importing this package imports none of them, and none imports matplotlib at module level.
"""
