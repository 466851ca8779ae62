"""The sine plugin checks itself with modalforge's conformance suite."""

from modalforge.testing import assert_plugin_conforms


def test_sine_conforms(tmp_path):
    report = assert_plugin_conforms("sine", tmp_path, steps=20)
    assert report.losses[-1] < report.losses[0]


def test_sine_conforms_with_lora(tmp_path):
    report = assert_plugin_conforms("sine", tmp_path, ["adapter=lora"], steps=20)
    assert all("lora" in name for name in report.changed)
