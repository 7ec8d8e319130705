"""The `privet` command line and experiment configs."""
