"""Shards to batches: writing, listing, streaming, decoding, augmenting, and S3 access.

Empty so far: the data pipeline is its own issue ("Data pipeline: webdataset shards on S3").
May import torch, webdataset and boto3; never `orchestrator/` or `model/`.
"""
