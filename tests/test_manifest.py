"""Every embedding shipped in embeddings/ is listed in manifest.json with a matching sha256, and loads."""

import json
import os

from implicit_negatives.embedding_io import EMBEDDING_EXTENSIONS, load_embedding, sha256_file

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "embeddings")
REQUIRED = {"name", "concept", "model_family", "trained_on", "how_made", "sha256"}


def test_manifest_lists_exactly_the_shipped_files_with_their_hashes():
    with open(os.path.join(FOLDER, "manifest.json")) as handle:
        entries = json.load(handle)["embeddings"]
    shipped = sorted(f for f in os.listdir(FOLDER) if f.lower().endswith(EMBEDDING_EXTENSIONS))
    assert sorted(e["name"] for e in entries) == shipped
    for entry in entries:
        assert REQUIRED <= set(entry), entry
        path = os.path.join(FOLDER, entry["name"])
        assert sha256_file(path) == entry["sha256"], entry["name"]
        assert load_embedding(path).family == entry["model_family"]
