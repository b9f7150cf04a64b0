"""The command line is a thin layer: every option of every command is an argument of the job
function it calls (or of that job's configuration), so a Python user can do what the command does."""
import dataclasses
import inspect

import pytest
import typer.main

import bpp
from bpp.cli import app
from bpp.methods.recovery_config import RecoverConfig
from bpp.search import PruneConfig

JOBS = {
    "prune": (bpp.prune, PruneConfig),
    "baseline": (bpp.baseline, None),
    "compact": (bpp.compact, None),
    "recover": (bpp.recover, RecoverConfig),
    "eval": (bpp.evaluate_model, None),
    "report": (bpp.write_report, None),
    "export": (bpp.export_gguf, None),
}
# CLI spellings of job arguments, and options that only shape the terminal output
CLI_NAMES = {("prune", "resume"): "resume", ("prune", "quiet"): "progress", ("baseline", "method"): "method",
             ("compact", "mask"): "masks", ("recover", "model"): "model_dir", ("recover", "targets"): "target_modules",
             ("recover", "no_eval"): "evaluate", ("recover", "quiet"): "progress", ("report", "runs"): "dirs",
             ("export", "model"): "model_dir", ("export", "quiet"): "progress",
             ("export", "format"): None}  # None: chooses the job function (bpp.export_gguf for gguf)


def _command(name):
    group = typer.main.get_command(app)
    return group.commands[name]


@pytest.mark.parametrize("name", sorted(JOBS))
def test_every_option_is_an_argument_of_the_job(name):
    job, config_class = JOBS[name]
    accepted = set(inspect.signature(job).parameters)
    if config_class is not None:
        accepted |= {f.name for f in dataclasses.fields(config_class)}
    if name == "recover":
        from bpp.jobs.recover import RUN_DEFAULTS

        accepted |= set(RUN_DEFAULTS)
    if name == "prune":
        accepted |= {"progress"}
    missing = [p.name for p in _command(name).params
               if CLI_NAMES.get((name, p.name), p.name) not in accepted | {None} and p.name != "ctx"]
    assert missing == [], f"bpp {name} options with no job argument: {missing}"


def test_every_command_has_a_job():
    assert set(typer.main.get_command(app).commands) == set(JOBS)
