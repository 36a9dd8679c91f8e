"""The ComfyExtension that lists every node of the pack (the V3 registration point)."""

from comfy_api.latest import ComfyExtension

from .audit_nodes import ErasureAudit
from .embedding_nodes import ImplicitNegativeConditioning, LoadImplicitNegative
from .prompt_nodes import TruncatePrompts
from .safe_denoiser_nodes import EncodeNegationSet, LoadNegationSet, SafeDenoiser
from .sld_nodes import SafeLatentGuidance
from .safree_nodes import SafreeConditioning, SafreeLatentReAttention
from .score_nodes import SafetyScore
from .train_nodes import TrainImplicitNegative
from .weights_nodes import LoadUnlearnedLoRA, LoadUnlearnedTextEncoder, LoadUnlearnedWeights


class ImplicitNegativesExtension(ComfyExtension):
    async def get_node_list(self):
        return [LoadImplicitNegative, ImplicitNegativeConditioning, SafeLatentGuidance, SafreeConditioning,
                SafreeLatentReAttention, TrainImplicitNegative, SafetyScore, LoadUnlearnedWeights,
                LoadUnlearnedLoRA, LoadUnlearnedTextEncoder, EncodeNegationSet, SafeDenoiser,
                ErasureAudit, LoadNegationSet, TruncatePrompts]
