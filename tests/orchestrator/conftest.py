import itertools

import pytest

_numbers = itertools.count()


@pytest.fixture
def run_url(s3_server):
    """A fresh, empty checkpoint prefix per test."""
    bucket = s3_server.create_bucket("vitscale-checkpoints")
    return f"{bucket}/run-{next(_numbers)}/checkpoints"
