"""Shards to batches: writing, listing, streaming, decoding, augmenting, and S3 access.

    python launch/make_shards.py --input DIR --output s3://bucket/prefix    # folders -> shards
    python -m data_pipelines.synthetic classification /tmp/shards            # generated sets
    python -m data_pipelines.preflight s3://bucket/prefix                    # readable? one line
    python -m data_pipelines.stream s3://bucket/prefix                       # stream one epoch
    python -m data_pipelines.embedded_s3                                     # a local S3 server

One file per concern:
  s3.py           URL parsing, the picklable boto3 client factory, one-line S3 errors
  storage.py      bytes in and out of a folder or an S3 prefix (backend from the URL scheme)
  manifest.py     manifest.json: shard names, sample counts, sizes, sha256, class names
  shard_writer.py image folders / sample iterables -> webdataset tars + manifest
  synthetic.py    learnable synthetic sets (single- and multi-label) and sklearn digits
  augment.py      decode (only the rows a crop needs) + crop + resize + flip, normalise
  stream.py       ShardLoader: one rank's share of an epoch, exact resume via state_dict()
  preflight.py    check_readable / check_writable before any training starts
  embedded_s3.py  SeaweedFS on 127.0.0.1 for tests and the dry run

May import torch, webdataset, boto3, PIL and numpy; never `orchestrator/` or `model/`.
"""
