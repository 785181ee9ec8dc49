"""Bytes on disk, used by every stage: the safetensors format (format.py), lazy tensor reads
(reader.py), the streaming shard writer (writer.py), and file digests with their cache (digests.py).

Nothing here knows about manifests, adapters or plans.
"""
