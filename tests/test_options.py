"""One options object per command: the typer command is built from its fields (flows/cli/_command.py),
the flow takes it as its one parameter, the deployments give it as `options`, and a bad value is
refused the same way from the command line and from a deployment run."""
import inspect
import sys
from pathlib import Path
from typing import Annotated, Literal

import pytest
import typer
import yaml
from pydantic import AfterValidator, Field, ValidationError
from typer.testing import CliRunner

from dart_core.options._fields import Cli, Options, share
from tests.conftest import REPO


class Example(Options):
    """A model with one field of each kind the commands use."""

    source: Annotated[str, Cli(argument=True)] = Field(description="Where from.")
    out: str = Field(description="Where to.")
    batch_size: int = Field(64, ge=1, description="Items per step.")
    rate: Annotated[float, AfterValidator(share)] = Field(0.5, description="A share.")
    ks: Annotated[list[Annotated[int, Field(ge=1)]], Cli("--k")] = Field([3, 5], description="Ks.")
    nproc: Annotated[int, Cli("--nproc", "--gpus")] = Field(1, ge=1, description="Processes.")
    arm: Annotated[bool, Cli("--arm/--no-arm")] = Field(True, description="With the ARM.")
    legacy: bool = Field(False, description="Old style.")
    mode: Literal["new", "append"] = Field("new", description="How.")
    workers: int | None = Field(None, ge=1, description="Workers.")
    seed: Annotated[int, Cli(hidden=True)] = 7


def example_app():
    from flows.cli._command import options_command

    app, got = typer.Typer(), []

    @app.callback()
    def _group() -> None:
        pass

    @options_command(app, Example)
    def run(options: Example) -> None:
        """Run the example."""
        got.append(options)

    return app, got


def test_the_command_is_built_from_the_fields():
    app, got = example_app()
    r = CliRunner().invoke(app, ["run", "SRC", "--out", "o", "--batch-size", "8", "--rate", "0.25", "--k", "1",
                                 "--k", "10", "--gpus", "2", "--no-arm", "--legacy", "--mode", "append",
                                 "--workers", "3"])
    assert r.exit_code == 0, r.output
    assert got == [Example(source="SRC", out="o", batch_size=8, rate=0.25, ks=[1, 10], nproc=2, arm=False,
                           legacy=True, mode="append", workers=3, seed=7)]
    r = CliRunner().invoke(app, ["run", "SRC", "--out", "o"])  # the fields' defaults
    assert r.exit_code == 0 and got[-1] == Example(source="SRC", out="o")
    text = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    assert "Items per step." in text and "--no-arm" in text and "--gpus" in text and "--seed" not in text


@pytest.mark.parametrize("args, message, fields", [
    (["--batch-size", "0"], "Invalid value for '--batch-size': Input should be greater than or equal to 1", {"batch_size": 0}),
    (["--rate", "1.5"], "Invalid value for '--rate': 1.5 is not a share in (0, 1]", {"rate": 1.5}),
    (["--k", "3", "--k", "0"], "Invalid value for '--k': Input should be greater than or equal to 1", {"ks": [3, 0]}),
    (["--mode", "other"], "Invalid value for '--mode'", {"mode": "other"}),
    (["--seed", "1"], "No such option: --seed", None),  # hidden: the command does not offer it
])
def test_a_bad_value_is_refused_by_both_doors(args, message, fields):
    app, got = example_app()
    r = CliRunner().invoke(app, ["run", "SRC", "--out", "o", *args])
    assert r.exit_code == 2 and message in r.output and got == []
    if fields:
        with pytest.raises(ValidationError):  # a deployment run's parameters: the same bounds
            Example(source="SRC", out="o", **fields)


def test_paths_are_taken_as_text_and_unknown_names_refused(tmp_path):
    assert Example(source=tmp_path, out=tmp_path / "o").out == str(tmp_path / "o")
    with pytest.raises(ValidationError, match="batch\n  Extra inputs are not permitted"):
        Example(source="s", out="o", batch=8)


