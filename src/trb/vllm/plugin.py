"""vLLM's plugin entry point (`vllm.general_plugins`, declared in pyproject.toml): vLLM calls `register` in every
process it starts, before it builds a model."""


def register() -> None:
    from vllm import ModelRegistry

    from trb.vllm.blend import ARCHITECTURE

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # by name: the class (and so torch and trb's policies) is imported only where a blend engine is built
        ModelRegistry.register_model(ARCHITECTURE, "trb.vllm.blend:TRBBlendForCausalLM")
