"""The Stem model family: the conditional DiT (``model``), its size presets and training chain
(``model_config``), IDDPM diffusion and few-step solvers (``diffusion``), batched sampling of spots
(``sampling``) and the checkpoint format (``checkpoint``).

Importing the subpackage imports nothing: ``model_config`` stays torch-free for argument checks.
"""
