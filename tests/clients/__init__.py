"""Real clients: training libraries that build and step a plateau scheduler themselves (tests/clients/run.py)."""
