"""The pack's own socket type, declared once: every node that takes or gives an implicit negative uses it."""

from comfy_api.latest import io

ImplicitNegativeType = io.Custom("IMPLICIT_NEGATIVE")
