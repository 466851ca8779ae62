"""Audio seconds per second: training vs data loading alone, for whisper_asr and wav2vec2.

For each plugin, in one run: the training rate of `train plugin=...` (steps/s times
the audio seconds in a batch) and the rate of its dataloader alone (decode with
soundfile, resample with torchaudio, features with the HF feature extractor). A
loading / training ratio above 1 means the model bounds the run; below 1, the data.

    python benchmarks/audio_throughput.py --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

from hydra.utils import instantiate

from _common import framework_rate
from modalforge.config import compose
from modalforge.data.audio import load_audio


def seconds_per_batch(plugin: str, dm) -> float:  # noqa: ANN001
    """Mean audio seconds in a training batch (before padding; crops counted at their cropped length)."""
    if plugin == "whisper_asr":
        clips = [load_audio(u.audio, 16000) for u in dm.train_set.items[:200]]
        return dm.batch_size * statistics.mean(len(c) / 16000 for c in clips)
    clips = [min(len(load_audio(ref, 16000)), dm.train_set.max_samples) for ref in dm.train_set.clips[:200]]
    return dm.batch_size * statistics.mean(clips) / 16000


def loading_rate(dm, batches: int) -> float:  # noqa: ANN001
    """Batches per second of the dataloader alone."""
    loader = iter(dm.train_dataloader())
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for plugin in ("whisper_asr", "wav2vec2"):
        dm = instantiate(compose([f"plugin={plugin}"]).data)
        dm.setup()
        per_batch = seconds_per_batch(plugin, dm)
        train, load = [], []
        for i in range(args.repeats):
            train.append(framework_rate([f"plugin={plugin}", f"seed={i}", f"trainer.max_steps={args.steps}"])
                         * per_batch)
            load.append(loading_rate(dm, min(args.steps, len(dm.train_set) - 1)) * per_batch)
            print(f"{plugin} repeat {i}: training {train[-1]:8.1f} audio s/s, loading alone {load[-1]:8.1f} audio s/s")
        ratio = statistics.median(b / a for a, b in zip(train, load))
        print(f"{plugin}: training {statistics.median(train):.1f} audio s/s, data loading {statistics.median(load):.1f} "
              f"audio s/s; loading / training = {ratio:.1f} ({'model' if ratio > 1 else 'data'}-bound)\n")


if __name__ == "__main__":
    main()
