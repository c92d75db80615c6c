"""Parses a Prometheus text exposition (standard input) with the reference
Python client's parser and prints every sample as JSON lines:
{"name": ..., "labels": {...}, "value": ...}. Exits non-zero (with the
parser's error) if the text is not valid exposition format."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

text = sys.stdin.read()
for family in text_string_to_metric_families(text):
    for sample in family.samples:
        print(json.dumps({"name": sample.name, "type": family.type,
                          "labels": sample.labels, "value": sample.value}))
