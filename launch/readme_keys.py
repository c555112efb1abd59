"""Rewrite the README's recipe-key table from the recipe schema (ftdist/config/schema.py) (run after adding a key)."""

from pathlib import Path

from ftdist.config import config_markdown

readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text()
head, rest = text.split("<!-- keys:start -->")
_, tail = rest.split("<!-- keys:end -->")
readme.write_text(f"{head}<!-- keys:start -->\n{config_markdown()}\n<!-- keys:end -->{tail}")
