"""The shipped recipes (``*.yaml``) and their prompt sets (``prompts/``, made by ``scripts/make_prompts.py``),
installed as the package ``flowalign.recipes``: ``flowalign recipes list``, ``flowalign train sd35_pickscore``.
Helpers: ``flowalign.recipe_paths``."""
