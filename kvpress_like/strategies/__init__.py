"""Built-in strategies, registered by name through the ``kvpress_like.strategies`` entry points."""
