"""results_digest is the sha256 of results.json's bytes as written; tool_identity names the commit."""

import hashlib
import json

from report_fixtures import make_results
from robaudit.audit.integrity import file_digest, results_digest, tool_identity
from robaudit.audit.results_schema import results_json_text


def test_results_digest_is_sha256_of_the_written_file(tmp_path):
    results = make_results()
    path = tmp_path / "results.json"
    path.write_text(results_json_text(results), encoding="utf-8")
    assert results_digest(results) == hashlib.sha256(path.read_bytes()).hexdigest() == file_digest(path)
    # read back, the same digest: a reviewer can recompute it from the file alone
    assert results_digest(json.loads(path.read_text())) == results_digest(results)


def test_results_digest_changes_with_any_number():
    results = make_results()
    before = results_digest(results)
    results["attacks"]["clean"]["avg"] += 1e-9
    assert results_digest(results) != before


def test_tool_identity_names_version_and_commit_when_in_a_checkout():
    ident = tool_identity()
    assert ident["name"] == "robaudit" and ident["version"]
    assert ident["commit"] is None or len(ident["commit"].split("+")[0]) == 12
