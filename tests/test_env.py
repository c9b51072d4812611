import pytest
import torch

from peftlab import env


@pytest.mark.parametrize("name", ["smoke", "full", "SMOKE ", "Full"])
def test_explicit_profiles_resolve_to_themselves(name):
    assert env.resolve_profile(name) == name.strip().lower()


def test_auto_profile_follows_the_gpu():
    expected = "full" if torch.cuda.is_available() else "smoke"
    assert env.resolve_profile("auto") == expected


def test_profile_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("PEFTLAB_PROFILE", "full")
    assert env.resolve_profile() == "full"
    monkeypatch.delenv("PEFTLAB_PROFILE")
    assert env.resolve_profile() == env.resolve_profile("auto")


def test_unknown_profile_says_what_to_set(monkeypatch):
    monkeypatch.setenv("PEFTLAB_PROFILE", "fast")
    with pytest.raises(ValueError, match=r"Unknown profile 'fast'.*PEFTLAB_PROFILE.*smoke, full, auto"):
        env.resolve_profile()


def test_device_cpu_and_bad_devices(monkeypatch):
    assert env.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("PEFTLAB_DEVICE", "cpu")
    assert env.resolve_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        env.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            env.resolve_device("cuda")


def test_seeding_repeats_random_draws():
    env.seed_everything(7)
    first = torch.rand(3)
    env.seed_everything(7)
    torch.testing.assert_close(torch.rand(3), first, rtol=0, atol=0)


def test_setup_prints_versions_and_picks_by_profile(capsys):
    run = env.setup(seed=3, profile="smoke", device="cpu")
    printed = capsys.readouterr().out
    assert f"torch {torch.__version__}" in printed and "profile: smoke" in printed
    assert run.pick(smoke=1, full=2) == 1 and not run.is_full
    assert env.Run("full", torch.device("cpu"), 0).pick(smoke=1, full=2) == 2


def test_missing_package_is_reported_not_raised():
    versions = env.package_versions(("torch", "surely-not-installed-package"))
    assert versions["surely-not-installed-package"] == "not installed"
    assert versions["torch"] == torch.__version__


def test_setup_hides_the_known_library_noise_and_nothing_else(monkeypatch):
    import logging
    import warnings

    monkeypatch.setattr(warnings, "filters", list(warnings.filters))  # restored after the test
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    monkeypatch.setattr(logger, "level", logger.level)
    env.setup(verbose=False)
    assert logger.getEffectiveLevel() == logging.ERROR
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        env.quiet_library_noise()
        warnings.warn("`is_gradient_checkpointing` is deprecated (...)", FutureWarning, stacklevel=1)
        warnings.warn("`past_key_values` is deprecated", FutureWarning, stacklevel=1)  # about the learner's code
    assert [str(w.message) for w in caught] == ["`past_key_values` is deprecated"]
