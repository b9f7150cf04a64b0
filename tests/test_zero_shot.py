"""lm-evaluation-harness integration, tested offline with a small task built from local files."""
import json
from pathlib import Path

import pytest
import torch

from bpp.errors import BppError
from tests.tiny import tiny_model

pytest.importorskip("lm_eval")
DATA = Path(__file__).parent / "data" / "lm_eval_tasks" / "bpp_local_choice.jsonl"


@pytest.fixture
def task_dir(tmp_path):
    (tmp_path / "bpp_local_choice.yaml").write_text(f"""
task: bpp_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return tmp_path


def _manual_accuracy(model, tokenizer):
    """Pick the choice with the highest summed log-likelihood after the prompt, as lm-eval does."""
    correct = 0
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        scores = []
        for choice in row["choices"]:
            ctx = tokenizer(context).input_ids
            whole = tokenizer(context + " " + choice).input_ids
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits[0, :-1].log_softmax(-1)
            scores.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    return correct / len(rows)


def test_zero_shot_local_task_matches_a_manual_loglikelihood_count(task_dir, tokenizer):
    from bpp.evaluation import zero_shot

    model = tiny_model("llama", seed=1)
    result = zero_shot(model, tokenizer, ["bpp_local_choice"], include_path=str(task_dir))
    row = result["bpp_local_choice"]
    assert row["n"] == 6 and row["num_fewshot"] == 0
    assert row["acc"] == pytest.approx(_manual_accuracy(model, tokenizer))


def test_unknown_task_is_a_clear_error(task_dir, tokenizer):
    from bpp.evaluation import zero_shot

    with pytest.raises(BppError, match="unknown lm-eval task.*no_such_task"):
        zero_shot(tiny_model("llama"), tokenizer, ["no_such_task"], include_path=str(task_dir))


def test_paper_task_names_are_known_to_lm_eval():
    from lm_eval.tasks import TaskManager

    from bpp.evaluation import FEW_SHOT, ZERO_SHOT_TASKS

    known = set(TaskManager().all_tasks)
    assert set(ZERO_SHOT_TASKS) | set(FEW_SHOT) <= known
