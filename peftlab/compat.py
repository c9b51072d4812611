"""Where peftlab meets libraries that move: one place for each difference between their releases.

transformers, peft and trl release monthly, and a release can rename an argument or break a reference library.
peftlab speaks every dialect it is tested with, chosen once from what is installed, and it names each known break
of a reference library, with the versions it holds for, so that a test can expect exactly that failure (strictly:
the test turns red when upstream mends it) and a notebook can teach it as a pitfall.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn


def cache_keyword(model: nn.Module) -> str:
    """The keyword through which a transformers model takes a KV cache, read from its signature.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` in every model's ``forward`` (the old name still
    works until 5.40, with a FutureWarning); older releases know only ``past_key_values``. A task head whose
    ``forward`` names neither (BERT's sequence classifier passes ``**kwargs`` on) takes what its backbone takes.
    """
    backbone = getattr(model, "base_model", model)  # transformers' property: the model under the task head
    return _cache_keyword(type(model), type(backbone))


@functools.cache
def _cache_keyword(model_class: type, backbone_class: type) -> str:
    for cls in (model_class, backbone_class):
        parameters = inspect.signature(cls.forward).parameters
        for keyword in ("cache", "past_key_values"):
            if keyword in parameters:
                return keyword
    raise TypeError(
        f"{model_class.__name__}.forward takes no KV cache (neither `cache` nor `past_key_values`), so a prefix "
        "cannot enter its attention: use a transformers model whose attention reads a cache, or a method that does "
        "not touch the attention (e.g. peftlab.methods.prompt)."
    )


def installed_version(package: str) -> Version | None:
    """The installed release of a package, or ``None`` when it is not installed."""
    try:
        return Version(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class KnownBreak:
    """A reference library that fails under some releases: where, with which error, and for which versions.

    ``versions`` maps each package to the releases the break holds for; it holds when every installed version
    is inside its range. The ranges are exact on purpose: when a new release mends the break (or the break outlives
    the range), the test that expects it fails and someone looks.
    """

    name: str
    what: str
    error: type[Exception]
    message: str
    versions: dict[str, str]
    taught_in: str

    def holds(self) -> bool:
        """Whether the installed releases are the ones this break is known for."""
        for package, specifier in self.versions.items():
            version = installed_version(package)
            if version is None or not SpecifierSet(specifier).contains(version, prereleases=True):
                return False
        return True

    def describe(self) -> str:
        ranges = ", ".join(f"{package}{specifier}" for package, specifier in self.versions.items())
        return f"{self.what} ({ranges}): {self.error.__name__}: {self.message}"


#: peft looks for ``past_key_values`` in the model's signature; transformers 5.24 renamed it ``cache``. For decoders
#: peft reads the name from ``prepare_inputs_for_generation`` and still works; encoders (BERT) are refused outright.
PEFT_PREFIX_TUNING_ON_BERT = KnownBreak(
    name="peft-prefix-tuning-bert",
    what="peft's prefix tuning and P-tuning v2 refuse BERT once transformers names the cache argument `cache`",
    error=ValueError,
    message="Model does not support past key values which are required for prefix tuning.",
    versions={"transformers": ">=5.24", "peft": "<=0.21.2"},
    taught_in="notebook 05 (prefix tuning), pitfalls",
)

#: peft 0.21.2's ``prepare_inputs_for_generation`` looks for the cache in ``model_kwargs["past_key_values"]``; from
#: transformers 5.24 ``generate`` keeps it under ``cache``, so peft never finds it and injects the prefix under
#: ``past_key_values`` at every step. The forward receives both, keeps ``cache`` and drops the prefix (FutureWarning
#: "Both `past_key_values` and `cache` are set ... ignoring deprecated `past_key_values`"): peft's prefix-tuned
#: ``generate`` answers as the base model.
#: Its forward pass (training, logits) is right. Measured on tiny Llama and GPT-2 (greedy): 5.23 agrees, 5.24 not.
PEFT_PREFIX_GENERATE = KnownBreak(
    name="peft-prefix-generate",
    what="peft's prefix-tuned generate ignores the prefix once transformers names the cache argument `cache`",
    error=AssertionError,
    message="peft's prefix-tuned generate gives other tokens than its own forward pass",
    versions={"transformers": ">=5.24", "peft": "<=0.21.2"},
    taught_in="notebook 05 (prefix tuning), pitfalls",
)

KNOWN_BREAKS = (PEFT_PREFIX_TUNING_ON_BERT, PEFT_PREFIX_GENERATE)
