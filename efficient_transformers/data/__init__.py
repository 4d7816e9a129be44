"""Tasks: generators, readers, tokenizers and Grain input pipelines.

This package knows nothing of models, attention or training; they import it,
never the other way round. Submodules are imported by name (e.g.
`efficient_transformers.data.listops`) so that a worker process unpickling a
generator function imports numpy and that file only.
"""