COMMANDS = {  # command -> (options class, flow)
    ("annotate",): ("dart_core.options.annotate:AnnotateOptions", "flows.annotate:annotate_flow"),
    ("eval",): ("dart_core.options.annotate:EvalOptions", "flows.evaluate:evaluate_flow"),
    ("audit",): ("dart_core.options.annotate:AuditOptions", "flows.evaluate:audit_flow"),
    ("train",): ("dart_core.options.train:TrainOptions", "flows.train:train_flow"),
    ("shard",): ("dart_core.options.data:ShardOptions", "flows.shard:shard"),
    ("refresh",): ("dart_core.options.data:RefreshOptions", "flows.refresh:refresh"),
    ("crg", "mine"): ("dart_core.options.crg:MineOptions", "flows.crg:mine_crg"),
    ("pipeline",): ("dart_core.options.pipeline:PipelineOptions", "flows.pipeline:pipeline_flow"),
    ("demo",): ("dart_core.options.demo:DemoOptions", "flows.demo:demo_flow"),
}


def load(ref: str):
    import importlib

    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("command", list(COMMANDS), ids=" ".join)
def test_each_command_flow_and_options_object_agree(command):
    """The command offers exactly the object's visible fields, under their flags; the flow's one
    parameter is the object."""
    from flows.cli import app

    options_cls, flow = (load(ref) for ref in COMMANDS[command])
    cmd = typer.main.get_command(app)
    for name in command:
        cmd = cmd.commands[name]
    offered = {p.name: p for p in cmd.params if p.name != "help"}
    visible = {name: f for name, f in options_cls.model_fields.items()
               if not any(isinstance(m, Cli) and m.hidden for m in f.metadata)}
    assert set(offered) == set(visible), command
    for name, f in visible.items():
        cli = next((m for m in f.metadata if isinstance(m, Cli)), Cli())
        flags = [x for decl in cli.flags for x in decl.split("/")][:1] or ["--" + name.replace("_", "-")]
        p = offered[name]
        assert (p.param_type_name == "argument") == cli.argument, (command, name)
        if not cli.argument:
            assert flags[0] in p.opts, (command, name, p.opts)
        assert p.help == f.description or cli.argument, (command, name)
        if not f.is_required():
            default = f.get_default(call_default_factory=True)
            assert p.default == default or (isinstance(default, list) and list(p.default or []) == default), (
                command, name)
    params = list(inspect.signature(flow.fn).parameters.values())
    assert params[0].name == "options" and params[0].annotation in (options_cls, options_cls.__name__)
    assert all(p.default is not inspect.Parameter.empty for p in params[1:])  # details=... switches only


def test_deployments_give_each_flow_its_options_object():
    doc = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    entry = {ref.split(":")[1]: opts for (opts, ref) in COMMANDS.values()}
    assert doc["deployments"]
    for d in doc["deployments"]:
        assert set(d["parameters"]) == {"options"}, d["name"]
        flow_fn = d["entrypoint"].split(":")[1]
        options_cls = load(entry[flow_fn])
        values = {k: ("/x" if isinstance(v, str) and "{{" in v else v) for k, v in d["parameters"]["options"].items()}
        options_cls(**{**values, **({"format": "folder"} if "format" in values else {})})  # every name is a field


def test_run_params_changes_fields_and_names_an_unknown_one():
    sys.path.insert(0, str(REPO / "infra"))
    try:
        from run_params import changed_parameters
    finally:
        sys.path.remove(str(REPO / "infra"))
    deployed = {"options": {"source": "/data", "format": "folder", "out": "/w", "nproc": 8}}
    got = changed_parameters(deployed, "pipeline", ["nproc=4", "ks=[1, 3]", "pretrained=openai", "audit=false"])
    assert got == {"options": {"source": "/data", "format": "folder", "out": "/w", "nproc": 4, "ks": [1, 3],
                               "pretrained": "openai", "audit": False}}
    assert deployed["options"]["nproc"] == 8  # the deployment's own copy is untouched
    with pytest.raises(ValueError, match="'gpus' is not an option of the pipeline flow"):
        changed_parameters(deployed, "pipeline", ["gpus=4"])
    with pytest.raises(ValueError, match="give FIELD=VALUE"):
        changed_parameters(deployed, "annotate", ["batch_size"])
    assert Path(REPO / "infra" / "run_params.py").is_file()
