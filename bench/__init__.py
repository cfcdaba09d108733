"""The tidegate benchmark: a fixed workload through a real Mosquitto, side by side with its limits.

Run `python3 -m bench.run` (or `--quick` for a short smoke run); bench/README.md explains what is
measured and how. Nothing in `gateway`, `rules` or `devices` imports this package.
"""
