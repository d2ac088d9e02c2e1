"""The atomic JSON writer that run directories and the CLI's --json use."""

import json

from loraprune_jax.io.jsonfile import write_json


def test_write_json_is_sorted_indented_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    write_json(path, {"b": 1.5, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1.5\n}\n'
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    write_json(str(path), [3])  # a str path too
    assert json.loads(path.read_text()) == [3]
