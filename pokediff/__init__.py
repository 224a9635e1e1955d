"""pokediff: text-to-sprite latent diffusion on the Hugging Face stack."""

__version__ = "0.1.0"

__all__ = ["PokeSpritePipeline", "__version__"]


def __getattr__(name):
    # lazy, so `import pokediff.data` does not pull in diffusers
    if name == "PokeSpritePipeline":
        from .pipeline import PokeSpritePipeline

        return PokeSpritePipeline
    raise AttributeError(f"module 'pokediff' has no attribute '{name}'")
