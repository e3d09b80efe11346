"""dart_core: the DART method (MM '25) as a plain library — no Prefect, no boto3."""
__version__ = "0.1.0"
