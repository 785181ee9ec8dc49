"""Stage 1, the manifest: what to merge and how, as strict pydantic models.

yamlsource.py parses YAML keeping each key's line; sections.py holds one model per manifest key
(base, adapters, combine, output, verify, executor); load.py assembles them into the Manifest,
loads it (`load_manifest` -> LoadedManifest) and prints its JSON Schema.
"""
