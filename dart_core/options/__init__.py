"""Every command's options, declared once per command as a pydantic model (dart_core.options._fields
says what a field carries). The command line builds the object (flows.cli._command), the flow takes
it as its one parameter (a deployment's `parameters: {options: {...}}`, validated by Prefect with
the same bounds), and the library reads the fields it needs. Light on purpose: `dart --help`
imports these modules, and they import nothing of torch or the data plane."""
