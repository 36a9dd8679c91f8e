"""The ComfyExtension that lists every node of the pack (the V3 registration point)."""

from comfy_api.latest import ComfyExtension

from .embedding_nodes import ImplicitNegativeConditioning, LoadImplicitNegative
from .score_nodes import SafetyScore


class ImplicitNegativesExtension(ComfyExtension):
    async def get_node_list(self):
        return [LoadImplicitNegative, ImplicitNegativeConditioning, SafetyScore]
