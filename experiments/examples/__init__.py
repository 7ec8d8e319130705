"""Models and code a user would write, run by the tests: see each module's docstring."""
