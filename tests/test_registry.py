"""Plugin discovery: built-ins via entry points, duplicates, broken plugins, unknown names."""

from __future__ import annotations

import warnings
from importlib.metadata import EntryPoint

import pytest

from modalforge import registry
from modalforge.plugin import Plugin


@pytest.fixture(autouse=True)
def fresh_discovery():
    registry.discover.cache_clear()
    yield
    registry.discover.cache_clear()


def test_builtin_causal_lm_is_discovered_through_entry_points():
    found = registry.discover()
    assert "causal_lm" in found
    item = found["causal_lm"]
    assert item.distribution == "modalforge"
    assert item.plugin.modality == "text"
    assert item.plugin.conf_package == "modalforge.plugins.text.causal_lm.conf"


def test_listing_names_package_and_description():
    table = registry.describe()
    assert "causal_lm" in table and "modalforge 0.1.0" in table and "next-token" in table


def _fake_entry_points(extra):
    real = list(registry.entry_points(group=registry.GROUP))

    def fake(group):
        assert group == registry.GROUP
        return real + extra

    return fake


class _Dist:
    def __init__(self, name):
        self.metadata = {"Name": name}
        self.version = "9.9"


def _ep(name, value, dist):
    ep = EntryPoint(name=name, value=value, group=registry.GROUP)
    return ep._for(_Dist(dist)) if hasattr(ep, "_for") else ep


def test_two_packages_with_one_name_is_an_error_naming_both(monkeypatch):
    dup = _ep("causal_lm", "modalforge.plugins.text.causal_lm:plugin", "someone-elses-lm")
    monkeypatch.setattr(registry, "entry_points", _fake_entry_points([dup]))
    with pytest.raises(registry.PluginError) as err:
        registry.discover()
    assert "someone-elses-lm" in str(err.value) and "modalforge" in str(err.value)


def test_broken_plugin_warns_and_others_still_work(monkeypatch):
    broken = _ep("broken", "no_such_module_anywhere:plugin", "broken-dist")
    monkeypatch.setattr(registry, "entry_points", _fake_entry_points([broken]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = registry.discover()
    assert "causal_lm" in found and "broken" not in found
    messages = " ".join(str(w.message) for w in caught)
    assert "broken" in messages and "broken-dist" in messages and "ModuleNotFoundError" in messages
    with pytest.raises(registry.PluginError, match="'broken' is installed but failed to load .*broken-dist"):
        registry.get("broken")  # selected by the user: fails loudly, naming the distribution


def test_unknown_plugin_error_lists_installed_ones():
    with pytest.raises(registry.PluginError) as err:
        registry.get("nope")
    assert "nope" in str(err.value) and "causal_lm" in str(err.value)


def test_env_var_restricts_loading(monkeypatch):
    monkeypatch.setenv(registry.ENV_FILTER, "builtin")
    found = registry.discover()
    assert "causal_lm" in found and all(i.distribution == "modalforge" for i in found.values())
    registry.discover.cache_clear()
    monkeypatch.setenv(registry.ENV_FILTER, "none_of_these")
    assert registry.discover() == {}


def test_plugin_record_is_importable_without_torch():
    import subprocess
    import sys

    code = ("import sys; import modalforge.registry as r; r.discover(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "listing plugins imported torch: plugin __init__ files must stay light"


def test_plugin_names_must_match_entry_point(monkeypatch):
    wrong = _ep("other_name", "modalforge.plugins.text.causal_lm:plugin", "x-dist")
    monkeypatch.setattr(registry, "entry_points", _fake_entry_points([wrong]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = registry.discover()
    assert "other_name" not in found
    assert any("other_name" in str(w.message) for w in caught)
    assert isinstance(found["causal_lm"].plugin, Plugin)


def test_missing_optional_dependency_names_the_extra():
    from modalforge.errors import missing_dependency

    try:
        try:
            raise ModuleNotFoundError("No module named 'open_clip'", name="open_clip")
        except ModuleNotFoundError as inner:
            raise RuntimeError("Error in call to target 'modalforge.plugins.vision.clip.data.CLIPDataModule'") from inner
    except RuntimeError as err:
        assert missing_dependency(err) == ("this plugin needs the package 'open_clip', which is not installed: "
                                           'pip install "modalforge[vision]"')
    assert missing_dependency(ValueError("other")) is None
