"""The pipeline's recipes, one module per stage; each reads top to bottom as the whole job."""
