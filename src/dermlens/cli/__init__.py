"""The `dermlens` command line. Sub-command modules import heavy libraries inside their commands."""
