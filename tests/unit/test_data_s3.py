"""Training data read from S3-compatible object storage (a real moto S3 server on
loopback): the same rows, hash and errors as a local file."""

import time

import boto3
import pytest

from services.core import objectstore
from services.core.data import file_sha256, load_labelled, load_pairs
from services.core.errors import DataError
from tests.unit.test_registry_s3 import BUCKET, s3_endpoint  # noqa: F401 (fixture)


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("TUNESERVE_CACHE", str(tmp_path / "cache"))
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    query = f"?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    return client, query


def test_labelled_data_from_s3_reads_like_the_local_file(s3, tmp_path):
    client, query = s3
    local = tmp_path / "train.tsv"
    local.write_text("text\tlabel\ngood film\tpos\nbad film\tneg\n")
    client.put_object(Bucket=BUCKET, Key="data/train.tsv", Body=local.read_bytes())
    uri = f"s3://{BUCKET}/data/train.tsv{query}"
    remote = load_labelled(uri)
    mine = load_labelled(local)
    assert (remote.texts, remote.labels, remote.sha256) == (mine.texts, mine.labels,
                                                           file_sha256(local))
    assert remote.path == f"s3://{BUCKET}/data/train.tsv"  # recorded without the query
    time.sleep(1.1)  # object stores date objects to the second
    client.put_object(Bucket=BUCKET, Key="data/train.tsv",
                      Body=b"text\tlabel\ngreat\tpos\nawful\tneg\nfine\tpos\n")
    assert load_labelled(uri).texts == ["great", "awful", "fine"]  # fetched again


def test_pairs_from_s3(s3):
    client, query = s3
    client.put_object(Bucket=BUCKET, Key="data/pairs.jsonl",
                      Body=b'{"prompt": "hi", "response": "hello"}\n')
    pairs = load_pairs(f"s3://{BUCKET}/data/pairs.jsonl{query}")
    assert (pairs.prompts, pairs.responses) == (["hi"], ["hello"])


def test_a_missing_object_or_credentials_in_the_uri_are_clear_errors(s3):
    _, query = s3
    with pytest.raises(DataError, match=f"s3://{BUCKET}/data/none.tsv: no such object"):
        load_labelled(f"s3://{BUCKET}/data/none.tsv{query}")
    with pytest.raises(DataError, match="no credentials in the URI") as err:
        objectstore.fetch(f"s3://AKIA:Secret@{BUCKET}/x.tsv{query}")
    assert "Secret" not in str(err.value)
