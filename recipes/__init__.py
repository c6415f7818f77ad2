"""Training recipes, one module per dataset x supervision: ``python -m recipes.<name>``."""
