from trufor_trt.cli import run

run()
