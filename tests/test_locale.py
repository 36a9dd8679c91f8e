"""The English locale file carries exactly the strings the node schemas define."""

import json
import os
import sys

from implicit_negatives.comfyui import headless, rig

sys.path.insert(0, os.path.join(headless.PACK_ROOT, "tools"))
import build_locale  # noqa: E402


def test_english_locale_matches_the_node_schemas(pack):
    with open(build_locale.LOCALE_PATH) as handle:
        shipped = json.load(handle)
    expected = build_locale.locale_for(pack)
    assert shipped == expected, "locales/en/main.json is stale: run python tools/build_locale.py"
    for node_id, strings in expected["nodeDefs"].items():
        assert strings["description"], f"{node_id} has no description"
        assert all("tooltip" in entry for entry in strings["inputs"].values()), f"{node_id}: input without tooltip"
        assert all("tooltip" in entry for entry in strings["outputs"].values()), f"{node_id}: output without tooltip"


def test_every_node_has_a_help_page(pack):
    docs = os.path.join(headless.PACK_ROOT, "web", "docs")
    missing = [node_id for node_id in pack if not os.path.isfile(os.path.join(docs, f"{node_id}.md"))]
    assert missing == [], f"nodes without web/docs/<NodeID>.md: {missing}"
