"""Print a deployment's parameters with some options changed, as JSON for `prefect deployment run --params`.

    prefect deployment run pipeline/gpu --params "$(python infra/run_params.py pipeline/gpu nproc=4)"
    prefect deployment run annotate/nightly --params "$(python infra/run_params.py annotate/nightly batch_size=8)"

Every flow of dart-annotate takes one parameter, `options` (dart_core/options/), and Prefect
replaces a parameter whole: `--param options=...` would drop the deployment's other options. This
reads the deployment's parameters from the Prefect API (PREFECT_API_URL), changes the named fields
of `options` (each VALUE read as YAML: 4 is a number, true a bool, [3, 5] a list, text stays text)
and prints the whole object. An unknown field is refused here, naming it, not when the run starts.
"""
from __future__ import annotations

import json
import sys

import yaml

# the flow of each deployment entrypoint, and its options object
OPTIONS = {
    "annotate": "dart_core.options.annotate:AnnotateOptions",
    "refresh": "dart_core.options.data:RefreshOptions",
    "pipeline": "dart_core.options.pipeline:PipelineOptions",
}


def options_class(flow_name: str):
    import importlib

    module, name = OPTIONS[flow_name].split(":")
    return getattr(importlib.import_module(module), name)


def changed_parameters(parameters: dict, flow_name: str, changes: list[str]) -> dict:
    """`parameters` with `options` updated by FIELD=VALUE changes; raises ValueError naming a bad one."""
    fields = options_class(flow_name).model_fields
    options = dict(parameters.get("options") or {})
    for change in changes:
        field, sep, value = change.partition("=")
        if not sep:
            raise ValueError(f"{change!r}: give FIELD=VALUE")
        if field not in fields:
            raise ValueError(f"{field!r} is not an option of the {flow_name} flow (one of: {', '.join(fields)})")
        options[field] = yaml.safe_load(value)
    return {**parameters, "options": options}


def main(argv: list[str]) -> int:
    if len(argv) < 1 or "/" not in argv[0]:
        print("usage: python infra/run_params.py FLOW/DEPLOYMENT FIELD=VALUE ...", file=sys.stderr)
        return 2
    from prefect.client.orchestration import get_client

    name = argv[0]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
    try:
        print(json.dumps(changed_parameters(deployment.parameters, name.split("/")[0], argv[1:])))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # the repository's packages
    raise SystemExit(main(sys.argv[1:]))
