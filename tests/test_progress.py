"""Long preparation steps say when they start, show a bar while they run and say how long they took."""

import logging

import pytest

from modalforge.progress import is_rank_zero, preparing

LOGGER = "modalforge.progress"


@pytest.fixture(autouse=True)
def _rank_zero(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "MODALFORGE_PROGRESS"):
        monkeypatch.delenv(name, raising=False)


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_forced_bar_and_the_start_and_duration_lines(monkeypatch, caplog, capsys):
    monkeypatch.setenv("MODALFORGE_PROGRESS", "1")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with preparing("warming up", total=3, unit="step", cached_in="/cache/x") as step:
            for _ in step.track(range(3)):
                pass
            step.summary = "final loss 0.5"
    assert step.done == 3
    err = capsys.readouterr().err
    assert "warming up" in err and "3/3" in err
    start, end = _messages(caplog)
    assert start == "warming up: 3 steps (this runs once; cached under /cache/x)"
    assert end.startswith("warming up: done in ") and end.endswith(" s (final loss 0.5)")


def test_no_bar_off_a_terminal_but_the_lines_still(caplog, capsys):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with preparing("tokenising", total=2) as step:
            step.update(2)
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal: tqdm's disable=None
    assert _messages(caplog)[0] == "tokenising: 2 items" and "done in" in _messages(caplog)[1]


def test_a_failing_step_says_when_it_stopped(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER), pytest.raises(ValueError):
        with preparing("header pass", total=None):
            raise ValueError("bad file")
    assert _messages(caplog)[0] == "header pass: started" and "stopped after" in _messages(caplog)[1]


@pytest.mark.parametrize("name", ["RANK", "LOCAL_RANK"])
def test_no_bar_on_other_ranks_only_their_lines(monkeypatch, caplog, capsys, name):
    monkeypatch.setenv(name, "1")
    monkeypatch.setenv("MODALFORGE_PROGRESS", "1")
    assert not is_rank_zero()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with preparing("warming up", total=3) as step:
            for _ in step.track(range(3)):
                pass
    assert step.done == 3  # the work is counted, only no bar is drawn
    assert capsys.readouterr().err == ""
    assert _messages(caplog)[0] == "warming up: 3 items" and "done in" in _messages(caplog)[1]


def test_the_media_header_pass_reports_its_start_and_duration(tmp_path, monkeypatch, caplog, capsys):
    from PIL import Image

    from modalforge.data.images import ImageRef, image_problem
    from modalforge.data.verify import verify_media

    refs = []
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        refs.append(ImageRef(path=str(tmp_path / f"{i}.png")))
    monkeypatch.setenv("MODALFORGE_PROGRESS", "1")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert verify_media(refs, image_problem, lambda r: r.describe(), what="data.train", verify=True,
                            kind="image") == refs
    start, end = _messages(caplog)
    assert start == "data.train: checking image headers: 4 images"
    assert end.startswith("data.train: checking image headers: done in ") and "data.verify=false" in end
    assert "4/4" in capsys.readouterr().err


def test_the_rl_warm_start_reports_its_start_and_duration_and_is_silent_once_cached(tmp_path, caplog):
    from modalforge.rl.warmstart import arithmetic_policy_dir

    config = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128}
    settings = dict(steps=2, batch_size=4, vocab_size=300, cache_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        folder = arithmetic_policy_dir(config, **settings)
    lines = [m for m in _messages(caplog) if m.startswith("rl: warm-starting")]
    assert lines[0] == ("rl: warm-starting the arithmetic policy by SFT: 2 steps "
                        f"(this runs once; cached under {folder.parent})")
    assert "done in" in lines[1] and "2 steps, final loss" in lines[1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert arithmetic_policy_dir(config, **settings) == folder
    assert _messages(caplog) == []


def test_the_diffusion_latent_cache_and_the_demo_images_report_their_steps(tmp_path, caplog):
    from modalforge.plugins.vision.diffusion.data import DiffusionDataModule

    dm = DiffusionDataModule(batch_size=4, cache_latents=True, cache_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        dm.setup()
        path = dm.attach_latents(lambda pixels: pixels[:, :1, ::8, ::8], "test-encoder", batch_size=256)
    messages = _messages(caplog)
    writing = [m for m in messages if m.startswith("writing the synthetic shapes demo")]
    encoding = [m for m in messages if m.startswith("diffusion: encoding the training images")]
    assert len(writing) == 2 and "done in" in writing[1]
    assert encoding[0].endswith(f"(this runs once; cached under {path.parent.parent})") and "done in" in encoding[1]
    assert dm.train_set.latents.shape[1:] == (1, 4, 4)
