"""`bpp prune --attention-units heads`: the allocation policy over query-head slots (head j of every
KV group) instead of whole KV groups, end to end on a tiny model (2 groups of 3 heads), its budget,
the written model, and the option's errors."""
import json

import pytest
import torch

from bpp.errors import BppError
from bpp.jobs.prune import prune
from bpp.masks import Masks
from bpp.search import PruneConfig
from bpp.search.counts import attention_cost
from bpp.search.incumbent import Incumbent
from bpp.space import MaskSpace
from tests.conftest import FAST_CLI, cli

FAST = dict(steps=12, samples=4, batch_size=2, seq_len=32, init_windows=4, init_seq_len=32, sparsity=0.3,
            selection_windows=4, incumbent_every=3, group_every=3, attention_units="heads")


def _run(tiny_llama_dir, tiny_llama_loaded, out, checkpoint_every=20, **kw):
    model, tok = tiny_llama_loaded
    return prune(PruneConfig(model=str(tiny_llama_dir), **{**FAST, **kw}), out, model=model, tokenizer=tok,
                 progress=False, eval_windows=3, checkpoint_every=checkpoint_every)


@pytest.mark.parametrize("reconstruct", [True, False], ids=["reconstruct", "bias"])
def test_heads_run_prunes_slots_within_the_budget_and_writes_that_model(tiny_llama_dir, tiny_llama_loaded, tmp_path,
                                                                       reconstruct):
    out = tmp_path / "run"  # FLAP's init at 50% prunes KV groups: the search starts with pruned slots
    report = _run(tiny_llama_dir, tiny_llama_loaded, out, reconstruct=reconstruct, init="flap", sparsity=0.5)
    model = tiny_llama_loaded[0]
    space = MaskSpace.from_model(model)
    mask, init = Masks.load(out / "mask.safetensors"), Masks.load(out / "init_mask.safetensors")
    assert mask.heads is not None and init.heads is not None and tuple(mask.heads.shape) == (1, 2, 3)
    assert mask.groups.all() and init.groups.all()  # slots are pruned, groups stay whole
    assert not init.heads.all() and not mask.heads.all()
    slots = mask.effective().heads[0].sum(-1) * mask.effective().groups[0].any(-1)
    kept = float(attention_cost(space, slots.unsqueeze(0), "heads")[0]) + int(mask.channels.sum()) * space.channel_params
    assert kept <= (1 - 0.5) * space.prunable_params + 1e-6
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"channel", "group"}  # slot moves run as the group steps do
    assert json.loads((out / "allocation.json").read_text())["attention_units"] == "heads"
    assert report["params"]["final_mask"]["kept_query_heads"] == int(mask.kept_heads(3).sum())
    assert report["params"]["final_mask"]["params"] == int(space.params(mask)[0])
    # the written model is the mask's, and the reported perplexity is that model's
    from transformers import AutoModelForCausalLM

    from bpp.data import load_text, tokenize
    from bpp.evaluation import perplexity

    small = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    layers = json.loads((out / "model" / "bpp_compaction.json").read_text())["layers"]
    assert [s["query_heads"] for s in layers] == [int(mask.kept_heads(3)[0, s["layer"]].sum()) for s in layers]
    ids = tokenize(tiny_llama_loaded[1], load_text("default", "heldout"))
    ppl = perplexity(small, tiny_llama_loaded[1], ids, seq_len=128, max_windows=3)
    assert abs(ppl - report["perplexity"]["final_mask"]) < 1e-3 * report["perplexity"]["final_mask"]


def test_heads_from_the_command_line(tiny_llama_dir, tmp_path):
    code, err = cli("prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "r"), "--attention-units",
                    "heads", *FAST_CLI)
    assert code == 0, err
    assert Masks.load(tmp_path / "r" / "mask.safetensors").heads is not None
    assert json.loads((tmp_path / "r" / "config.json").read_text())["attention_units"] == "heads"


