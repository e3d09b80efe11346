"""dart_core: the DART method (MM '25) as a plain library — no Prefect. Local paths and s3://
go through dart_core.storage (boto3, imported only when an s3:// URL is used)."""
__version__ = "0.1.0"
