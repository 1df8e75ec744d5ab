"""What validate reports matches what process does: the real JSON column, and duplicates after normalisation."""

from conftest import write_jsonl

MESSAGES = {"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Name a color."}, {"from": "gpt", "value": "Blue."}]}
SPACED = {"messages": [{"role": "user", "content": " Name a color.\r\n"}, {"role": "assistant", "content": "Blue."}]}
OTHER = {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7"}


def test_bad_json_reports_the_column_on_the_broken_line(client, settings):
    truncated = '{"messages": [{"role": "user", "content": "Name a color."}, {'
    write_jsonl(settings.data_dir / "bad.jsonl", [MESSAGES, truncated])
    body = client.post("/api/data/validate", json={"file_path": "bad.jsonl"}).json()
    [error] = body["errors"]
    assert error["line"] == 2
    assert f"column {len(truncated) + 1}" in error["reason"], error["reason"]


def test_validate_counts_and_names_the_duplicates_process_drops(client, settings):
    records = [MESSAGES, OTHER, SHAREGPT, SPACED, OTHER, {"messages": [MESSAGES["messages"][0]]}]
    write_jsonl(settings.data_dir / "dups.jsonl", records)
    report = client.post("/api/data/validate", json={"file_path": "dups.jsonl"}).json()
    # ShareGPT and the spaced copy normalise to line 1's conversation; line 5 repeats line 2; line 6 is invalid.
    expected = [{"line": 3, "duplicate_of": 1}, {"line": 4, "duplicate_of": 1}, {"line": 5, "duplicate_of": 2}]
    assert report["duplicate_count"] == 3 and report["duplicates"] == expected
    assert report["invalid_count"] == 1
    done = client.post("/api/data/process", json={"input_file": "dups.jsonl", "output_dir": "dups"}).json()
    assert done["duplicates_dropped"] == report["duplicate_count"]
    assert done["duplicates"] == report["duplicates"]
    assert done["kept"] == 2