def test_the_default_run_has_no_slots(tiny_llama_dir, tmp_path):
    code, err = cli("prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "r"), *FAST_CLI)
    assert code == 0, err
    assert Masks.load(tmp_path / "r" / "mask.safetensors").heads is None


def test_incumbent_state_keeps_slots():
    mask = Masks(torch.ones(1, 2, 5, dtype=torch.bool), torch.ones(1, 2, 2, dtype=torch.bool),
                 torch.ones(1, 2, dtype=torch.bool), torch.tensor([[[True, False, True], [False, True, True]]]))
    inc = Incumbent(mask, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(Incumbent.from_state(inc.state()).mask.heads, mask.heads)


@pytest.mark.parametrize("changes, message", [
    (dict(attention_units="query"), "unknown attention units 'query'"),
    (dict(policy="units", init="flap", sparsity=0.95), "6 query-head slots in all, keeping 0 would prune every"),
    (dict(rank="init"), "use --rank flap"),
])
def test_bad_heads_options_are_one_line(tiny_llama_dir, tiny_llama_loaded, tmp_path, changes, message):
    with pytest.raises(BppError, match=message) as e:
        _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "bad", **changes)
    assert "\n" not in str(e.value)


def test_heads_on_a_model_with_one_head_per_group_is_refused(tmp_path, tokenizer):
    from tests.tiny import tiny_model

    model = tiny_model("llama", num_attention_heads=2, num_key_value_heads=2, head_dim=30)
    with pytest.raises(BppError, match="1 query head per group; use --attention-units groups") as e:
        prune(PruneConfig(**FAST), tmp_path / "mha", model=model, tokenizer=tokenizer, progress=False)
    assert "\n" not in str(e.value)


def test_a_stopped_heads_run_resumes_to_the_same_mask(tiny_llama_dir, tiny_llama_loaded, tmp_path, monkeypatch):
    from bpp.search.allocation import AllocationPolicy

    model, tok = tiny_llama_loaded
    kw = dict(init="flap", sparsity=0.5, steps=9, reconstruct=False)
    whole = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "whole", checkpoint_every=3, **kw)
    tell, calls = AllocationPolicy.tell, []

    def stop_at_the_eighth(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # after the checkpoint of step 6: the resumed run redoes steps 6 and 7
            raise KeyboardInterrupt
        return tell(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(AllocationPolicy, "tell", stop_at_the_eighth)
        with pytest.raises(KeyboardInterrupt):
            _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "cut", checkpoint_every=3, **kw)
    resumed = prune(out=tmp_path / "cut", resume=True, model=model, tokenizer=tok, progress=False)
    assert resumed["sessions"] == 2 and resumed["config"]["attention_units"] == "heads"
    for name in ("mask.safetensors", "init_mask.safetensors"):
        a, b = Masks.load(tmp_path / "whole" / name), Masks.load(tmp_path / "cut" / name)
        assert a == b and b.heads is not None
    assert json.loads((tmp_path / "cut" / "allocation.json").read_text()) == \
        json.loads((tmp_path / "whole" / "allocation.json").read_text())
    assert resumed["perplexity"]["final_mask"] == whole["perplexity"]["final_mask"]


def test_gemma3_heads_run(tmp_path, tokenizer):
    """Gemma 3 (270M: one KV group of 4 heads) is where slots matter most: there a group is a layer's
    whole attention. The tiny Gemma 3 has 2 groups of 2 heads."""
    from tests.tiny import tiny_gemma3

    report = prune(PruneConfig(**{**FAST, "init": "flap", "sparsity": 0.4, "dtype": "float32"}), tmp_path / "g",
                   model=tiny_gemma3(), tokenizer=tokenizer, progress=False, eval_windows=3)
    mask = Masks.load(tmp_path / "g" / "mask.safetensors")
    assert mask.heads is not None and tuple(mask.heads.shape) == (1, 3, 2)
    slots = (mask.heads[0].sum(-1) * mask.groups[0].any(-1)).tolist()
    config = json.loads((tmp_path / "g" / "model" / "config.json").read_text())
    kept = [s for s, c in zip(slots, mask.channels[0].sum(-1).tolist()) if s or c]
    assert config.get("heads_per_group_per_layer", [config["num_attention_heads"] // 2] * len(kept)) == kept
    assert report["perplexity"]["final_mask"] > 1


def test_evopress_heads_run(tiny_llama_dir, tiny_llama_loaded, tmp_path):
    report = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "e", policy="evopress", init="flap", sparsity=0.5,
                  evaluations=40, steps=None, reconstruct=False)
    mask = Masks.load(tmp_path / "e" / "mask.safetensors")
    assert mask.heads is not None and mask.groups.all() and not mask.heads.all()
    assert json.loads((tmp_path / "e" / "evolution.json").read_text())["attention_units"] == "heads"
    space = MaskSpace.from_model(tiny_llama_loaded[0])
    slots = mask.heads[0].sum(-1)
    kept = float(attention_cost(space, slots.unsqueeze(0), "heads")[0]) + int(mask.channels.sum()) * space.channel_params
    assert kept <= (1 - 0.5) * space.prunable_params + 1e-6 and report["evaluations"] > 0


def test_heads_run_with_the_hooks_engine_and_a_gguf_export(tiny_llama_dir, tmp_path):
    code, err = cli("prune", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "r"), "--attention-units", "heads",
                    "--engine", "hooks", "--objective", "nll", "--init", "flap", *FAST_CLI[:-4], "--sparsity", "0.5",
                    "--no-eval", "--quiet", "--export", "gguf")
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["export"]["path"] and (tmp_path / "r" / "model.gguf").is_file()
    assert Masks.load(tmp_path / "r" / "mask.safetensors").heads is not None


def test_units_policy_learns_head_slots(tiny_llama_dir, tiny_llama_loaded, tmp_path):
    """The per-unit policy: a Bernoulli θ per slot (L·r units, each costing its head in every group),
    from FLAP's slot fluctuations, within the count budget of each unit type."""
    report = _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "u", policy="units", init="wanda-sp", steps=6)
    out = tmp_path / "u"
    mask, init, theta = (Masks.load(out / f"{n}.safetensors") for n in ("mask", "init_mask", "theta"))
    assert mask.groups.all() and init.groups.all() and theta.heads.shape == (2, 3)
    slots = round(0.7 * 2 * 3)  # the count budget of the slots, as the official per-type counts
    assert int(init.heads.sum()) == slots and int(init.heads[0, 0].sum()) == int(init.heads[0, 1].sum())
    final = Masks.load(out / "deterministic_mask.safetensors") if (out / "deterministic_mask.safetensors").is_file() \
        else mask
    assert int(final.heads.sum()) == slots
    assert report["params"]["learned_units"] == 2 * (70 * 3 * 60 + 3 * 2 * 2 * 10 * 60)


