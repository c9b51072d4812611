"""Where a notebook runs: the run profile, the device, seeding and the version print of the first cell.

Profiles (one code path, two sizes):

* ``smoke`` — few steps on small subsets: what CI and nbval run on a CPU, every notebook in minutes.
* ``full``  — the real run on a GPU or Colab: full data, real step counts, the numbers the prose reports.
* ``auto``  — ``full`` when a CUDA GPU is present, ``smoke`` otherwise (the default).

Choose with the environment variable ``PEFTLAB_PROFILE``; choose the device with ``PEFTLAB_DEVICE``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch

PROFILES = ("smoke", "full", "auto")
DEVICES = ("cuda", "mps", "cpu")

#: Packages whose versions the first cell of every notebook prints.
REPORTED_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "numpy", "pandas")


def resolve_profile(name: str | None = None) -> str:
    """Return ``"smoke"`` or ``"full"`` for a profile name (default: ``$PEFTLAB_PROFILE``, else ``auto``)."""
    requested = name if name is not None else os.environ.get("PEFTLAB_PROFILE", "auto")
    requested = requested.strip().lower()
    if requested not in PROFILES:
        raise ValueError(
            f"Unknown profile {requested!r}. Set PEFTLAB_PROFILE to one of {', '.join(PROFILES)} "
            "(smoke: a few steps on a CPU; full: the real run on a GPU; auto: full when a GPU is present)."
        )
    if requested == "auto":
        return "full" if torch.cuda.is_available() else "smoke"
    return requested


def resolve_device(name: str | None = None) -> torch.device:
    """Return the device to train on: ``name``, else ``$PEFTLAB_DEVICE``, else cuda, then mps, then cpu."""
    requested = name if name is not None else os.environ.get("PEFTLAB_DEVICE")
    if requested:
        kind = requested.split(":")[0].strip().lower()
        if kind not in DEVICES:
            raise ValueError(f"Unknown device {requested!r}. Use one of {', '.join(DEVICES)} (e.g. 'cuda:1').")
        if kind == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"Device {requested!r} asked for, but torch sees no CUDA GPU. Unset PEFTLAB_DEVICE.")
        if kind == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"Device {requested!r} asked for, but MPS is not available. Unset PEFTLAB_DEVICE.")
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so that a run repeats."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def package_versions(packages: tuple[str, ...] = REPORTED_PACKAGES) -> dict[str, str]:
    """Installed version of each package, ``"not installed"`` where missing."""
    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def device_name(device: torch.device) -> str:
    """A human name for the device: the GPU's model, or the CPU's architecture and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


@dataclass(frozen=True)
class Run:
    """What a notebook needs to know about where it runs."""

    profile: str
    device: torch.device
    seed: int

    @property
    def is_full(self) -> bool:
        return self.profile == "full"

    def pick(self, *, smoke, full):
        """The value for this profile: ``run.pick(smoke=20, full=2_000)``."""
        return full if self.is_full else smoke


#: What the reference libraries print on every run that says nothing to a learner, each matched exactly:
#: peft calls transformers' renamed ``is_gradient_checkpointing`` (a FutureWarning from inside peft, on every
#: ``get_peft_model``); bitsandbytes looks for a CPU kernel on the Hub at import, logs a warning when it cannot
#: reach it, and uses its own code instead.
LIBRARY_NOISE_WARNINGS = (r"`is_gradient_checkpointing` is deprecated",)
LIBRARY_NOISE_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def quiet_library_noise() -> None:
    """Hide :data:`LIBRARY_NOISE_WARNINGS` and :data:`LIBRARY_NOISE_LOGGERS`, and nothing else."""
    for message in LIBRARY_NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for name in LIBRARY_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def setup(seed: int = 0, profile: str | None = None, device: str | None = None, verbose: bool = True) -> Run:
    """The first cell of every notebook: resolve profile and device, seed, print the versions, and hide what the
    reference libraries print that says nothing to a learner (:func:`quiet_library_noise`)."""
    quiet_library_noise()
    run = Run(profile=resolve_profile(profile), device=resolve_device(device), seed=seed)
    seed_everything(seed)
    if verbose:
        versions = "  ".join(f"{name} {version}" for name, version in package_versions().items())
        print(versions)
        print(f"profile: {run.profile}   device: {device_name(run.device)}   seed: {seed}")
    return run
