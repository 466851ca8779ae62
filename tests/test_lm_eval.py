"""``modalforge eval <final/> --lm-eval tasks=...``: lm-evaluation-harness on a local task over a local file.

Hubs are unreachable here, so the task is a YAML the test writes (``dataset_path: json`` over a jsonl),
found through ``--include-path``; the model is a tiny Llama saved like a run's ``final/``.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from cli_helpers import run_cli
from tiny_models import save_tiny_llama

DOCS = 6
TASK = "toy_sums"


def _write_task(folder) -> None:
    """A multiple-choice task over a jsonl: which sum is right."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "docs.jsonl").open("w") as handle:
        for a in range(1, DOCS + 1):
            handle.write(json.dumps({"question": f"{a} + {a + 2} =", "choices": [str(2 * a + 2), str(2 * a + 5)],
                                     "label": 0}) + "\n")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """run/final/ (full weights, in a run directory), adapter/ (a LoRA on base/) and tasks/."""
    pytest.importorskip("lm_eval")
    root = tmp_path_factory.mktemp("lm_eval")
    run = root / "run"
    save_tiny_llama(run / "final")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("plugin:\n  name: causal_lm\n")
    save_tiny_llama(root / "base")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    torch.manual_seed(1)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    lora.save_pretrained(str(root / "adapter"))
    AutoTokenizer.from_pretrained(str(root / "base")).save_pretrained(str(root / "adapter"))
    _write_task(root / "tasks")
    return root


def _env(root) -> dict:
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(root / "hf_datasets"), "OMP_NUM_THREADS": "1"}


def _check(proc, report_file, docs: int) -> dict:
    row = next(line.split() for line in proc.stdout.splitlines() if line.startswith(TASK))
    assert row[1] == "acc" and 0.0 <= float(row[2]) <= 1.0 and int(row[4]) == docs, proc.stdout
    report = json.loads(report_file.read_text())
    result = report["results"][TASK]
    assert 0.0 <= result["acc,none"] <= 1.0
    assert report["n-samples"][TASK]["effective"] == docs
    assert float(row[2]) == pytest.approx(result["acc,none"], abs=1e-4)
    return report


def test_lm_eval_on_a_run_dir_scores_its_final_with_a_local_task(models):
    proc = run_cli("modalforge", "eval", str(models / "run"), "--lm-eval", f"tasks={TASK}",
                   "--include-path", str(models / "tasks"), "--device", "cpu", "--batch-size", "4",
                   env=_env(models))
    out = models / "run" / "eval" / "lm_eval"  # a run directory stands for its final/; its eval/ holds the scores
    report = _check(proc, out / "lm_eval.json", DOCS)
    assert report["modalforge"]["model"] == str(models / "run" / "final") and report["modalforge"]["base_model"] is None
    assert "task" in proc.stdout and "stderr" in proc.stdout

    # the output is a run to `modalforge compare`: the metric is a column of its table
    compared = run_cli("modalforge", "compare", str(out), "--out", str(models / "compare"))
    assert f"val/lm_eval/{TASK}/acc (max)" in compared.stdout and "causal_lm" in compared.stdout


def test_lm_eval_on_a_peft_adapter_folder_loads_it_on_its_base(models):
    out = models / "adapter_scores"
    proc = run_cli("modalforge", "eval", str(models / "adapter"), "--lm-eval", TASK, "--limit", "4",
                   "--include-path", str(models / "tasks"), "--device", "cpu", "--out", str(out), env=_env(models))
    report = _check(proc, out / "lm_eval.json", 4)
    assert report["modalforge"]["base_model"] == str(models / "base")


def test_lm_eval_mistakes_are_one_error_line(models):
    env = _env(models)
    unknown = run_cli("modalforge", "eval", str(models / "run" / "final"), "--lm-eval", "tasks=toy_sum",
                      "--include-path", str(models / "tasks"), check=False, env=env)
    assert unknown.returncode == 2 and f"did you mean '{TASK}'" in unknown.stderr, unknown.stderr
    stray = run_cli("modalforge", "eval", str(models / "run"), "--limit", "3", check=False, env=env)
    assert stray.returncode == 2 and "error: --limit: is an lm_eval setting" in stray.stderr, stray.stderr


def test_without_lm_eval_installed_the_error_names_the_extra(tmp_path, monkeypatch, capsys):
    from modalforge.cli import main

    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ModuleNotFoundError
    with pytest.raises(SystemExit) as stopped:
        main(["eval", str(folder), "--lm-eval", "tasks=anything"])
    assert stopped.value.code == 2
    assert 'pip install "modalforge[eval]"' in capsys.readouterr().err
