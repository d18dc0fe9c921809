"""Datasets: ingest (folder/s3 -> immutable checksummed shards + manifest), face preparation,
VLR degradation, synthetic faces, and the training-time reader with batch augmentation."""
