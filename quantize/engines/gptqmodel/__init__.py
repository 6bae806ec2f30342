"""GPTQModel, the engine behind the GPTQ and AWQ formats.

setup.py   importing it with settings that work on small CPU machines; what it supports
weights.py WeightFormat (the per-format data) and the backend both formats use
folder.py  GPTQModel's save -> a clean release folder
verify.py  checks, loading back with transformers, a generation test
"""
