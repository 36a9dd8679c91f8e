"""ComfyUI adapters: short V3 node classes that translate sockets into calls of the core package."""
