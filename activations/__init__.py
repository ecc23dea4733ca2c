"""Language models, text datasets, hook names and the activation cache: the only package that
runs a language model to produce data."""
