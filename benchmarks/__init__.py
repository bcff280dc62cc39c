"""`trufor-trt bench`: latency per stage, throughput, memory and FLOP/s, beside the official network.

Installed as `trufor_trt.benchmarks` (see pyproject.toml); nothing here imports a backend at
import time.
"""
