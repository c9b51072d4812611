"""PEFT methods, one module per family. Each has config dataclasses and ``apply(model, config) -> model``.

``apply`` freezes what must be frozen, adds what is trained, and returns a model that trains with
:func:`peftlab.train.train` like any other.
"""
