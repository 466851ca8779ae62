"""modalforge-sine: forecast noisy sine waves. The Plugin record only; no heavy imports."""

from modalforge.plugin import Plugin

plugin = Plugin(
    name="sine",
    modality="timeseries",
    description="example third-party plugin: GRU forecasting of noisy sine waves",
    conf_package="modalforge_sine.conf",
    datamodule="modalforge_sine.data.SineDataModule",
    objective="modalforge_sine.objective.SineObjective",
)
