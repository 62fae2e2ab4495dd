"""The shipped JSON Schemas are valid Draft 2020-12 schemas (ckptx does not re-check them at run time)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from ckptx._data import schema_path


@pytest.mark.parametrize("name", ["ckptx-rules.schema.json", "ckptx-jobs.schema.json"])
def test_shipped_schema_is_a_valid_draft_2020_12_schema(name: str) -> None:
    schema = json.loads(schema_path(name).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