def test_units_heads_with_an_init_that_reads_no_text(tiny_llama_dir, tiny_llama_loaded, tmp_path):
    """Slots start from FLAP's per-slot fluctuation, so the run calibrates even when neither its init
    (magnitude) nor bias compensation would."""
    _run(tiny_llama_dir, tiny_llama_loaded, tmp_path / "m", policy="units", init="magnitude",
         bias_compensation=False, steps=2)
    mask = Masks.load(tmp_path / "m" / "mask.safetensors")
    assert mask.heads is not None and mask.heads.shape == (1, 2, 3)


def test_units_budget_of_slots():
    from bpp.budget import Budget
    from tests.tiny import tiny_model

    space = MaskSpace.from_model(tiny_model("llama"))
    budget = Budget(space, "channel,group", 0.3, "count", attention_units="heads")
    assert budget.n_units == 2 * 70 + 2 * 3 and float(budget.costs[-1]) == 2 * space.head_params
    flat = torch.rand(4, budget.n_units) < 0.5
    masks = budget.to_masks(flat)
    assert masks.heads.shape == (4, 2, 3) and masks.groups.all()
    assert torch.equal(budget.from_masks(masks), flat)
    assert torch.equal(Budget(space, "channel,group", 0.3, "count").from_masks(Masks.full(space, 2)),
                       torch.ones(2, 2 * 70 + 2 * 2, dtype=torch.bool))
