"""Datasets of the local lm-eval tasks, read from the JSONL files beside this file."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def rows(name: str) -> list[dict]:
  return [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]


def multiple_choice(**kwargs) -> dict:
  return {"test": datasets.Dataset.from_list(rows("mc.jsonl"))}


def perplexity(**kwargs) -> dict:
  return {"test": datasets.Dataset.from_list(rows("ppl.jsonl"))}
