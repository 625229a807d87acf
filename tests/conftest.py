# Scripts that run on the ranks of a launch (they read sys.argv and initialise a backend at
# import) are never imported by pytest, not even for --doctest-modules.
collect_ignore_glob = ["*_checks.py", "*_worker.py", "lightning_*.py", "workers/*"]
