from __future__ import annotations

from kvpress_like.plugins import Strategy


class Full(Strategy):
    """Full cache, no compression: every token goes through every layer and every KV entry is kept.

    It implements no hook: with no answers the pipeline keeps and propagates everything, which
    makes it the reference the compressing strategies are measured against.
    """

    name = "full"
