"""DuckDB SQL over the prediction tables (views, evaluation, label audit). Load with `load(name)`."""
from pathlib import Path

DIR = Path(__file__).resolve().parent


def load(name: str) -> str:
    return (DIR / f"{name}.sql").read_text()
