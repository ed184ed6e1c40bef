"""The batch file format: which lines are requests, what a rerun skips, and an interrupted output."""

from __future__ import annotations

import json

from workflows.batch_file import BatchRequest, InvalidLine, error_record, read_done, read_requests, response_record
from workflows.run_batch import trim_partial_line


def line(custom_id="q", method="POST", url="/v1/completions", body=None, **extra) -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url,
                       "body": {"model": "m", "prompt": "1"} if body is None else body, **extra})


def test_each_bad_line_is_named_and_the_rest_run():
    items = list(read_requests([
        line("a"), "", "{not json", json.dumps([1]), line(""), line("b", method="GET"), line("c", url="/v1/embeddings"),
        line("a"), line("d", body={"model": "m", "prompt": "1", "stream": True}), line("e", extra_field=1),
        json.dumps({"custom_id": "f", "method": "POST"}), line("g", body=[1]), line("h", url="/v1/chat/completions"),
    ]))
    assert [(i.line, i.custom_id) for i in items if isinstance(i, BatchRequest)] == [(1, "a"), (13, "h")]
    codes = {i.line: i.code for i in items if isinstance(i, InvalidLine)}
    assert codes == {3: "invalid_json", 4: "invalid_request", 5: "invalid_request", 6: "invalid_method",
                     7: "invalid_url", 8: "duplicate_custom_id", 9: "invalid_request", 10: "invalid_request",
                     11: "invalid_request", 12: "invalid_request"}
    messages = {i.line: i.message for i in items if isinstance(i, InvalidLine)}
    assert "Missing field(s): url, body" in messages[11] and "stream" in messages[9]


def test_a_rerun_skips_what_the_output_holds(tmp_path):
    requests = list(read_requests([line("a"), line("b"), "oops", line("a")]))
    a, b, bad, duplicate = requests
    output = tmp_path / "out.jsonl"
    output.write_text("\n".join(json.dumps(r) for r in (
        response_record(a, 200, {"choices": []}, "cmpl-1"), error_record(bad), error_record(duplicate))) + "\n")
    done = read_done(output)
    assert done.covers(a) and not done.covers(b) and done.covers(bad) and done.covers(duplicate)
    # A duplicate of an answered id that was never reported is reported on the rerun.
    assert not read_done(tmp_path / "missing.jsonl").covers(duplicate)


def test_a_line_cut_short_by_an_interruption_is_dropped(tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_text('{"custom_id":"a","response":{}}\n{"custom_id":"b","resp')
    trim_partial_line(output)
    assert output.read_text() == '{"custom_id":"a","response":{}}\n'
    assert read_done(output).custom_ids == {"a"}
