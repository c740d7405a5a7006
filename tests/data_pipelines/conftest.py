"""Buckets and prefixes on the session's S3 server (tests/conftest.py) for the data-pipeline tests."""

import itertools

import pytest

_prefix_numbers = itertools.count()


@pytest.fixture(scope="session")
def test_bucket(s3_server):
    return s3_server.create_bucket("vitscale-tests")


@pytest.fixture
def fresh_prefix(test_bucket):
    """A fresh, empty prefix per test: s3://vitscale-tests/case-N."""
    return f"{test_bucket}/case-{next(_prefix_numbers)}"


@pytest.fixture
def s3(s3_server):
    return s3_server.client_factory()
